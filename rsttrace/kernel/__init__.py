"""What the running kernel offers: tracepoint layouts, BTF, counters, namespaces, the hook table."""
