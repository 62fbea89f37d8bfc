#!/usr/bin/env python3
"""Load-test a kennel endpoint and recommend its auto-scaling target.

    make loadtest                                   # start `serve` on ./model, ramp, report
    kennel-loadtest --url http://127.0.0.1:8080/invocations --container kennel-serve-1
    kennel-loadtest --workers 1,2 --threads 1,2   # sweep serving layouts

A ramp of concurrent clients posts dog-photo-sized JPEGs (500x375) until a step
misses the criteria (100% success, p99 <= --target-p99) or the throughput stops
rising. The highest passing throughput is the instance's max sustainable rate;
the recommended SageMakerVariantInvocationsPerInstance is that rate x 60 x the
safety factor (AWS's method). Writes a JSON report (the autoscale command reads
its recommended_invocations_per_instance) and a latency-vs-throughput PNG.

Requests go only to the URL given or to the container this command starts on
127.0.0.1; every step is bounded in time and in requests.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

from kennel_ops.load import report as reports
from kennel_ops.load import serving
from kennel_ops.load.client import Target, run_closed_loop, wait_until_healthy, warm_up
from kennel_ops.load.docker_stats import ContainerSampler, mean_cpu, mean_memory_mib
from kennel_ops.load.payloads import dog_photos, load_photos
from kennel_ops.load.stats import StepSummary, ramp, summarize

DEFAULT_CONCURRENCY = "1,2,3,4,6,8,12,16,24,32"


class UsageError(Exception):
    pass


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    where = parser.add_argument_group("endpoint")
    where.add_argument("--url", help="POST target, e.g. http://127.0.0.1:8080/invocations "
                                     "(default: start the compose service `serve` on --model-dir)")
    where.add_argument("--model-dir", type=Path, default=Path("model"),
                       help="model folder the started container serves (default ./model)")
    where.add_argument("--container", help="with --url: a container name or id to sample CPU and memory from")
    where.add_argument("--wait", type=float, default=10.0,
                       help="with --url: seconds to wait for GET /ping to answer 200 (default 10)")
    where.add_argument("--workers", type=_int_list,
                       help="sweep SAGEMAKER_MODEL_SERVER_WORKERS over these values (started container only)")
    where.add_argument("--threads", type=_int_list,
                       help="sweep KENNEL_ORT_THREADS (engine threads per worker) over these values")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=_int_list, default=_int_list(DEFAULT_CONCURRENCY),
                      help=f"ramp of concurrent clients (default {DEFAULT_CONCURRENCY})")
    load.add_argument("--step-seconds", type=float, default=20.0, help="duration of each step (default 20)")
    load.add_argument("--step-max-requests", type=int, default=5000, help="request cap of each step (default 5000)")
    load.add_argument("--warmup-requests", type=int, default=20, help="unmeasured requests first (default 20)")
    load.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (default 30)")
    load.add_argument("--images", type=int, default=16, help="distinct generated 500x375 JPEGs to cycle (default 16)")
    load.add_argument("--photos", type=Path, help="use the .jpg files under this folder instead")
    crit = parser.add_argument_group("criteria and recommendation")
    crit.add_argument("--target-p99", type=float, default=1.0, help="p99 latency target in seconds (default 1)")
    crit.add_argument("--safety-factor", type=float, default=0.5, help="AWS's safety factor (default 0.5)")
    out = parser.add_argument_group("output")
    out.add_argument("--report", type=Path, default=Path("build/loadtest/report.json"))
    out.add_argument("--plot", type=Path, default=Path("build/loadtest/latency-vs-throughput.png"))
    out.add_argument("--host-note", default="", help="a line about the host, stored in the report")
    args = parser.parse_args(argv)
    if args.url and (args.workers or args.threads):
        parser.error("--workers/--threads need a container this command starts (leave out --url)")
    if not 0 < args.safety_factor <= 1:
        parser.error("--safety-factor must be in (0, 1]")
    if not args.target_p99 > 0 or not args.step_seconds > 0 or args.step_max_requests < 1 or args.images < 1:
        parser.error("--target-p99, --step-seconds, --step-max-requests and --images must be positive")
    return args


def configurations(args: argparse.Namespace) -> list[dict[str, str]]:
    """The serving settings to test: {} (the image's defaults) unless a sweep was asked for."""
    workers = [str(w) for w in args.workers] if args.workers else [None]
    threads = [str(t) for t in args.threads] if args.threads else [None]
    combos = []
    for w, t in itertools.product(workers, threads):
        settings = {}
        if w is not None:
            settings[serving.WORKERS_VARIABLE] = w
        if t is not None:
            settings[serving.THREADS_VARIABLE] = t
        combos.append(settings)
    return combos


def measure(target: Target, payloads: list[bytes], args: argparse.Namespace, settings: dict[str, str],
            sampler: ContainerSampler | None) -> reports.ConfigurationResult:
    """Warm up, then ramp; each step gets the container's mean CPU and memory over its window."""
    warm = summarize(warm_up(target, payloads, args.warmup_requests))
    if warm.successes < warm.requests:
        raise serving.ServingError(f"warm-up requests failed ({warm.errors}): is {target.url} a kennel endpoint "
                                   "serving a model?")

    def run_step(concurrency: int) -> StepSummary:
        cpu_began = time.process_time()
        run = run_closed_loop(target, payloads, concurrency, args.step_seconds, args.step_max_requests)
        step = summarize(run)
        step.client_cpu_percent = (time.process_time() - cpu_began) / step.duration_s * 100
        step.host_load = os.getloadavg()[0]  # other work on a shared host shows here
        if sampler is not None:
            # A sample covers the second before it arrived: skip the first second of the step.
            window = sampler.window(run.began + 1.0, run.ended)
            step.cpu_percent, step.memory_mib = mean_cpu(window), mean_memory_mib(window)
        print(reports.step_table([step]).splitlines()[-1], flush=True)
        return step

    print(reports.step_table([]), flush=True)
    result = ramp(run_step, args.concurrency, args.target_p99)
    return reports.ConfigurationResult(settings, result.steps, result.stopped_because, args.target_p99)


def start_sampler(container_id: str) -> ContainerSampler | None:
    """CPU and memory sampling, or None with a warning: the load test goes on without them."""
    try:
        return ContainerSampler(container_id).start()
    except Exception as exc:  # noqa: BLE001 - no engine, no SDK, no permission: all the same here
        print(f"loadtest: cannot sample container {container_id}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return None


def run(args: argparse.Namespace) -> dict:
    payloads = load_photos(args.photos) if args.photos else dog_photos(args.images)
    results = []
    for settings in configurations(args):
        label = reports.ConfigurationResult(settings, [], "", args.target_p99).label
        container = None
        if args.url:
            target = Target(args.url, timeout_s=args.timeout)
            wait_until_healthy(target.with_path("/ping"), timeout_s=args.wait)
            container_id = args.container
        else:
            print(f"== starting `serve` on {args.model_dir} ({label})", flush=True)
            container = serving.start(settings, args.model_dir)
            print(f"   healthy after {container.startup_s:.1f} s at {container.url}", flush=True)
            target = Target(container.url, timeout_s=args.timeout)
            container_id = container.container_id
        sampler = start_sampler(container_id) if container_id else None
        try:
            print(f"== ramp: {label}", flush=True)
            result = measure(target, payloads, args, settings, sampler)
            if container is not None:
                result.layout = container.effective_layout()
        finally:
            if sampler is not None:
                sampler.stop()
                if sampler.error or not sampler.samples:
                    print(f"loadtest: no CPU/memory samples from container {container_id} "
                          f"({sampler.error or 'no stats received'})", file=sys.stderr, flush=True)
            if container is not None:
                container.stop()
        print(f"   stopped: {result.stopped_because}; max sustainable {result.max_rate:.2f} requests/s", flush=True)
        results.append(result)

    url = args.url or "compose service `serve` on 127.0.0.1 (one container per configuration)"
    settings = {"concurrency": args.concurrency, "step_seconds": args.step_seconds,
                "step_max_requests": args.step_max_requests, "warmup_requests": args.warmup_requests,
                "request_timeout_s": args.timeout, "payload": {"images": len(payloads),
                "mean_bytes": round(sum(map(len, payloads)) / len(payloads)),
                "source": str(args.photos) if args.photos else "generated 500x375 JPEG (kennel_train.sample)"}}
    report = reports.build_report(results, url=url, target_p99_s=args.target_p99, safety_factor=args.safety_factor,
                                  settings=settings, host_note=args.host_note)
    reports.write_json(report, args.report)
    reports.plot(results, args.target_p99, args.plot,
                 f"kennel load test: latency vs throughput (p99 target {args.target_p99:g} s)")
    print()
    print(reports.summary_text(report))
    print(f"report: {args.report}\nplot:   {args.plot}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    except (serving.ServingError, TimeoutError, ValueError, OSError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1
    return 0 if report["recommended_invocations_per_instance"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
