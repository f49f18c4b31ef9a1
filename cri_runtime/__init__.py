"""pycri: a Kubernetes CRI v1 runtime."""

__version__ = "0.1.0"
