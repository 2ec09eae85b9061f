"""Regenerate the container images' hashed lock files (`make image-locks`).

- operator/requirements.txt: the hand-kept, complete pin list of the operator image; its
  comments and order are kept and every `name==version` gets the sha256 of each file PyPI
  has for that version that the image can install (CPython 3.11, manylinux x86_64).
- trainer/requirements.lock, serving/requirements.lock: pyproject.toml's dependencies
  resolved under constraints.txt by `uv pip compile` (CPython 3.11, x86_64 manylinux_2_28),
  less torch (installed on its own from download.pytorch.org's CPU index, see the
  Dockerfiles) and the CUDA packages only PyPI's torch wheel requires (nvidia-*, triton,
  cuda-*; the CPU wheel has none).
- trainer/requirements-build.lock, serving/requirements-build.lock: setuptools and wheel,
  installed before the main lock because deepspeed (an sdist only) is built with
  --no-build-isolation (its setup.py needs torch to pre-compile ops).
- trainer/requirements-federated.lock: Flower (pyproject's ``federated`` extra), installed
  on top of requirements.lock: the extra less flwr resolved under constraints.txt, less what
  requirements.lock already holds, plus ``flwr`` itself (installed ``--no-deps``: its caps
  on typer, rich, packaging, fastapi, starlette and uvicorn are below the lock's versions;
  see pyproject.toml).
- serving/triton-requirements.lock: transformers and tokenizers (the tokenizer model) and
  faiss-cpu (the top-k model's index), constraints.txt's versions, with their
  requirements for the Triton image's CPython 3.12.

Hashes are PyPI's recorded sha256 of each file (the PEP 691 JSON index, what pip checks);
`--verify-downloads` also downloads every chosen file with `pip download` and checks that
`pip hash` of it is the recorded one. Needs the network (PyPI); run from the repository root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

REPO = Path(__file__).resolve().parent.parent
INDEX = "https://pypi.org/simple"
UV = Path(sys.executable).parent / "uv"
CONSTRAINTS = REPO / "constraints.txt"
#: installed separately (CPU index); its CUDA-only requirements from PyPI's wheel dropped
SEPARATE = {"torch"}
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
BUILD_TOOLS = ["setuptools", "wheel"]
InvalidFilename = (InvalidSdistFilename, InvalidWheelFilename)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;#]+)")


def platforms(glibc_minor: int) -> list[str]:
    """manylinux tags a glibc 2.<glibc_minor> x86_64 system accepts, best first."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc_minor, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


class Target:
    def __init__(self, python: tuple[int, int], glibc_minor: int) -> None:
        self.python = python
        interpreter = f"cp{python[0]}{python[1]}"
        plats = platforms(glibc_minor)
        self.tags = set(cpython_tags(python, platforms=plats)) | set(
            compatible_tags(python, interpreter, plats)
        )
        self.uv_platform = "x86_64-manylinux_2_28"
        self.label = f"CPython {python[0]}.{python[1]}, linux x86_64 (glibc 2.{glibc_minor})"


#: python:3.11-slim is Debian trixie (glibc 2.41); Triton 25.10 is Ubuntu 24.04 (glibc 2.39)
PY311 = Target((3, 11), 41)
PY312 = Target((3, 12), 39)


