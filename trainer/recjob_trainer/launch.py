"""`recjob-train --launch`: a PyTorchJob pod's command, torchrun from the pod's variables.

The Kubeflow Training Operator (v1.9) injects into each pod of a PyTorchJob:
``PET_NNODES`` (1 + workers), ``PET_NPROC_PER_NODE`` (``spec.nprocPerNode``),
``PET_NODE_RANK`` (0 for the master, i+1 for worker i), ``PET_MASTER_ADDR``
(``<job>-master-0``) and ``PET_MASTER_PORT`` (the ``pytorchjob-port`` container port), plus
``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` (nodes x processes) and ``RANK`` (the
pod's *node* rank). One trainer process per pod would only fill the world with one
process per node, so each pod replaces itself with torchrun, which starts
``PET_NPROC_PER_NODE`` trainer processes and gives each its own ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (overriding the pod-level ones).

The options are passed explicitly rather than left to torchrun's own ``PET_*`` defaults,
so that a pod without them fails at once instead of training alone.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

#: torchrun option <- the Training Operator's variable (static rendezvous on the master).
TORCHRUN_OPTIONS = {
    "--nnodes": "PET_NNODES",
    "--nproc-per-node": "PET_NPROC_PER_NODE",
    "--node-rank": "PET_NODE_RANK",
    "--master-addr": "PET_MASTER_ADDR",
    "--master-port": "PET_MASTER_PORT",
}


class LaunchError(RuntimeError):
    """The environment is not a PyTorchJob pod's."""


def torchrun_command(env: Mapping[str, str], trainer_args: Sequence[str]) -> list[str]:
    """The torchrun command line running ``recjob_trainer trainer_args`` on this pod."""
    missing = [name for name in TORCHRUN_OPTIONS.values() if not env.get(name)]
    if missing:
        raise LaunchError(
            f"--launch needs the Kubeflow Training Operator's variables; missing: "
            f"{', '.join(missing)}"
        )
    options = [f"{option}={env[name]}" for option, name in TORCHRUN_OPTIONS.items()]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",  # torchrun, with this interpreter
        *options,
        "-m",
        "recjob_trainer",
        *trainer_args,
    ]


def exec_torchrun(trainer_args: Sequence[str]) -> None:
    """Replace this process with torchrun (it becomes the container's main process and
    forwards signals to the trainer processes). Does not return."""
    argv = torchrun_command(os.environ, trainer_args)
    print(f"recjob-train --launch: {shlex.join(argv)}", file=sys.stderr, flush=True)
    os.execv(argv[0], argv)
