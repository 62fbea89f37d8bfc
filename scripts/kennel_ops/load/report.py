"""The load-test report: JSON for machines (the autoscale command reads it), a
text table for people, and a latency-vs-throughput plot."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kennel_ops.load.stats import StepSummary, max_sustainable, recommended_invocations_per_instance

REPORT_FORMAT = 1
METHOD = "max sustainable requests/s per instance x 60 x safety factor (invocations per instance per minute)"


@dataclass
class ConfigurationResult:
    """One serving configuration (workers x engine threads) and its ramp."""

    settings: dict[str, Any]  # e.g. {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", ...}; {} = image defaults
    steps: list[StepSummary]
    stopped_because: str
    target_p99_s: float
    notes: list[str] = field(default_factory=list)
    layout: dict[str, int] | None = None  # what the server chose: {"workers": 2, "threads": 1, "solo_threads": 2}
    cloudwatch: dict[str, Any] | None = None  # a SageMaker endpoint's own metrics for the run (endpoint_metrics)
    precision: str | None = None  # the graph that answered (X-Kennel-Precision: "int8; setting=auto; ..."), if said

    @property
    def label(self) -> str:
        label = ", ".join(f"{k}={v}" for k, v in self.settings.items()) or "image defaults"
        if self.layout:
            solo = self.layout.get("solo_threads")
            label += (f" ({self.layout['workers']} workers x {self.layout['threads']} engine threads"
                      + (f", {solo} for a request alone" if solo and solo != self.layout["threads"] else "") + ")")
        return label

    @property
    def short_label(self) -> str:
        """For the plot legend: the layout when known, else the settings."""
        if self.layout:
            return f"{self.layout['workers']} workers x {self.layout['threads']} threads"
        short = {"SAGEMAKER_MODEL_SERVER_WORKERS": "workers", "KENNEL_ORT_THREADS": "threads"}
        return ", ".join(f"{short.get(k, k)}={v}" for k, v in self.settings.items()) or "image defaults"

    @property
    def best_step(self) -> StepSummary | None:
        return max_sustainable(self.steps, self.target_p99_s)

    @property
    def max_rate(self) -> float:
        best = self.best_step
        return best.throughput if best else 0.0

    def to_json(self) -> dict[str, Any]:
        best = self.best_step
        return {"label": self.label, "settings": self.settings, "layout": self.layout, "precision": self.precision,
                "stopped_because": self.stopped_because,
                "max_sustainable_rps": self.max_rate,
                "at_concurrency": best.concurrency if best else None,
                "latency_at_max_s": best.latency if best else None,
                "cpu_percent_at_max": best.cpu_percent if best else None,
                # Answers per second of container CPU: what a host shared with other work cannot
                # hide (the rate falls with the CPU share, this does not), for sizing other machines.
                "requests_per_cpu_second_at_max": (best.throughput / (best.cpu_percent / 100)
                                                   if best and best.cpu_percent else None),
                "steps": [s.to_json() for s in self.steps], "notes": self.notes, "cloudwatch": self.cloudwatch}


def build_report(results: list[ConfigurationResult], *, url: str, target_p99_s: float, safety_factor: float,
                 settings: dict[str, Any], host_note: str = "") -> dict[str, Any]:
    """The whole report. recommended_invocations_per_instance is None when no step passed."""
    best = max(results, key=lambda r: r.max_rate, default=None)
    max_rate = best.max_rate if best else 0.0
    recommended = recommended_invocations_per_instance(max_rate, safety_factor) if max_rate > 0 else None
    return {
        "report_format": REPORT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "url": url,
        "host": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "machine": platform.machine(),
                 "system": platform.platform(), "python": platform.python_version(), "note": host_note},
        "criteria": {"success_rate": 1.0, "target_p99_s": target_p99_s},
        "settings": settings,
        "max_sustainable_rps": max_rate,
        "best_configuration": best.to_json() if best and max_rate > 0 else None,
        "safety_factor": safety_factor,
        "recommended_invocations_per_instance": recommended,
        "recommendation_method": METHOD,
        "configurations": [r.to_json() for r in results],
    }


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: a reader (the autoscale command) never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(sanitize(report), tmp, indent=2, allow_nan=False)
        tmp.write("\n")
    os.replace(tmp.name, path)
    return path


def sanitize(value: Any) -> Any:
    """NaN/inf (no successful request in a step) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    return value


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1000:.0f}"


