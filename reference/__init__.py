"""Plain float64 NumPy ground truth (installed as metacore.reference): obviously correct, slow."""
