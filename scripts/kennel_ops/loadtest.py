#!/usr/bin/env python3
"""Load-test a kennel endpoint and recommend its auto-scaling target.

    make loadtest                                   # start `serve` on ./model, ramp, report
    kennel-loadtest --url http://127.0.0.1:8080/invocations --container kennel-serve-1
    kennel-loadtest --workers 1,2 --threads 1,2   # sweep serving layouts
    kennel-loadtest --endpoint kennel --region eu-west-1 --own-endpoint   # a SageMaker endpoint
    kennel-loadtest --endpoint kennel --own-endpoint --target-model rex.tar.gz   # one model of a multi-model one
    kennel-loadtest --locustfile my_users.py      # your own Locust users, kennel's ramp and report

A ramp of concurrent Locust users posts dog-photo-sized JPEGs (500x375) until a
step misses the criteria (100% success, p99 <= --target-p99) or the throughput
stops rising. The highest passing throughput is the instance's max sustainable
rate; the recommended SageMakerVariantInvocationsPerInstance is that rate x 60 x
the safety factor (AWS's method). Writes a JSON report (the autoscale command
reads its recommended_invocations_per_instance) and a latency-vs-throughput PNG.
For --endpoint the requests go through the SageMaker runtime API (boto3, SigV4)
and the report gets the endpoint's CloudWatch metrics for the run.

Requests go only to the URL or endpoint given, or to the container this command
starts on 127.0.0.1; a URL off this machine, and any endpoint, needs
--own-endpoint. Every step is bounded in time and in requests.
"""
from __future__ import annotations

import argparse
import base64
import ipaddress
import itertools
import json
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path

from kennel_ops.aws.names import target_model_type

# Nothing that imports the network stack (ssl, http.client, boto3) is imported at module
# level: run() imports Locust first, and Locust monkey-patches the standard library for gevent.