def step_table(steps: list[StepSummary]) -> str:
    """One line per step; `work` is the p50 of the server's own time per answer (Server-Timing),
    so p50 - work is what requests spent queued and in transit."""
    header = (f"{'clients':>7} {'requests':>8} {'ok':>7} {'req/s':>7} {'p50':>6} {'p90':>6} {'p95':>6} "
              f"{'p99':>6} {'max':>6} {'work':>6} {'cpu%':>6} {'MiB':>6} {'gen%':>5} {'load':>5}  errors")
    lines = [header, f"{'':>7} {'':>8} {'':>7} {'':>7}" + f" {'ms':>6}" * 6]
    for s in steps:
        cpu = "-" if s.cpu_percent is None else f"{s.cpu_percent:.0f}"
        mem = "-" if s.memory_mib is None else f"{s.memory_mib:.0f}"
        load = "-" if s.host_load is None else f"{s.host_load:.1f}"
        client = "-" if s.client_cpu_percent is None else f"{s.client_cpu_percent:.0f}"
        work = "-" if s.worker_p50 is None else _ms(s.worker_p50)
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or ""
        lines.append(f"{s.concurrency if s.concurrency is not None else '-':>7} {s.requests:>8} "
                     f"{s.success_rate:>7.1%} {s.throughput:>7.2f} {_ms(s.latency['p50']):>6} "
                     f"{_ms(s.latency['p90']):>6} {_ms(s.latency['p95']):>6} {_ms(s.latency['p99']):>6} "
                     f"{_ms(s.latency['max']):>6} {work:>6} {cpu:>6} {mem:>6} {client:>5} {load:>5}  {errors}")
    return "\n".join(lines)


def summary_text(report: dict[str, Any]) -> str:
    """What the command prints at the end."""
    lines = []
    best = report["best_configuration"]
    if best is None:
        lines.append(f"no step kept 100% success with p99 <= {report['criteria']['target_p99_s']:.2f} s: "
                     "no recommendation (see the steps above)")
        return "\n".join(lines)
    lines.append(f"max sustainable rate: {report['max_sustainable_rps']:.2f} requests/s per instance "
                 f"({best['label']}, {best['at_concurrency']} concurrent clients, "
                 f"p99 {_ms(best['latency_at_max_s']['p99'])} ms)")
    if best.get("precision"):  # an INT8 and an FP32 run size different instance counts: say which this was
        lines.append(f"answered by the {best['precision'].split(';')[0].strip().upper()} graph "
                     f"(X-Kennel-Precision: {best['precision']})")
    if best.get("requests_per_cpu_second_at_max"):
        lines.append(f"container CPU at that rate: {best['cpu_percent_at_max']:.0f}% of one core, "
                     f"{best['requests_per_cpu_second_at_max']:.2f} requests per CPU-second")
    lines.append(f"recommended SageMakerVariantInvocationsPerInstance: "
                 f"{report['recommended_invocations_per_instance']} "
                 f"(= {report['max_sustainable_rps']:.2f} x 60 x {report['safety_factor']})")
    if len(report["configurations"]) > 1:
        lines.append("configurations: " + "; ".join(
            f"{c['label']}: {c['max_sustainable_rps']:.2f}/s" for c in report["configurations"]))
    return "\n".join(lines)


def plot(results: list[ConfigurationResult], target_p99_s: float, path: str | Path, title: str) -> Path:
    """Latency (p50 and p99) against achieved throughput, one colour per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, result in enumerate(results):
        colour = colours[i % len(colours)]
        steps = [s for s in result.steps if s.successes]
        xs = [s.throughput for s in steps]
        ax.plot(xs, [s.latency["p50"] * 1000 for s in steps], "o--", color=colour, alpha=0.7,
                label=f"{result.short_label}: p50")
        ax.plot(xs, [s.latency["p99"] * 1000 for s in steps], "s-", color=colour, label=f"{result.short_label}: p99")
        for s in steps:
            ax.annotate(str(s.concurrency), (s.throughput, s.latency["p99"] * 1000), fontsize=7,
                        textcoords="offset points", xytext=(3, 4), color=colour)
        best = result.best_step
        if best is not None:
            ax.plot([best.throughput], [best.latency["p99"] * 1000], "*", color=colour, markersize=14)
    ax.axhline(target_p99_s * 1000, color="grey", linestyle=":", label=f"p99 target {target_p99_s * 1000:.0f} ms")
    ax.set_xlabel("throughput (successful requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: ""))
    ax.set_xlim(left=0)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
