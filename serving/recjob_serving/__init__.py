"""RecJob serving: export, quantization with a quality gate, Triton model repositories, an
Open Inference Protocol server and a tritonclient load generator."""

__version__ = "0.1.0"
