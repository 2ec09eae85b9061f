"""The container images' supply chain, checked statically (no Docker, no network): base
images pinned by digest, compilers only in builder stages, every pip install hash-checked
from a lock file of this repository (hack/lock_images.py writes them) whose versions are
constraints.txt's, and the DeepSpeed ops the trainer image pre-builds named by switches the
installed DeepSpeed really has."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

DOCKERFILES = {
    "operator": REPO / "operator" / "Dockerfile",
    "serving": REPO / "serving" / "Dockerfile",
    "triton": REPO / "serving" / "triton.Dockerfile",
    "trainer": REPO / "trainer" / "Dockerfile",
}
#: FROM images left unpinned, with the reason (also written in the Dockerfile).
UNPINNED = {
    "nvcr.io/nvidia/tritonserver:25.10-py3": "no public record of its digest was found",
}
#: pip installs that cannot be hash-checked, with the reason (also in the Dockerfile).
UNHASHED = {
    # download.pytorch.org unreachable where the locks were made: no hash for the CPU wheel
    "--no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu",
    # the repository's own source, copied in: nothing is downloaded
    "--no-deps --no-build-isolation /src",
}
COMPILERS = re.compile(
    r"(?<![\w.+-])(build-essential|gcc|g\+\+|clang|cpp|make|cmake|cc|[\w.+-]+-dev)(?![\w.+-])"
)
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            keyword, _, arguments = logical.partition(" ")
            out.append((keyword.upper(), " ".join(arguments.split())))
    return out


def stages(path: Path) -> list[dict]:
    """[{'image', 'name', 'instructions'}] per FROM."""
    out: list[dict] = []
    for keyword, arguments in instructions(path):
        if keyword == "FROM":
            image, _, name = arguments.partition(" AS ")
            out.append({"image": image.strip(), "name": name.strip(), "instructions": []})
        else:
            out[-1]["instructions"].append((keyword, arguments))
    return out


def pip_installs(stage: dict) -> list[str]:
    """The arguments of every `pip install` of a stage's RUN instructions."""
    found = []
    for keyword, arguments in stage["instructions"]:
        if keyword == "RUN":
            for command in re.split(r"&&|;", arguments):
                match = re.search(r"\bpip install (.*)", command)
                if match:
                    found.append(match[1].strip())
    return found


def copied_from_repo(stage: dict, target: str) -> Path:
    """The repository file a stage's COPY put at ``target``."""
    for keyword, arguments in stage["instructions"]:
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        *sources, destination = arguments.split()
        for source in sources:
            landed = destination + Path(source).name if destination.endswith("/") else destination
            if landed == target:
                return REPO / source
    raise AssertionError(f"{target}: not COPYed from the repository in this stage")


def lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, hashes)}; fails on anything but hashed name==version."""
    out: dict[str, tuple[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().removesuffix("\\").strip()
        if not line:
            continue
        if line.startswith("--hash="):
            assert current and HASH.match(line), f"{path.name}: bad hash line {raw!r}"
            out[current][1].append(line)
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: not a name==version pin: {raw!r}"
        current = canonicalize_name(match[1])
        out[current] = (match[2], [])
    for name, (version, hashes) in out.items():
        assert hashes, f"{path.name}: {name}=={version} has no --hash"
    return out


def constraints() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.split("#", 1)[0].strip().partition("==")
        if name:
            out[canonicalize_name(name)] = version
    return out


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_base_image_is_pinned_by_digest(image: str) -> None:
    names = set()
    for stage in stages(DOCKERFILES[image]):
        reference = stage["image"]
        if reference in names:  # FROM an earlier stage
            continue
        if reference in UNPINNED:
            assert reference in DOCKERFILES[image].read_text()
            assert "imagetools inspect" in DOCKERFILES[image].read_text()
        else:
            assert DIGEST.search(reference), f"{image}: FROM {reference} is not pinned"
            assert ":" in reference.split("@")[0], "keep the tag beside the digest"
        names.add(stage["name"])


def test_one_digest_per_tag_across_the_dockerfiles() -> None:
    digests: dict[str, set[str]] = {}
    for path in DOCKERFILES.values():
        for stage in stages(path):
            tag, _, digest = stage["image"].partition("@")
            if digest:
                digests.setdefault(tag, set()).add(digest)
    assert digests and all(len(d) == 1 for d in digests.values()), digests


@pytest.mark.parametrize("image", ["operator", "serving", "trainer"])
def test_the_runtime_stage_has_no_compiler_and_is_not_root(image: str) -> None:
    *builders, runtime = stages(DOCKERFILES[image])
    assert builders, f"{image}: not a multi-stage build"
    assert runtime["image"] == builders[0]["image"], "runtime FROM the builder's base"
    for keyword, arguments in runtime["instructions"]:
        if keyword == "RUN" and re.search(r"\bapt(-get)? install\b", arguments):
            packages = arguments.split("install", 1)[1].split("&&")[0]
            assert not COMPILERS.search(packages), f"{image} runtime installs {packages}"
        if keyword == "RUN":
            assert "pip install" not in arguments, "the runtime stage installs nothing from PyPI"
        if keyword == "COPY" and arguments.startswith("--from="):
            assert arguments.split()[1] in ("/opt/venv", "/opt/recjob"), arguments
    users = [a for k, a in runtime["instructions"] if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    builder_text = " ".join(a for k, a in builders[-1]["instructions"] if k == "RUN")
    if image != "operator":  # wheels only there: no compiler needed at all
        assert "build-essential" in builder_text


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_pip_install_is_hash_checked_from_a_lock_in_the_repository(image: str) -> None:
    locks = []
    for stage in stages(DOCKERFILES[image]):
        for arguments in pip_installs(stage):
            if arguments in UNHASHED:
                continue
            assert "--require-hashes" in arguments.split(), f"{image}: pip install {arguments}"
            assert "--no-deps" in arguments.split(), "the lock is complete; pip adds nothing"
            files = re.findall(r"-r (\S+)", arguments)
            assert len(files) == 1 and "-c" not in arguments.split()
            path = copied_from_repo(stage, files[0])
            assert path.is_file(), path
            assert lock(path)
            locks.append(path)
    assert locks, f"{image}: no hash-checked install"


def test_the_unhashed_installs_are_the_documented_ones() -> None:
    seen = set()
    for image in ("serving", "trainer"):
        text = DOCKERFILES[image].read_text()
        assert "NOT hash-checked" in text
        for stage in stages(DOCKERFILES[image]):
            seen |= set(pip_installs(stage)) & UNHASHED
    assert seen == UNHASHED
    assert constraints()["torch"] == "2.13.0"  # the +cpu build of the locked version


def test_the_locks_pin_constraints_versions() -> None:
    locked = constraints()
    operator = lock(REPO / "operator" / "requirements.txt")
    assert {n: v for n, (v, _) in operator.items()} == {n: locked[n] for n in operator}
    for path in [
        REPO / "serving" / "requirements.lock",
        REPO / "serving" / "triton-requirements.lock",
        REPO / "trainer" / "requirements.lock",
    ]:
        for name, (version, _) in lock(path).items():
            if name in locked:
                assert version == locked[name], f"{path.name}: {name}=={version}"
            else:  # only what no constraint names: the build tools
                assert name in {"setuptools", "wheel"}, f"{path.name}: {name} not in constraints"
    assert lock(REPO / "serving" / "triton-requirements.lock").keys() >= {
        "transformers",
        "tokenizers",
    }


@pytest.mark.parametrize("image", ["serving", "trainer"])
def test_the_app_lock_covers_every_dependency_but_torch(image: str) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    required = {
        canonicalize_name(Requirement(r).name) for r in pyproject["project"]["dependencies"]
    }
    locked = lock(REPO / image / "requirements.lock")
    assert required - set(locked) == {"torch"}
    assert not [n for n in locked if n.startswith("nvidia-") or n in ("torch", "triton")]
    # what torch's CPU wheel requires, hashed with the rest
    assert {"filelock", "sympy", "networkx", "jinja2", "fsspec", "typing-extensions"} <= set(locked)
    assert lock(REPO / image / "requirements-build.lock").keys() >= {"setuptools", "wheel"}


def test_the_trainer_prebuilds_deepspeed_ops_with_real_switches() -> None:
    text = DOCKERFILES["trainer"].read_text()
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepspeed not installed here")
    builders = Path(next(iter(spec.submodule_search_locations))) / "ops" / "op_builder" / "cpu"
    switches = {}
    for source in builders.glob("*.py"):
        for var, name in re.findall(r'BUILD_VAR = "(\w+)"\s+NAME = "(\w+)"', source.read_text()):
            switches[var] = name
    *builder, _ = stages(DOCKERFILES["trainer"])
    run = " ".join(a for k, a in builder[-1]["instructions"] if k == "RUN")
    used = set(re.findall(r"\b(DS_BUILD_\w+)=1", run))
    assert used >= {"DS_BUILD_CPU_ADAM", "DS_BUILD_SHM_COMM"}
    assert used <= set(switches), f"unknown switches: {used - set(switches)}"
    assert "DS_BUILD_OPS=0" in run and "DS_ACCELERATOR=cpu" in text
    for var in used:  # the build fails if setup.py skipped one of them
        assert f"'{switches[var]}'" in run
