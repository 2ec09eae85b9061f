# recjob-triton: NVIDIA Triton with what the model repository's tokenizer Python model
# (serving/recjob_serving/backends/tokenizer_model.py) imports beyond the stock image:
# transformers and tokenizers, pinned as constraints.txt pins them. The stock Triton image
# lacks them, and Triton fails the tokenizer model (and the ensemble) at load time.
# Used by manifests/serving/recjob-triton.yaml. Not built in this project's CI (the base
# image cannot be pulled there and no GPU is available).
# Build from the repository root: docker build -f serving/triton.Dockerfile -t recjob-triton .
FROM nvcr.io/nvidia/tritonserver:25.10-py3
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt transformers tokenizers && rm /tmp/constraints.txt
USER 1000:1000
