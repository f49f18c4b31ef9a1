"""NRI API messages generated from proto/nri (make nri-proto)."""
