"""Where events and counts go: lines and JSON, structlog, the Prometheus collector and its HTTP server."""
