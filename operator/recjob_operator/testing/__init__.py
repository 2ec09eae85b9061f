"""Test infrastructure the project owns (a fake Kubernetes API server)."""
