"""Triton Python-backend model: raw text (BYTES) -> token ids for a RecJob ranking model.

``recjob-serve convert`` copies this file into the model repository as
``<model>-tokenizer/<version>/model.py`` beside the model's tokenizer files
(``<version>/tokenizer/``). It runs unchanged in Triton's Python backend (KServe's Triton
runtime) and in ``recjob-serve serve``, which gives it the same ``pb_utils`` interface.

Parameters (config.pbtxt): ``kind`` (``cross-encoder``: inputs ``query`` and ``item``;
``bi-encoder``: input ``text``) and ``max_length`` (longer texts are truncated).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def _texts(tensor) -> list:
    """A [batch, 1] BYTES tensor -> list of str (UnicodeDecodeError on invalid UTF-8)."""
    return [
        value.decode("utf-8") if isinstance(value, bytes) else str(value)
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
        self.outputs = [output["name"] for output in config["output"]]
        directory = os.path.join(args["model_repository"], args["model_version"], "tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(directory)

    def _tokenize(self, request):
        if self.kind == "cross-encoder":
            queries = _texts(pb_utils.get_input_tensor_by_name(request, "query"))
            items = _texts(pb_utils.get_input_tensor_by_name(request, "item"))
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
        texts = _texts(pb_utils.get_input_tensor_by_name(request, "text"))
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
