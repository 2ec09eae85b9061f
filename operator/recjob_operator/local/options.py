"""The knobs of local mode (``recjob run`` options) that a cluster sets elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api.v1alpha1.recjob import RecJob
from ..prometheus import DEFAULT_SOURCE, PrometheusSources


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
    """The replayed user clicks when the chosen item is in the top ``replay_k`` of its
    20 candidates."""
    replay_topk: int = 10
    """A sequential recommender is asked for the top ``replay_topk`` of the whole catalog;
    the user clicks when the item they chose next is among them (live click-through then
    estimates the offline full-catalog HR@10, the live gain its NDCG@10)."""
    prometheus_url: str | None = None
    """The default Prometheus (it must scrape the router and label its series with the
    RecJob's namespace) instead of a private one."""
    prometheus_sources: dict[str, str] = field(default_factory=dict)
    """Named Prometheus servers a RecJob may pick with spec.rollout.prometheus."""
    scrape_seconds: float = 1.0
    server_start_timeout: float = 180.0

    def sources(self) -> PrometheusSources:
        """The Prometheus servers this run may read, by name (ValueError if malformed)."""
        urls = dict(self.prometheus_sources)
        if self.prometheus_url:
            urls[DEFAULT_SOURCE] = self.prometheus_url
        return PrometheusSources(urls)


def local_namespace(recjob: RecJob) -> str:
    """The namespace a local run's series and queries carry (metadata.namespace, else
    "local")."""
    return recjob.metadata.namespace or "local"
