"""tritonclient in its own process (tritonclient.grpc and kserve cannot share one).

Usage: python oip_client.py PROTOCOL URL  (reads a JSON job on stdin, prints JSON)
Job: {"texts": [[query, item], ...], "tokens": {name: [[...]]}, "bad": true}
"""

import json
import sys

import numpy as np


def main() -> None:
    protocol, url = sys.argv[1], sys.argv[2]
    if protocol == "http":
        import tritonclient.http as client_module
    else:
        import tritonclient.grpc as client_module
    from tritonclient.utils import InferenceServerException

    job = json.load(sys.stdin)
    client = client_module.InferenceServerClient(url)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_model_ready("search-text"),
    }
    if protocol == "http":
        metadata = client.get_model_metadata("search")
    else:
        metadata = client.get_model_metadata("search", as_json=True)
    out["metadata_inputs"] = [i["name"] for i in metadata["inputs"]]

    def tensor(name, value, datatype):
        t = client_module.InferInput(name, list(value.shape), datatype)
        if protocol == "http":
            t.set_data_from_numpy(value, binary_data=True)
        else:
            t.set_data_from_numpy(value)
        return t

    queries = np.array([[q.encode()] for q, _ in job["texts"]], dtype=np.object_)
    items = np.array([[i.encode()] for _, i in job["texts"]], dtype=np.object_)
    result = client.infer(
        "search-text", [tensor("query", queries, "BYTES"), tensor("item", items, "BYTES")]
    )
    out["text_scores"] = result.as_numpy("score").reshape(-1).tolist()
    response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
    out["text_version"] = response["model_version"]
    tokens = [
        tensor(name, np.asarray(value, dtype=np.int64), "INT64")
        for name, value in job["tokens"].items()
    ]
    out["token_scores"] = client.infer("search", tokens).as_numpy("score").reshape(-1).tolist()
    if job.get("bad"):
        errors = []
        cases = [
            ("search", [tensor("input_ids", np.zeros((1, 4), np.float32), "FP32")]),
            ("search", [tensor("nope", np.zeros((1, 4), np.int64), "INT64")]),
            ("search", tokens[:1]),
            ("search-text", [tensor("query", queries, "BYTES")]),
            ("missing-model", tokens),
            (
                "search-text",
                [
                    tensor("query", np.array([[b"\xff\xfe"]], np.object_), "BYTES"),
                    tensor("item", np.array([[b"x"]], np.object_), "BYTES"),
                ],
            ),
        ]
        for model, inputs in cases:
            try:
                client.infer(model, inputs)
                errors.append("accepted")
            except InferenceServerException as error:
                errors.append(str(error.status()) + " " + error.message())
        out["bad"] = errors
        out["after_bad"] = client.infer("search", tokens).as_numpy("score").reshape(-1).tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
