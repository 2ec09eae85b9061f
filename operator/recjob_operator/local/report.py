"""The end-of-run report of ``recjob run``: ``report.html`` with PNG charts and
``summary.json`` in ``<workdir>/<name>/g<N>/report/``.

Charts: training curves (the trainer's), quality vs baselines, quantized vs source model,
and the canary timeline (weight and each metric against its threshold). The live
business metric per revision (click-through of the replayed traffic, with a 95% Wilson
interval) comes from the router's counters saved when the run ended.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from prometheus_client.parser import text_string_to_metric_families

from ..api.v1alpha1.recjob import RecJob
from ..controller.identity import conversion_part, identity


def wilson(successes: float, trials: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if trials <= 0:
        return (math.nan, math.nan)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return (centre - half, centre + half)


def two_proportion_test(clicks_a: float, n_a: float, clicks_b: float, n_b: float) -> dict:
    """Difference of two click-through rates (b - a) with a two-sided z-test p-value."""
    if n_a <= 0 or n_b <= 0:
        return {"difference": None, "z": None, "p_value": None}
    p_a, p_b = clicks_a / n_a, clicks_b / n_b
    pooled = (clicks_a + clicks_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = (p_b - p_a) / se if se > 0 else 0.0
    return {"difference": p_b - p_a, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def live_business_metrics(metrics_text: str) -> dict[str, dict]:
    """Per revision: requests, errors, impressions, clicks, CTR (+ interval), mean gain."""
    out: dict[str, dict] = {}
    names = {
        "recjob_inference_requests": "requests",
        "recjob_inference_errors": "errors",
        "recjob_feedback_impressions": "impressions",
        "recjob_feedback_clicks": "clicks",
        "recjob_feedback_gain": "gain",
    }
    for family in text_string_to_metric_families(metrics_text):
        key = names.get(family.name.removesuffix("_total"))
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and "revision" in sample.labels:
                out.setdefault(sample.labels["revision"], {})[key] = sample.value
    for values in out.values():
        shown, clicks = values.get("impressions", 0.0), values.get("clicks", 0.0)
        values["ctr"] = clicks / shown if shown else None
        low, high = wilson(clicks, shown)
        values["ctr_ci95"] = [low, high] if shown else None
        values["mean_gain"] = values.get("gain", 0.0) / shown if shown else None
    return out


def _bar_chart(path: Path, title: str, values: dict[str, float], ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(values)
    ax.bar(names, [values[n] for n in names], color=["#4c72b0"] + ["#999999"] * (len(names) - 1))
    for i, name in enumerate(names):
        ax.annotate(f"{values[name]:.4f}", (i, values[name]), ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    low = min(values.values())
    ax.set_ylim(max(0.0, low - (max(values.values()) - low) * 2 - 0.01), None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _timeline_chart(path: Path, recjob: RecJob) -> bool:
    rollout = recjob.status.rollout if recjob.status else None
    if rollout is None or not rollout.history:
        return False
    spec = recjob.spec.rollout
    start = rollout.started_at or rollout.history[0].time
    metrics = [m.name for m in spec.metrics]
    fig, axes = plt.subplots(
        len(metrics) + 1, 1, figsize=(7, 2.0 * (len(metrics) + 1)), sharex=True
    )
    seconds = [(r.time - start).total_seconds() for r in rollout.history]
    weight_points = [(s, r.weight) for s, r in zip(seconds, rollout.history, strict=True)]
    times = [0.0] + [s for s, _ in weight_points]
    weights = [spec.steps[0]] + [w for _, w in weight_points]
    end = recjob.status.completion_time
    if end is not None and rollout.state in ("RolledBack", "Promoted"):
        times.append((end - start).total_seconds())
        weights.append(0 if rollout.state == "RolledBack" else 100)
    axes[0].step(times, weights, where="post")
    axes[0].set_ylabel("canary %")
    axes[0].set_ylim(0, 105)
    for ax, name in zip(axes[1:], metrics, strict=True):
        records = [
            (s, r) for s, r in zip(seconds, rollout.history, strict=True) if r.metric == name
        ]
        colours = {"pass": "green", "fail": "red", "no-data": "grey", "error": "orange"}
        for s, r in records:
            if r.value is not None:
                ax.scatter([s], [r.value], color=colours[r.verdict], zorder=3)
        ax.plot([s for s, r in records if r.value is not None],
                [r.value for s, r in records if r.value is not None], color="#4c72b0")  # fmt: skip
        check = next(m for m in spec.metrics if m.name == name)
        if check.min is not None:
            ax.axhline(check.min, color="red", linestyle="--", label=f"min {check.min:g}")
        if check.max is not None:
            ax.axhline(check.max, color="red", linestyle=":", label=f"max {check.max:g}")
        ax.set_ylabel(name, fontsize=8)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("seconds since the canary started")
    fig.suptitle(f"canary of {rollout.canary_revision}: {rollout.state}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(recjob: RecJob, workdir: Path) -> Path:
    """Write the report of the RecJob's current generation; returns report.html."""
    workdir = workdir.resolve()
    ident = identity(recjob)
    generation = workdir / recjob.metadata.name / f"g{ident.model_generation}"
    out = generation / "report"
    out.mkdir(parents=True, exist_ok=True)
    status = recjob.status
    assert status is not None
    charts: list[tuple[str, str]] = []
    train = generation / "train"
    metrics = (
        json.loads((train / "metrics.json").read_text())
        if (train / "metrics.json").exists()
        else None
    )
    if (train / "curves.png").exists():
        shutil.copyfile(train / "curves.png", out / "training-curves.png")
        charts.append(("Training curves", "training-curves.png"))
    if metrics:
        main = metrics.get("main_metric")
        values = {"fine-tuned": metrics["model"].get(main)}
        for name, baseline in (metrics.get("baselines") or {}).items():
            if isinstance(baseline, dict) and baseline.get(main) is not None:
                values[name] = baseline[main]
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            _bar_chart(out / "quality-vs-baselines.png", f"held-out {main}", values, main)
            charts.append(("Quality vs baselines", "quality-vs-baselines.png"))
    gate_path = generation / conversion_part(ident.conversion_revision) / "quality-gate.json"
    gate = json.loads(gate_path.read_text()) if gate_path.exists() else None
    if gate and gate.get("source_value") is not None:
        _bar_chart(
            out / "quantized-vs-source.png",
            f"quality gate ({gate.get('target')})",
            {"source (PyTorch)": gate["source_value"], "converted": gate["converted_value"]},
            gate["metric"],
        )
        charts.append(("Quantized vs source", "quantized-vs-source.png"))
    if _timeline_chart(out / "canary-timeline.png", recjob):
        charts.append(("Canary timeline", "canary-timeline.png"))
    live_path = generation / "live-metrics.prom"
    live = live_business_metrics(live_path.read_text()) if live_path.exists() else {}
    rollout = status.rollout
    comparison = None
    if rollout and rollout.stable_revision in live and rollout.canary_revision in live:
        a, b = live[rollout.stable_revision], live[rollout.canary_revision]
        comparison = {
            "stable": rollout.stable_revision,
            "canary": rollout.canary_revision,
            **two_proportion_test(
                a.get("clicks", 0.0), a.get("impressions", 0.0),
                b.get("clicks", 0.0), b.get("impressions", 0.0),
            ),
        }  # fmt: skip
    summary = {
        "name": recjob.metadata.name,
        "generation": recjob.generation,
        "model_generation": ident.model_generation,
        "phase": status.phase,
        "message": status.message,
        "quality": status.quality.model_dump(mode="json") if status.quality else None,
        "training_metrics": metrics["model"] if metrics else None,
        "baselines": metrics.get("baselines") if metrics else None,
        "quality_gate": {
            k: gate.get(k)
            for k in (
                "metric",
                "source_value",
                "converted_value",
                "relative_drop",
                "budget",
                "rank_correlation",
                "passed",
                "target",
            )
        }
        if gate
        else None,
        "rollout": status.rollout.model_dump(mode="json", by_alias=True)
        if status.rollout
        else None,
        "live_by_revision": live,
        "canary_vs_stable_ctr": comparison,
        "charts": [c[1] for c in charts],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    rows = "".join(
        f"<tr><td>{html.escape(rev)}</td><td>{v.get('impressions', 0):.0f}</td>"
        f"<td>{v.get('clicks', 0):.0f}</td><td>{_fmt(v.get('ctr'))}</td>"
        f"<td>{_fmt_ci(v.get('ctr_ci95'))}</td><td>{_fmt(v.get('mean_gain'))}</td>"
        f"<td>{v.get('requests', 0):.0f}</td><td>{v.get('errors', 0):.0f}</td></tr>"
        for rev, v in sorted(live.items())
    )
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>"
        for title, name in charts
    )
    history = ""
    if status.rollout and status.rollout.history:
        lines = "".join(
            f"<tr><td>{r.time:%H:%M:%S}</td><td>{r.weight}%</td>"
            f"<td>{html.escape(r.message or r.verdict)}</td></tr>"
            for r in status.rollout.history
        )
        history = (
            "<h2>Canary analyses</h2><table><tr><th>time</th><th>weight</th>"
            f"<th>result</th></tr>{lines}</table>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>RecJob {html.escape(recjob.metadata.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
td,th{{padding:2px 8px;text-align:left}} img{{max-width:100%}}</style></head><body>
<h1>RecJob {html.escape(recjob.metadata.name)} (generation {recjob.generation}):
{html.escape(status.phase)}</h1><p>{html.escape(status.message or "")}</p>
<h2>Live traffic by revision</h2>
<table><tr><th>revision</th><th>impressions</th><th>clicks</th><th>CTR@k</th><th>95% CI</th>
<th>mean NDCG@k</th><th>requests</th><th>errors</th></tr>{rows}</table>
{_comparison_html(comparison)}
{images}{history}
<p>Raw numbers: summary.json</p></body></html>"""
    (out / "report.html").write_text(page)
    return out / "report.html"


def _comparison_html(comparison: dict | None) -> str:
    if not comparison or comparison.get("difference") is None:
        return ""
    return (
        f"<p>Canary {html.escape(comparison['canary'])} vs stable "
        f"{html.escape(comparison['stable'])}: CTR difference "
        f"{comparison['difference']:+.4f} (two-proportion z = {comparison['z']:.2f}, "
        f"p = {comparison['p_value']:.3g})</p>"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_ci(value: list[float] | None) -> str:
    return "-" if not value else f"[{value[0]:.3f}, {value[1]:.3f}]"
