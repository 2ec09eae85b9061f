"""Files written into Triton model repositories (Python-backend models)."""
