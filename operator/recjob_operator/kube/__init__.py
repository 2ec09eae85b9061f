"""The Kubernetes backend of the operator (kopf handlers and API access)."""