DEFAULT_CONCURRENCY = "1,2,3,4,6,8,12,16,24,32"
WORKERS_VARIABLE = "SAGEMAKER_MODEL_SERVER_WORKERS"
THREADS_VARIABLE = "KENNEL_ORT_THREADS"  # ONNX Runtime intra-op threads per worker (containers/serve)
BODY_FORMATS = ("jpeg", "base64-json")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def is_loopback(host: str) -> bool:
    """True when every address the host name stands for is on this machine (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    where = parser.add_argument_group("endpoint (default: start the compose service `serve` on --model-dir)")
    target = where.add_mutually_exclusive_group()
    target.add_argument("--url", help="POST target, e.g. http://127.0.0.1:8080/invocations")
    target.add_argument("--endpoint", metavar="NAME",
                        help="a SageMaker endpoint, invoked through the runtime API (needs --own-endpoint)")
    where.add_argument("--own-endpoint", action="store_true",
                       help="the --endpoint, or a --url off this machine, is yours to load (it is refused otherwise)")
    where.add_argument("--target-model", type=target_model_type, metavar="MODEL.tar.gz",
                       help="with --endpoint, a multi-model one: the model every request asks (TargetModel)")
    where.add_argument("--region", help="with --endpoint: AWS region (default: the environment's or the profile's)")
    where.add_argument("--profile", help="with --endpoint: named AWS profile")
    where.add_argument("--cloudwatch-wait", type=float, default=180.0, metavar="SECONDS",
                       help="with --endpoint: wait this long after the run for CloudWatch's per-minute metrics "
                            "(default 180)")
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
    load.add_argument("--locustfile", type=Path,
                      help="run the Locust users of this file instead of kennel's own (subclass "
                           "kennel_ops.load.users.KennelHttpUser or SageMakerRuntimeUser to keep the step bounds)")
    load.add_argument("--concurrency", type=_int_list, default=_int_list(DEFAULT_CONCURRENCY),
                      help=f"ramp of concurrent users (default {DEFAULT_CONCURRENCY})")
    load.add_argument("--step-seconds", type=float, default=20.0, help="duration of each step (default 20)")
    load.add_argument("--step-max-requests", type=int, default=5000, help="request cap of each step (default 5000)")
    load.add_argument("--warmup-requests", type=int, default=20, help="unmeasured requests first (default 20)")
    load.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (default 30)")
    load.add_argument("--images", type=int, default=16, help="distinct generated 500x375 JPEGs to cycle (default 16)")
    load.add_argument("--photos", type=Path, help="use the .jpg files under this folder instead")
    load.add_argument("--body", choices=BODY_FORMATS, default="jpeg",
                      help="jpeg: the photo as image/jpeg (default); base64-json: {\"image\": \"<base64>\"} as "
                           "application/json, what a JSON client sends")
    crit = parser.add_argument_group("criteria and recommendation")
    crit.add_argument("--target-p99", type=float, default=1.0, help="p99 latency target in seconds (default 1)")
    crit.add_argument("--safety-factor", type=float, default=0.5, help="AWS's safety factor (default 0.5)")
    out = parser.add_argument_group("output")
    out.add_argument("--report", type=Path, default=Path("build/loadtest/report.json"))
    out.add_argument("--plot", type=Path, default=Path("build/loadtest/latency-vs-throughput.png"))
    out.add_argument("--host-note", default="", help="a line about the host, stored in the report")
    args = parser.parse_args(argv)
    if (args.url or args.endpoint) and (args.workers or args.threads):
        parser.error("--workers/--threads need a container this command starts (leave out --url/--endpoint)")
    if args.endpoint and args.container:
        parser.error("--container samples a local container: it does not go with --endpoint")
    if not args.endpoint and (args.region or args.profile or args.target_model):
        parser.error("--region, --profile and --target-model go with --endpoint")
    if args.endpoint and not args.own_endpoint:
        parser.error(f"--endpoint {args.endpoint} sends real, billed requests: add --own-endpoint to confirm "
                     "the endpoint is yours to load")
    if args.url:
        parts = urllib.parse.urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            parser.error(f"--url must be an http(s) URL, got {args.url!r}")
        if not is_loopback(parts.hostname) and not args.own_endpoint:
            parser.error(f"--url {args.url} is not on this machine: add --own-endpoint to confirm it is "
                         "your own endpoint")
    if args.locustfile and not args.locustfile.is_file():
        parser.error(f"--locustfile {args.locustfile}: no such file")
    if not 0 < args.safety_factor <= 1:
        parser.error("--safety-factor must be in (0, 1]")
    if (not args.target_p99 > 0 or not args.step_seconds > 0 or args.step_max_requests < 1 or args.images < 1
            or not args.timeout > 0):
        parser.error("--target-p99, --step-seconds, --step-max-requests, --images and --timeout must be positive")
    if args.warmup_requests < 0 or args.cloudwatch_wait < 0:
        parser.error("--warmup-requests and --cloudwatch-wait must be 0 or more")
    return args


def configurations(args: argparse.Namespace) -> list[dict[str, str]]:
    """The serving settings to test: {} (the image's defaults) unless a sweep was asked for."""
    workers = [str(w) for w in args.workers] if args.workers else [None]
    threads = [str(t) for t in args.threads] if args.threads else [None]
    combos = []
    for w, t in itertools.product(workers, threads):
        settings = {}
        if w is not None:
            settings[WORKERS_VARIABLE] = w
        if t is not None:
            settings[THREADS_VARIABLE] = t
        combos.append(settings)
    return combos


class LoadTestError(Exception):
    """A failure the user can act on: one line, exit status 1."""


def user_classes(args: argparse.Namespace, builtin: type) -> list[type]:
    """The Locust users to run: the locustfile's, or kennel's own user with this run's timeout."""
    timeouts = {"network_timeout": args.timeout, "connection_timeout": min(args.timeout, 10.0)}
    if args.locustfile:
        from locust.util.load_locustfile import load_locustfile

        try:
            found, _shapes = load_locustfile(str(args.locustfile.resolve()))
        except (SystemExit, Exception) as exc:  # noqa: BLE001 - any error in the user's file: one line
            raise LoadTestError(f"cannot load {args.locustfile}: {type(exc).__name__}: {exc}") from None
        if not found:
            raise LoadTestError(f"{args.locustfile} defines no Locust User class")
        for user_class in found.values():  # --timeout, unless the class sets its own
            for name, value in timeouts.items():
                if issubclass(user_class, builtin) and name not in vars(user_class):
                    setattr(user_class, name, value)
        return list(found.values())
    return [type("KennelLoadUser", (builtin,), {"abstract": False, **timeouts})]


def request_bodies(photos: list[bytes], body_format: str) -> tuple[list[bytes], str]:
    """(bodies, Content-Type) for the photos in the chosen format."""
    if body_format == "base64-json":
        return [json.dumps({"image": base64.b64encode(p).decode("ascii")}).encode() for p in photos], "application/json"
    return photos, "image/jpeg"


def measure(engine, args: argparse.Namespace, settings: dict[str, str], sampler, target_name: str):
    """Warm up, then ramp; each step gets the container's mean CPU and memory over its window."""
    from kennel_ops.load import report as reports
    from kennel_ops.load.docker_stats import mean_cpu, mean_memory_mib
    from kennel_ops.load.stats import ramp, summarize

    if args.warmup_requests:
        warm = summarize(engine.run(min(2, args.warmup_requests), max(10.0, args.timeout), args.warmup_requests))
        if warm.successes < warm.requests or not warm.requests:
            raise LoadTestError(f"warm-up requests failed ({warm.errors or 'none completed'}): is {target_name} "
                                "a kennel endpoint serving a model?")

    def run_step(concurrency: int):
        cpu_began = time.process_time()
        run = engine.run(concurrency, args.step_seconds, args.step_max_requests)
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


def start_sampler(container_id: str):
    """CPU and memory sampling, or None with a warning: the load test goes on without them."""
    from kennel_ops.load.docker_stats import ContainerSampler

    try:
        return ContainerSampler(container_id).start()
    except Exception as exc:  # noqa: BLE001 - no engine, no SDK, no permission: all the same here
        print(f"loadtest: cannot sample container {container_id}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return None


def runtime_clients(args: argparse.Namespace):
    """(sagemaker-runtime, cloudwatch) clients. The runtime client never retries: a load test
    counts a throttled or failed request, it does not hide it behind a second one."""
    import boto3
    from botocore.config import Config

    session = boto3.Session(profile_name=args.profile, region_name=args.region or os.environ.get("AWS_REGION"))
    if not session.region_name:
        raise LoadTestError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    runtime = session.client("sagemaker-runtime", config=Config(
        retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=args.timeout,
        connect_timeout=min(args.timeout, 10.0), max_pool_connections=max(args.concurrency) + 2,
        user_agent_extra="kennel-loadtest"))
    return runtime, session.client("cloudwatch"), session.region_name


def read_cloudwatch(cloudwatch, args: argparse.Namespace, began, ended) -> dict | None:
    from kennel_ops.load import endpoint_metrics

    if args.cloudwatch_wait:
        print(f"== waiting {args.cloudwatch_wait:.0f} s for CloudWatch's per-minute metrics", flush=True)
        time.sleep(args.cloudwatch_wait)
    try:
        section = endpoint_metrics.read_endpoint_metrics(cloudwatch, args.endpoint, began, ended)
    except Exception as exc:  # noqa: BLE001 - no permission or no network: the run's own figures stand
        print(f"loadtest: cannot read CloudWatch metrics of {args.endpoint}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return None
    print("   " + endpoint_metrics.summary_line(section), flush=True)
    return section


def run(args: argparse.Namespace) -> dict:
    import locust  # first: it monkey-patches the standard library for gevent

    from kennel_ops.load import endpoint_metrics, serving
    from kennel_ops.load import report as reports
    from kennel_ops.load.client import Target, wait_until_healthy
    from kennel_ops.load.locust_steps import LocustSteps
    from kennel_ops.load.payloads import dog_photos, load_photos
    from kennel_ops.load.users import RUNTIME_PAYLOAD_LIMIT, KennelHttpUser, LoadPlan, SageMakerRuntimeUser

    photos = load_photos(args.photos) if args.photos else dog_photos(args.images)
    payloads, content_type = request_bodies(photos, args.body)
    runtime = cloudwatch = None
    if args.endpoint:
        too_big = [len(p) for p in payloads if len(p) > RUNTIME_PAYLOAD_LIMIT]
        if too_big:
            raise LoadTestError(f"{len(too_big)} request bod(ies) over InvokeEndpoint's 6 MB limit "
                                f"(largest {max(too_big)} bytes): SageMaker would refuse them")
        runtime, cloudwatch, region = runtime_clients(args)
    classes = user_classes(args, SageMakerRuntimeUser if args.endpoint else KennelHttpUser)
    results = []
    for settings in configurations(args):
        label = reports.ConfigurationResult(settings, [], "", args.target_p99).label
        container = None
        container_id = None
        if args.endpoint:
            url, target_name = None, f"endpoint {args.endpoint} ({region})"
        elif args.url:
            url, target_name = args.url, args.url
            wait_until_healthy(Target(url).with_path("/ping"), timeout_s=args.wait)
            container_id = args.container
        else:
            print(f"== starting `serve` on {args.model_dir} ({label})", flush=True)
            container = serving.start(settings, args.model_dir)
            print(f"   healthy after {container.startup_s:.1f} s at {container.url}", flush=True)
            url = target_name = container.url
            container_id = container.container_id
        plan = LoadPlan(payloads, content_type=content_type, endpoint=args.endpoint, runtime=runtime,
                        target_model=args.target_model)
        host = None
        if url:
            parts = urllib.parse.urlsplit(url)
            host, plan.path = f"{parts.scheme}://{parts.netloc}", (parts.path or "/") + (
                f"?{parts.query}" if parts.query else "")
        engine = LocustSteps(classes, plan, args.timeout, host=host)
        sampler = start_sampler(container_id) if container_id else None
        began = endpoint_metrics.now()
        try:
            print(f"== ramp: {label}", flush=True)
            result = measure(engine, args, settings, sampler, target_name)
            result.precision = plan.precision
            if container is not None:
                result.layout = container.effective_layout()
        finally:
            engine.close()
            if sampler is not None:
                sampler.stop()
                if sampler.error or not sampler.samples:
                    print(f"loadtest: no CPU/memory samples from container {container_id} "
                          f"({sampler.error or 'no stats received'})", file=sys.stderr, flush=True)
            if container is not None:
                container.stop()
        print(f"   stopped: {result.stopped_because}; max sustainable {result.max_rate:.2f} requests/s", flush=True)
        if cloudwatch is not None:
            result.cloudwatch = read_cloudwatch(cloudwatch, args, began, endpoint_metrics.now())
        results.append(result)

    if args.endpoint:
        where = f"SageMaker endpoint {args.endpoint} in {region} (InvokeEndpoint)" + (
            f", model {args.target_model}" if args.target_model else "")
    else:
        where = args.url or "compose service `serve` on 127.0.0.1 (one container per configuration)"
    settings = {"engine": f"locust {locust.__version__}", "users": [c.__name__ for c in classes],
                "concurrency": args.concurrency, "step_seconds": args.step_seconds,
                "step_max_requests": args.step_max_requests, "warmup_requests": args.warmup_requests,
                "request_timeout_s": args.timeout, "payload": {"images": len(payloads), "content_type": content_type,
                "mean_bytes": round(sum(map(len, payloads)) / len(payloads)),
                "source": str(args.photos) if args.photos else "generated 500x375 JPEG (kennel_train.sample)"}}
    report = reports.build_report(results, url=where, target_p99_s=args.target_p99, safety_factor=args.safety_factor,
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
    except Exception as exc:  # noqa: BLE001 - serving, network, AWS and file errors: one line, never a traceback
        from botocore.exceptions import BotoCoreError, ClientError

        from kennel_ops.load.serving import ServingError

        if not isinstance(exc, (LoadTestError, ServingError, TimeoutError, ValueError, OSError, BotoCoreError,
                                ClientError)):
            raise
        print(f"loadtest: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0 if report["recommended_invocations_per_instance"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
