"""The test cluster's node agent and NetworkPolicy enforcer (hack/cluster, Go): their unit
tests, run with the Go toolchain that builds the cluster (`go test`, module proxy as
`make cluster` uses it). Their behaviour with real pods is tested by tests/cluster."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.conftest import REPO


def test_node_agent_go_unit_tests_pass() -> None:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    result = subprocess.run(
        # -trimpath as cluster.py builds: the dependencies then come from Go's build cache
        # (32 s here; 354 s without, recompiling client-go)
        [go, "test", "-trimpath", "-count=1", "./internal/agent/", "./internal/netpol/"],
        cwd=REPO / "hack" / "cluster",
        env={**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for package in ("agent", "netpol"):
        assert f"ok  \trecjob.dev/hack/cluster/internal/{package}" in result.stdout, result.stdout
