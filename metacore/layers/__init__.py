"""Layers as plain forward / backward / R-forward / R-backward functions, one module each."""
