"""The operator image: what it installs (operator/requirements.txt) is all the operator
needs. The operator's modules are imported in an interpreter that can import nothing else
(no torch, numpy, polars, trainer or serving package) and build every child there."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import textwrap

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from recjob_operator.api.validation import parse_recjob
from recjob_operator.controller import children, serving_objects
from tests.conftest import CLUSTER_SAMPLES, REPO, load_yaml

REQUIREMENTS = REPO / "operator" / "requirements.txt"
#: Never in the operator image, whatever else is installed here.
HEAVY = {
    "numpy",
    "torch",
    "polars",
    "transformers",
    "deepspeed",
    "onnx",
    "onnxruntime",
    "recjob_trainer",
    "recjob_serving",
}
#: What python:3.11-slim brings besides the standard library.
BASE_IMAGE = {"pip", "setuptools", "wheel"}
UID = "5f0c1e6e-2a4e-4a4b-9b1e-0d6f3f1b2c3d"


def pins(path) -> dict[str, str]:
    """{canonical name: version} of a requirements / constraints file (a pin may go on
    with `\\` and `--hash=sha256:...` continuation lines: operator/requirements.txt)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().removesuffix("\\").strip()
        if line and not line.startswith("--hash="):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def blocked_modules() -> set[str]:
    """Top-level modules installed here that the operator image would not have."""
    allowed = set(pins(REQUIREMENTS)) | BASE_IMAGE
    blocked = set(HEAVY)
    for module, dists in metadata.packages_distributions().items():
        if module == "recjob_operator":  # the package itself (PYTHONPATH in the image)
            continue
        if not any(canonicalize_name(d) in allowed for d in dists):
            blocked.add(module)
    return blocked


def build_children(recjob) -> dict:
    return {
        "trainingConfigMap": children.training_config_map(recjob),
        "pytorchJob": children.pytorch_job(recjob),
        "conversionConfigMap": children.conversion_config_map(recjob),
        "conversionJob": children.conversion_job(recjob),
        "inferenceService": serving_objects.serverless_inference_service(recjob, 2, 10),
    }


SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = set(json.loads(sys.argv[1]))

    # every finder made blind to BLOCKED modules: as if they were not installed
    # (imports fail, importlib.util.find_spec probes answer None)
    class Hide(importlib.abc.MetaPathFinder):
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attribute):  # find_distributions, invalidate_caches
            return getattr(self.inner, attribute)

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
    import recjob_operator.kube.backend
    import recjob_operator.kube.handlers
    from recjob_operator.controller import children, serving_objects
    from recjob_operator.api.validation import parse_recjob

    out = {}
    for document in json.loads(sys.stdin.read()):
        recjob = parse_recjob(document)
        recjob.metadata.uid = sys.argv[2]
        out[recjob.metadata.name] = {
            "trainingConfigMap": children.training_config_map(recjob),
            "pytorchJob": children.pytorch_job(recjob),
            "conversionConfigMap": children.conversion_config_map(recjob),
            "conversionJob": children.conversion_job(recjob),
            "inferenceService": serving_objects.serverless_inference_service(recjob, 2, 10),
        }
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & BLOCKED)
    print(json.dumps({"children": out, "loaded": loaded}))
    """
)


def test_the_operator_runs_with_only_its_image_packages() -> None:
    documents = [load_yaml(path) for path in CLUSTER_SAMPLES]
    assert documents
    blocked = blocked_modules()
    assert blocked >= HEAVY and "kopf" not in blocked and "torch" in blocked
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(sorted(blocked)), UID],
        input=json.dumps(documents),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    answer = json.loads(result.stdout)
    assert answer["loaded"] == []
    for document in documents:
        recjob = parse_recjob(document)
        recjob.metadata.uid = UID
        built = answer["children"][recjob.metadata.name]
        assert built == json.loads(json.dumps(build_children(recjob)))  # same as here
        container = built["pytorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        assert container["spec"]["containers"][0]["command"][:2] == ["recjob-train", "--launch"]


def test_the_block_catches_a_trainer_import() -> None:
    """The check above would see the old defect (children importing the trainer)."""
    code = SCRIPT.replace("import recjob_operator.kube.backend", "import recjob_trainer.config", 1)
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(sorted(blocked_modules())), UID],
        input="[]",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode != 0
    assert "No module named 'recjob_trainer'" in result.stderr


def test_requirements_are_the_locked_versions_and_complete() -> None:
    required = pins(REQUIREMENTS)
    locked = pins(REPO / "constraints.txt")
    assert {"kopf", "kubernetes", "pydantic", "pyyaml", "prometheus-client", "httpx"} <= set(
        required
    )
    assert not HEAVY & set(required)
    for name, version in required.items():
        assert locked.get(name) == version, f"{name}=={version}; constraints: {locked.get(name)}"
        installed = metadata.distribution(name)
        if installed.version != version:
            pytest.skip(f"{name} {installed.version} installed here, not the lock's {version}")
        for text in installed.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            dependency = canonicalize_name(requirement.name)
            assert dependency in required, f"{name} requires {dependency}: not listed"
            assert requirement.specifier.contains(required[dependency], prereleases=True)


def test_the_dockerfile_installs_exactly_the_requirements() -> None:
    text = (REPO / "operator" / "Dockerfile").read_text()
    (install,) = [line for line in text.splitlines() if "pip install" in line]
    assert "--no-deps --require-hashes -r /tmp/requirements.txt" in install
    assert "COPY operator/requirements.txt /tmp/requirements.txt" in text
    assert "operator/requirements.txt" in text
    assert not re.search(r"^COPY (trainer|serving)\b", text, re.MULTILINE)
    assert "COPY operator/recjob_operator " in text
