"""RecJob operator: the RecJob API, its validation and CRD, and the reconcile core."""

__version__ = "0.1.0"
