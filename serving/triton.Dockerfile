# recjob-triton: NVIDIA Triton with what the model repository's tokenizer Python model
# (serving/recjob_serving/backends/tokenizer_model.py) imports beyond the stock image:
# transformers and tokenizers, pinned as constraints.txt pins them. The stock Triton image
# lacks them, and Triton fails the tokenizer model (and the ensemble) at load time.
# Used by manifests/serving/recjob-triton.yaml. Not built in this project's CI (the base
# image cannot be pulled there and no GPU is available).
# Build from the repository root: docker build -f serving/triton.Dockerfile -t recjob-triton .
#
# Base image NOT pinned by digest (the one exception, listed in tests/test_images.py): no
# digest of nvcr.io/nvidia/tritonserver:25.10-py3 could be found in any public source
# searched, and nvcr.io could not be queried where this was written. Pin it before use:
#   docker buildx imagetools inspect nvcr.io/nvidia/tritonserver:25.10-py3
# and write FROM nvcr.io/nvidia/tritonserver:25.10-py3@sha256:<that digest> (then drop the
# exception in tests/test_images.py).
# Single stage: only wheels are installed (no compiler added), hash-checked from
# serving/triton-requirements.lock (CPython 3.12, the image's Python; `make image-locks`).
FROM nvcr.io/nvidia/tritonserver:25.10-py3
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
COPY serving/triton-requirements.lock /tmp/triton-requirements.lock
RUN pip install --no-deps --require-hashes -r /tmp/triton-requirements.lock \
 && rm /tmp/triton-requirements.lock
USER 1000:1000
