"""What a run means: percentiles, step summaries, the max sustainable rate, the
auto-scaling recommendation and trends (memory growth) over a run."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

from kennel_ops.load.client import Run

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics
    (numpy's default method). NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class StepSummary:
    """One step of load: what was offered, what was achieved, how long answers took (seconds)."""

    concurrency: int | None
    offered_rate: float | None
    requests: int
    successes: int
    duration_s: float
    throughput: float  # successful answers per second over the step
    latency: dict[str, float]  # p50, p90, p95, p99, max, mean of successful requests
    errors: dict[str, int] = field(default_factory=dict)
    cpu_percent: float | None = None  # container CPU, 100 = one core
    memory_mib: float | None = None
    host_load: float | None = None  # the host's 1-minute load average at the end of the step
    client_cpu_percent: float | None = None  # the load generator's own CPU (it shares small hosts)
    worker_p50: float | None = None  # the server's own time per answer (Server-Timing: worker), median

    @property
    def success_rate(self) -> float:
        return self.successes / self.requests if self.requests else 0.0

    @property
    def p50(self) -> float:
        return self.latency["p50"]

    @property
    def p99(self) -> float:
        return self.latency["p99"]

    def to_json(self) -> dict:
        data = asdict(self)
        data["success_rate"] = self.success_rate
        return data


def summarize(run: Run) -> StepSummary:
    """Summarise a run; latencies are those of successful requests (failures are counted in errors)."""
    good = [o.latency for o in run.outcomes if o.ok]
    latency = {f"p{q}": percentile(good, q) for q in PERCENTILES}
    latency["max"] = max(good) if good else math.nan
    latency["mean"] = sum(good) / len(good) if good else math.nan
    errors = Counter(o.error for o in run.outcomes if not o.ok)
    duration = max(run.elapsed, 1e-9)
    worker = [o.server_s for o in run.outcomes if o.ok and o.server_s is not None]
    return StepSummary(concurrency=run.concurrency, offered_rate=run.offered_rate,
                       requests=len(run.outcomes), successes=len(good), duration_s=duration,
                       throughput=len(good) / duration, latency=latency, errors=dict(errors),
                       worker_p50=percentile(worker, 50) if worker else None)


def failure_reason(step: StepSummary, target_p99_s: float) -> str | None:
    """Why a step does not count as sustainable, or None when it does."""
    if step.requests == 0:
        return "no requests completed"
    if step.successes < step.requests:
        return f"success {step.success_rate:.2%} < 100%"
    if not step.p99 <= target_p99_s:
        return f"p99 {step.p99 * 1000:.0f} ms > target {target_p99_s * 1000:.0f} ms"
    return None


def max_sustainable(steps: Iterable[StepSummary], target_p99_s: float) -> StepSummary | None:
    """The passing step (100% success, p99 within target) with the highest throughput."""
    passing = [s for s in steps if failure_reason(s, target_p99_s) is None]
    return max(passing, key=lambda s: s.throughput, default=None)


@dataclass
class Ramp:
    """A ramp of closed-loop steps at rising concurrency, and why it stopped."""

    steps: list[StepSummary]
    stopped_because: str


def ramp(run_step: Callable[[int], StepSummary], concurrencies: Sequence[int], target_p99_s: float,
         plateau_gain: float = 0.05, plateau_steps: int = 2) -> Ramp:
    """Run steps at rising concurrency until one fails the criteria, the throughput
    stops rising (plateau_steps passing steps in a row each under plateau_gain above
    the best so far: the server is saturated, more clients only queue), or the list ends."""
    if list(concurrencies) != sorted(set(concurrencies)) or not concurrencies or concurrencies[0] < 1:
        raise ValueError("concurrencies must be distinct positive integers in rising order")
    steps: list[StepSummary] = []
    best = 0.0
    flat = 0
    for concurrency in concurrencies:
        step = run_step(concurrency)
        steps.append(step)
        reason = failure_reason(step, target_p99_s)
        if reason is not None:
            return Ramp(steps, f"concurrency {concurrency}: {reason}")
        flat = flat + 1 if step.throughput < best * (1 + plateau_gain) else 0
        best = max(best, step.throughput)
        if flat >= plateau_steps:
            return Ramp(steps, f"throughput saturated: {plateau_steps} steps up to concurrency "
                               f"{concurrency} added less than {plateau_gain:.0%}")
    return Ramp(steps, f"reached the highest concurrency asked for ({concurrencies[-1]})")


def recommended_invocations_per_instance(max_rate_per_s: float, safety_factor: float) -> int:
    """SageMakerVariantInvocationsPerInstance target (invocations per instance per
    minute) by AWS's method: max sustainable requests/s x 60 x safety factor."""
    if not 0 < safety_factor <= 1:
        raise ValueError("safety factor must be in (0, 1]")
    if not max_rate_per_s > 0:
        raise ValueError("no sustainable rate was measured: nothing to recommend")
    return max(1, math.floor(max_rate_per_s * 60 * safety_factor))


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys over xs."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("need at least two (x, y) points")
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x values are equal")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    return slope, mean_y - slope * mean_x


@dataclass
class Trend:
    """The straight-line trend of a quantity over a window."""

    samples: int
    span_s: float
    slope_per_s: float
    growth: float  # slope x span: how much the line rises over the window
    median: float
    tolerance: float

    @property
    def flat(self) -> bool:
        return self.growth <= self.tolerance

    def to_json(self) -> dict:
        return dict(asdict(self), flat=self.flat)


def trend(times_s: Sequence[float], values: Sequence[float], abs_tolerance: float,
          rel_tolerance: float) -> Trend:
    """Fit a line; the trend is flat when its rise over the window is at most
    max(abs_tolerance, rel_tolerance x median value). A falling line is flat."""
    slope, _ = linear_fit(times_s, values)
    span = max(times_s) - min(times_s)
    median = percentile(values, 50)
    return Trend(samples=len(values), span_s=span, slope_per_s=slope, growth=slope * span, median=median,
                 tolerance=max(abs_tolerance, rel_tolerance * median))
