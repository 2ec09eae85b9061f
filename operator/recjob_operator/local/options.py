"""The knobs of local mode (``recjob run`` options) that a cluster sets elsewhere."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LocalOptions:
    """Knobs of local mode that a cluster sets elsewhere."""

    eval_groups: int | None = 500
    """Cap on held-out queries / users the trainer and the quality gate evaluate."""
    baselines: bool = True
    """Also evaluate the baselines (BM25 / popularity, zero-shot) beside the model."""
    replay_rate: float = 8.0
    """Impressions per second the replay driver sends."""
    replay_k: int = 5
    prometheus_url: str | None = None
    """Use this Prometheus (it must scrape the router) instead of a private one."""
    scrape_seconds: float = 1.0
    server_start_timeout: float = 180.0
