"""The trainer silences exactly the deprecation warnings DeepSpeed's ZeRO collectives
raise on torch 2.13 (thousands of them in a ZeRO-3 log), checked against torch's real
warnings: the real collectives are called on a one-process gloo group."""

from __future__ import annotations

import contextlib
import socket
import warnings

import pytest
import torch
import torch.distributed as dist

from recjob_trainer.distributed import quiet_deprecated_collectives


@pytest.fixture
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def collective_warnings(quiet: bool) -> list[str]:
    """The FutureWarnings of the collectives DeepSpeed calls (and of one it does not)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as after the registry resets that flooded logs
        if quiet:
            quiet_deprecated_collectives()
        x = torch.ones(4)
        for _ in range(3):
            dist.all_gather_into_tensor(torch.empty(4), x)
            with contextlib.suppress(RuntimeError):  # gloo may not implement it: the
                dist.reduce_scatter_tensor(torch.empty(4), x)  # warning comes first
        dist._all_gather_base(torch.empty(4), x)  # deprecated too, but not DeepSpeed's
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_only_deepspeeds_deprecated_collectives_are_silenced(world_of_one) -> None:
    loud = collective_warnings(quiet=False)
    assert sum("`torch.distributed.all_gather_into_tensor` is deprecated" in w for w in loud) == 3
    assert sum("`torch.distributed.reduce_scatter_tensor` is deprecated" in w for w in loud) == 3
    quiet = collective_warnings(quiet=True)
    assert quiet == [w for w in loud if "_all_gather_base" in w] and len(quiet) == 1
