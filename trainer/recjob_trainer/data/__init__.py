"""Data preparation: readers, cleaning, leakage-free splits, negative sampling."""