def index_files(name: str) -> list[dict]:
    request = urllib.request.Request(
        f"{INDEX}/{canonicalize_name(name)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["files"]


def hashes(name: str, version: str, target: Target) -> tuple[list[str], list[str]]:
    """(sha256s, filenames) of the installable files of name==version: every compatible
    wheel, else the sdist (built in the image's builder stage)."""
    wheels, sdists = [], []
    for entry in index_files(name):
        if entry.get("yanked"):
            continue
        filename, sha256 = entry["filename"], entry["hashes"]["sha256"]
        try:
            if filename.endswith(".whl"):
                _, wversion, _, tags = parse_wheel_filename(filename)
                if str(wversion) == version and tags & target.tags:
                    wheels.append((sha256, filename))
            elif filename.endswith(".tar.gz") and str(parse_sdist_filename(filename)[1]) == version:
                sdists.append((sha256, filename))
        except InvalidFilename:  # old uploads named outside today's rules
            continue
    chosen = wheels or sdists
    if not chosen:
        raise SystemExit(f"{name}=={version}: no file on PyPI for {target.label}")
    return sorted(h for h, _ in chosen), sorted(f for _, f in chosen)


def locked(name: str, version: str, target: Target, files: dict) -> list[str]:
    sha256s, filenames = hashes(name, version, target)
    files[(name, version, target.python)] = filenames
    lines = [f"{name}=={version} \\"]
    lines += [f"    --hash=sha256:{h} \\" for h in sha256s]
    lines[-1] = lines[-1].removesuffix(" \\")
    return lines


def resolve(roots: list[str], target: Target) -> list[tuple[str, str]]:
    """uv pip compile of roots under constraints.txt; torch and its CUDA-only packages out."""
    command = [
        str(UV), "pip", "compile", "-", "--constraint", str(CONSTRAINTS),
        "--python-version", ".".join(map(str, target.python)),
        "--python-platform", target.uv_platform,
        "--index-url", INDEX, "--no-header", "--annotation-style", "line", "--quiet",
    ]  # fmt: skip
    out = subprocess.run(
        command, input="\n".join(roots), text=True, capture_output=True, cwd=REPO, check=False
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    pins, via = {}, {}
    for line in out.stdout.splitlines():
        match = PIN.match(line)
        if not match:
            continue
        name = canonicalize_name(match[1])
        pins[name] = (match[1], match[2])
        comment = line.partition("# via ")[2]
        via[name] = {canonicalize_name(v.strip()) for v in comment.split(",") if v.strip()}
    dropped = set(SEPARATE)
    changed = True
    while changed:  # packages only dropped packages require
        changed = False
        for name, parents in via.items():
            if name not in dropped and parents and parents <= dropped and CUDA_ONLY.match(name):
                dropped.add(name)
                changed = True
    leftover = {n for n in pins if CUDA_ONLY.match(n)} - dropped
    if leftover:
        raise SystemExit(f"CUDA packages required by more than torch: {sorted(leftover)}")
    return sorted((pins[n] for n in pins if n not in dropped), key=lambda p: p[0].lower())


def header(lines: list[str]) -> str:
    return "\n".join(f"# {line}".rstrip() for line in lines) + "\n"


def write_lock(path: Path, about: list[str], pins, target: Target, files: dict) -> None:
    text = header(
        [
            "Generated by hack/lock_images.py (make image-locks); do not edit.",
            *about,
            f"Hashes: sha256 of each PyPI file of the version for {target.label}.",
            "Install: pip install --no-deps --require-hashes -r THIS_FILE",
        ]
    )
    body, sdists = [], []
    for name, version in pins:
        body += locked(name, version, target, files)
        if all(f.endswith(".tar.gz") for f in files[(name, version, target.python)]):
            sdists.append(name)
    if sdists:  # built from source in the builder stage
        text += header([f"No wheel, built from its sdist: {', '.join(sdists)}."])
    path.write_text(text + "\n" + "\n".join(body) + "\n")
    print(f"wrote {path.relative_to(REPO)} ({len(pins)} packages)")


def constraint_pins() -> dict[str, tuple[str, str]]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            out[canonicalize_name(match[1])] = (match[1], match[2])
    return out


def lock_operator(files: dict) -> None:
    """operator/requirements.txt: comments and order kept, hashes added or refreshed."""
    path = REPO / "operator" / "requirements.txt"
    out = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("--hash="):
            continue  # continuation lines of the previous pin: regenerated below
        match = PIN.match(stripped)
        if match:
            out += locked(match[1], match[2], PY311, files)
        else:
            out.append(line)
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


def pyproject_roots() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def lock_images(files: dict) -> None:
    app = resolve(pyproject_roots(), PY311)
    about = [
        "Every requirement of pyproject.toml's [project] dependencies (the recjob package the",
        "image installs with --no-deps), resolved under constraints.txt, EXCEPT torch: the",
        "Dockerfile installs torch==2.13.0+cpu from download.pytorch.org/whl/cpu in its own",
        "step (that index's hashes could not be fetched where this was generated), and the",
        "nvidia-*/triton packages only PyPI's CUDA torch wheel requires are left out.",
    ]
    pins = constraint_pins()
    tools = [pins.get(canonicalize_name(t)) for t in BUILD_TOOLS]
    if None in tools:  # not in constraints.txt: uv's choice, pinned here
        tools = resolve(BUILD_TOOLS, PY311)
    for image in ("trainer", "serving"):
        write_lock(REPO / image / "requirements.lock", about, app, PY311, files)
        write_lock(
            REPO / image / "requirements-build.lock",
            ["Build tools for the sdists of requirements.lock (deepspeed), installed first:",
             "those are built with --no-build-isolation (deepspeed's setup.py needs torch)."],
            tools, PY311, files,
        )  # fmt: skip
    lock_federated(app, files)
    triton = resolve(["transformers", "tokenizers", "faiss-cpu"], PY312)
    write_lock(
        REPO / "serving" / "triton-requirements.lock",
        ["transformers and tokenizers (the tokenizer model), faiss-cpu (the top-k model),",
         "constraints.txt's versions, with their requirements,",
         "for nvcr.io/nvidia/tritonserver:25.10-py3 (CPython 3.12, Ubuntu 24.04)."],
        triton, PY312, files,
    )  # fmt: skip


def lock_federated(app: list[tuple[str, str]], files: dict) -> None:
    """trainer/requirements-federated.lock (module docstring)."""
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["federated"]
    flwr = next(r for r in extra if canonicalize_name(re.split(r"[=<>\[ ]", r)[0]) == "flwr")
    rest = [r for r in extra if r != flwr]
    have = {canonicalize_name(n) for n, _ in app}
    pins = [p for p in resolve(rest, PY311) if canonicalize_name(p[0]) not in have]
    pins.append(("flwr", flwr.split("==")[1]))
    write_lock(
        REPO / "trainer" / "requirements-federated.lock",
        ["Flower's deployment engine and Opacus (pyproject's federated extra) on top of",
         "requirements.lock: the extra less flwr resolved under constraints.txt, less what",
         "requirements.lock holds, plus flwr (its caps below the lock's typer, rich,",
         "packaging, fastapi, starlette, uvicorn are why it goes in with --no-deps)."],
        sorted(pins, key=lambda p: p[0].lower()), PY311, files,
    )  # fmt: skip


def verify_downloads(files: dict) -> None:
    """pip download every chosen file and compare pip hash with the recorded sha256."""
    lock_files = [
        REPO / "operator" / "requirements.txt",
        *(REPO / d / f for d in ("trainer", "serving") for f in ("requirements.lock",)),
        REPO / "trainer" / "requirements-federated.lock",
        REPO / "serving" / "triton-requirements.lock",
    ]
    recorded = set()
    for path in lock_files:
        if not path.exists():
            continue
        recorded |= set(re.findall(r"--hash=sha256:([0-9a-f]{64})", path.read_text()))
    env = {**os.environ, "PIP_FIND_LINKS": ""}  # PyPI's files only
    with tempfile.TemporaryDirectory() as tmp:
        for (name, version, python), filenames in sorted(files.items()):
            base = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
            base += ["--index-url", INDEX, f"{name}=={version}"]
            if all(f.endswith(".tar.gz") for f in filenames):
                command = [*base, "--no-binary=:all:"]
            else:
                command = [*base, "--only-binary=:all:", "--python-version"]
                command += [f"{python[0]}.{python[1]}", "--implementation", "cp"]
                for platform in ("manylinux_2_28_x86_64", "manylinux2014_x86_64"):
                    command += ["--platform", platform]
            subprocess.run(command, env=env, capture_output=True, check=True)
        downloaded = list(Path(tmp).iterdir())
        for path in downloaded:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in recorded:
                raise SystemExit(f"{path.name}: downloaded sha256 {digest} not in the locks")
        print(f"verified {len(downloaded)} downloaded files against the locks' hashes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operator-only", action="store_true")
    parser.add_argument("--verify-downloads", action="store_true")
    args = parser.parse_args()
    files: dict = {}
    lock_operator(files)
    if not args.operator_only:
        lock_images(files)
    if args.verify_downloads:
        verify_downloads(files)


if __name__ == "__main__":
    main()
