"""RecJob trainer: data preparation, DeepSpeed fine-tuning, compression and evaluation.

Knows nothing of Kubernetes: it reads a config file and the rendezvous environment.
"""

__version__ = "0.1.0"
