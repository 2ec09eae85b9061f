"""Local stand-ins for the container images the test cluster's pods run.

Images cannot be pulled here, so each image reference maps to a local environment that
holds what that image's Dockerfile installs, nothing more (a dependency missing from an
image fails here as it would in a cluster):

- ``ghcr.io/recjob/recjob-operator``: operator/Dockerfile — Python 3.11, exactly the
  packages of operator/requirements.txt (``--no-deps``), a copy of
  operator/recjob_operator on PYTHONPATH (/opt/recjob in the image); USER 65532.
- ``ghcr.io/recjob/recjob-trainer`` and ``ghcr.io/recjob/recjob-serving``:
  trainer/Dockerfile and serving/Dockerfile — Python 3.11 and ``pip install -c
  constraints.txt .`` (both install the same set; different ENTRYPOINT); USER 1000. The
  trainer image also holds trainer/requirements-federated.lock (Flower), which the serving
  pods never import.
- ``alpine:3.10`` (the Training Operator's ``init-pytorch`` container): BusyBox.
- ``ghcr.io/kubeflow/training-v1/training-operator``: ``/manager``, the Training
  Operator built from its Go module at the pinned version.
- ``kserve/kserve-controller``: ``/manager``, the KServe controller built from its Go
  module at the pinned version (distroless, USER 65532).

Python environments are made with uv from Debian's /usr/bin/python3.11 (world-readable,
as an image's interpreter is to its non-root user), from uv's cache (hard links: a
second environment with torch costs seconds). The project is installed as a copy, like
a Dockerfile's COPY, and reinstalled when its sources change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3.11"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # trainer/serving Dockerfiles


def _uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).exists():
        raise SystemExit("uv is missing: make install puts it in .venv")
    return found


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt", "operator/requirements.txt",
                 "trainer/requirements-federated.lock"):  # fmt: skip
        path = REPO / name
        if path.exists():
            digest.update(path.read_bytes())
    for folder in ("operator", "trainer", "serving"):
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _python_env(
    target: Path, requirements: list[str], digest: str, log, project: bool = True
) -> None:
    """A venv at ``target`` with ``requirements`` (pip arguments); the project installed
    as a copy (``project``), or else operator/recjob_operator copied to ``target/app``."""
    stamp = target / ".recjob-image"
    if stamp.exists() and stamp.read_text() == digest:
        return
    uv = _uv()
    env = {**os.environ, "UV_LINK_MODE": "hardlink", "UV_PYTHON_DOWNLOADS": "never"}
    if not (target / "bin" / "python").exists():
        log(f"image env {target.name}: creating (first time: downloads wheels into uv's cache)")
        subprocess.run(
            [uv, "venv", "--quiet", "--python", PYTHON, str(target)], check=True, env=env
        )
    install = [uv, "pip", "install", "--quiet", "--python", str(target / "bin" / "python")]
    subprocess.run(
        [*install, "-c", str(REPO / "constraints.txt"), *requirements], check=True, env=env
    )
    if project:
        subprocess.run(
            [*install, "--no-deps", "--reinstall-package", "recjob", str(REPO)], check=True, env=env
        )
        # trainer/Dockerfile's Flower layer (federated RecJobs' SuperLink and SuperNodes)
        subprocess.run(
            [*install, "--no-deps", "-r", str(REPO / "trainer" / "requirements-federated.lock")],
            check=True, env=env,
        )  # fmt: skip
        _prebuilt_deepspeed_ops(target, install, env, log)
    else:
        app = target / "app"
        shutil.rmtree(app, ignore_errors=True)
        shutil.copytree(REPO / "operator" / "recjob_operator", app / "recjob_operator",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    stamp.write_text(digest)


#: DeepSpeed ops trainer/Dockerfile pre-builds (DS_BUILD_<OP>=1) that the cluster's pods
#: reach: the CPU collectives every trainer process loads when DeepSpeed starts. Without
#: them every training pod JIT-compiles the op into its emptyDir HOME, 75 s of CPU each,
#: where the image (no compiler) loads the pre-built one. cpu_adam and async_io, which
#: the Dockerfile also pre-builds, are reached only with optimizer / NVMe offload, which no
#: cluster test runs: they would JIT-build here when reached (async_io needs libaio-dev).
PREBUILT_OPS = {"DS_BUILD_SHM_COMM": "deepspeed_shm_comm"}


def _prebuilt_deepspeed_ops(target: Path, install: list[str], env: dict, log) -> None:
    """Reinstall DeepSpeed in ``target`` with :data:`PREBUILT_OPS` compiled, as
    trainer/Dockerfile does (``--no-build-isolation``: its setup.py compiles against the
    env's torch), unless they are there already; fails if setup.py skipped one."""
    python = str(target / "bin" / "python")
    probe = (
        "import sys; from deepspeed.git_version_info import installed_ops as o; "
        f"sys.exit(0 if all(o.get(n) for n in {sorted(PREBUILT_OPS.values())!r}) else 1)"
    )
    quiet = {**env, "DS_ACCELERATOR": "cpu"}
    if subprocess.run([python, "-c", probe], env=quiet, capture_output=True).returncode == 0:
        return
    log(f"image env {target.name}: pre-building DeepSpeed ops {sorted(PREBUILT_OPS.values())}")
    switches = {"DS_BUILD_OPS": "0", **dict.fromkeys(PREBUILT_OPS, "1")}
    subprocess.run(  # --no-cache: uv's cached DeepSpeed wheel was built without the ops
        [*install, "--no-deps", "--no-build-isolation", "--no-cache", "--reinstall-package",
         "deepspeed", "-c", str(REPO / "constraints.txt"), "deepspeed"],
        check=True, env={**env, **switches},
    )  # fmt: skip
    if subprocess.run([python, "-c", probe], env=quiet, capture_output=True).returncode != 0:
        raise SystemExit(f"DeepSpeed ops not pre-built in {target}: {PREBUILT_OPS}")


def build(state: Path, training_operator: Path, kserve_manager: Path, log=print) -> Path:
    """Build every image environment under ``state/images``; return the catalog path."""
    images = state / "images"
    images.mkdir(parents=True, exist_ok=True)
    digest = _sources_digest()
    operator_env = ["--no-deps", "-r", str(REPO / "operator" / "requirements.txt")]
    _python_env(images / "recjob-operator", operator_env, digest, log, project=False)
    # the ops in the stamp: an env made before they were pre-built is redone
    _python_env(images / "recjob-full", [str(REPO)], f"{digest}+{'+'.join(PREBUILT_OPS)}", log)

    busybox = images / "busybox" / "bin"
    busybox.mkdir(parents=True, exist_ok=True)
    bb = shutil.which("busybox") or "/bin/busybox"
    applets = subprocess.run(
        [bb, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:  # Alpine's base: BusyBox and its applets
        link = busybox / applet
        if not link.exists():
            link.symlink_to(bb)

    def python_image(
        env: str, entrypoint: list[str], user: str, workdir: str, **extra: str
    ) -> dict:
        root = images / env
        return {
            "env": {
                "PATH": f"{root}/bin:{SYSTEM_PATH}",
                "VIRTUAL_ENV": str(root),
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PIP_NO_CACHE_DIR": "1",
                **extra,
            },
            "entrypoint": entrypoint,
            "user": user,
            "workingDir": workdir,
        }

    catalog = {
        "images": {
            "ghcr.io/recjob/recjob-operator:*": python_image(
                "recjob-operator",
                [
                    "kopf",
                    "run",
                    "--standalone",
                    "--all-namespaces",
                    "-m",
                    "recjob_operator.kube.handlers",
                ],
                "65532:65532",
                "/opt/recjob",
                PYTHONPATH=str(images / "recjob-operator" / "app"),
                USER="recjob-operator",
            ),
            "ghcr.io/recjob/recjob-trainer:*": python_image(
                "recjob-full", ["recjob-train"], "1000:1000", "/opt/recjob", **OFFLINE
            ),
            "ghcr.io/recjob/recjob-serving:*": python_image(
                "recjob-full", ["recjob-serve"], "1000:1000", "/opt/recjob", **OFFLINE
            ),
            "alpine:3.10": {"env": {"PATH": str(busybox)}, "entrypoint": [], "user": ""},
            "ghcr.io/kubeflow/training-v1/training-operator:*": {
                "env": {"PATH": SYSTEM_PATH},
                "files": {"/manager": str(training_operator)},
                "entrypoint": ["/manager"],
                "user": "",
            },
            # KServe's Dockerfile: distroless/static:nonroot, COPY manager, USER 65532
            "kserve/kserve-controller:*": {
                "env": {"PATH": SYSTEM_PATH},
                "files": {"/manager": str(kserve_manager)},
                "entrypoint": ["/manager"],
                "user": "65532:65532",
            },
        }
    }
    path = state / "images.json"
    path.write_text(json.dumps(catalog, indent=2))
    return path
