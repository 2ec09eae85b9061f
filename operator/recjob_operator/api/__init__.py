"""Versioned RecJob API types. The current (and only) version is v1alpha1."""
