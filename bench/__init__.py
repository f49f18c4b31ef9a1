"""pycri benchmarks against containerd's CRI plugin: ``make bench`` / ``python -m bench.run``."""
