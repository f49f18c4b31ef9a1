"""NRI (Node Resource Interface): the runtime side of containerd/nri, spoken over ttrpc."""
