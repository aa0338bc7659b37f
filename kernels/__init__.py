"""Fast kernels (installed as metacore.kernels): one module per op, backends side by side."""
