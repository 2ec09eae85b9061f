"""The operator's reconcile core and canary analysis, shared by both backends."""
