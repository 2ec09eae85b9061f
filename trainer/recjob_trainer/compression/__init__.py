"""Knowledge distillation and pruning of a fine-tuned ranking model."""
