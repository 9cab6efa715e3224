"""rsttrace: every TCP reset the kernel sends or accepts, and every listen-queue overflow, with why."""

__version__ = "0.1.0"
