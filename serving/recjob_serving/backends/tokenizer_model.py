"""Triton Python-backend model: raw text (BYTES) -> token ids for a RecJob ranking model.

``recjob-serve convert`` copies this file into the model repository as
``<model>-tokenizer/<version>/model.py`` beside the model's tokenizer files
(``<version>/tokenizer/``). It runs unchanged in Triton's Python backend (KServe's Triton
runtime) and in ``recjob-serve serve``, which gives it the same ``pb_utils`` interface.

Parameters (config.pbtxt): ``kind`` (``cross-encoder``: inputs ``query`` and ``item``;
``bi-encoder``: input ``text``), ``max_length`` (longer texts are truncated) and, optional,
``max_text_bytes``: each text is cut to this many bytes (at a UTF-8 character boundary)
before it is tokenized, so a huge text costs no more than a long one (default
``BYTES_PER_TOKEN`` x ``max_length``, far more than ``max_length`` tokens take).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

#: Bytes kept per token of ``max_length`` when ``max_text_bytes`` is not configured.
BYTES_PER_TOKEN = 32


def cut_utf8(value: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes of ``value`` or fewer, never splitting a UTF-8 character."""
    if len(value) <= limit:
        return value
    while limit > 0 and value[limit] & 0xC0 == 0x80:  # a continuation byte: back off
        limit -= 1
    return value[:limit]


def _texts(tensor, max_bytes: int) -> list:
    """A [batch, 1] BYTES tensor -> list of str, each cut to ``max_bytes`` UTF-8 bytes
    (UnicodeDecodeError on invalid UTF-8 in what is kept)."""
    return [
        cut_utf8(value if isinstance(value, bytes) else str(value).encode(), max_bytes).decode()
        for value in tensor.as_numpy().reshape(-1)
    ]


class TritonPythonModel:
    """Tokenizes each request's texts exactly as the trainer did."""

    def initialize(self, args):
        """Load the tokenizer stored beside this file's version."""
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.kind = parameters["kind"]
        self.max_length = int(parameters["max_length"])
        self.max_bytes = int(parameters.get("max_text_bytes", BYTES_PER_TOKEN * self.max_length))
        self.outputs = [output["name"] for output in config["output"]]
        directory = os.path.join(args["model_repository"], args["model_version"], "tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(directory)

    def _tokenize(self, request):
        if self.kind == "cross-encoder":
            queries = _texts(pb_utils.get_input_tensor_by_name(request, "query"), self.max_bytes)
            items = _texts(pb_utils.get_input_tensor_by_name(request, "item"), self.max_bytes)
            if len(queries) != len(items):
                raise ValueError(f"{len(queries)} queries but {len(items)} items")
            return self.tokenizer(
                queries,
                items,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="np",
            )
        texts = _texts(pb_utils.get_input_tensor_by_name(request, "text"), self.max_bytes)
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )

    def execute(self, requests):
        """One response per request; a bad request gets an error response, not a crash."""
        responses = []
        for request in requests:
            try:
                tokens = self._tokenize(request)
            except (UnicodeDecodeError, ValueError) as error:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(str(error))
                    )
                )
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(name, tokens[name].astype(np.int64))
                        for name in self.outputs
                    ]
                )
            )
        return responses
