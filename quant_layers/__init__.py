"""Quantized layer variants, importance profiling and the offline switchable model."""
