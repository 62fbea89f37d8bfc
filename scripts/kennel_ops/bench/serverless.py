"""Serverless memory sizes: the serving image's cold start and peak memory at each size.

    kennel-bench-serverless --image kennel-serve:latest            # 1, 2, 3, 4, 6 GB
    kennel-bench-serverless --sizes 2,3 --requests 100 --json serverless.json

For each memory size, `docker run --memory SIZE --cpus CPUS` starts the image on a
random-weight ResNet-50 (133 classes, the original's shape) and measures:

  ping_s        docker run to the first 200 from GET /ping (SageMaker's health check),
  first_s       docker run to the first 200 from POST /invocations (a cold start's answer),
  peak_mib      the container's highest memory (docker stats) from start through a closed
                loop of --requests requests, one at a time (a serverless endpoint sends each
                container one request at a time; more at once take more containers),
  p50_ms        the median latency of that loop, and whether it was OOM-killed.

CPUS: SageMaker documents no vCPU figure per memory size; serverless inference runs on
AWS Lambda, which gives 1 vCPU per 1769 MB, so CPUS = MB / 1769 (at most this host's).
Figures for docs/benchmarks.md, not assertions.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# AWS Lambda: 1769 MB of memory is one vCPU's worth.
LAMBDA_MB_PER_VCPU = 1769
DEFAULT_SIZES_GB = (1, 2, 3, 4, 6)


def vcpus_for(memory_mb: int, host_cpus: int) -> float:
    return round(min(memory_mb / LAMBDA_MB_PER_VCPU, host_cpus), 2)


def free_port() -> int:
    import socket
    with socket.socket() as sock:  # MMS refuses ports from 32767 up: the kernel's range stays below on Linux
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_size(image: str, model_dir: Path, memory_mb: int, cpus: float, payloads: list[bytes],
                 requests: int, start_timeout_s: float) -> dict:
    from kennel_ops.load.client import Connection, Target, run_closed_loop
    from kennel_ops.load.docker_stats import ContainerSampler

    name = f"kennel-bench-serverless-{uuid.uuid4().hex[:8]}"
    port = free_port()
    row = {"memory_mb": memory_mb, "cpus": cpus}
    began = time.monotonic()
    subprocess.run(["docker", "run", "-d", "--name", name, "--memory", f"{memory_mb}m",
                    "--memory-swap", f"{memory_mb}m", "--cpus", str(cpus), "-p", f"127.0.0.1:{port}:8080",
                    "-v", f"{model_dir}:/opt/ml/model:ro", image, "serve"],
                   check=True, capture_output=True, timeout=120)
    sampler = ContainerSampler(name).start()
    try:
        url = f"http://127.0.0.1:{port}"
        ping = Connection(Target(f"{url}/ping", timeout_s=5))
        invoke = Connection(Target(f"{url}/invocations", timeout_s=60))
        while "first_s" not in row and time.monotonic() - began < start_timeout_s:
            try:
                if "ping_s" not in row and ping.request("GET")[0] == 200:
                    row["ping_s"] = round(time.monotonic() - began, 2)
                if "ping_s" in row and invoke.post(payloads[0])[0] == 200:
                    row["first_s"] = round(time.monotonic() - began, 2)
            except (OSError, http.client.HTTPException):
                ping.close()
                invoke.close()
                if not running(name):
                    break
                time.sleep(0.1)
        ping.close()
        invoke.close()
        if "first_s" in row:
            run = run_closed_loop(Target(f"{url}/invocations", timeout_s=60), payloads, concurrency=1,
                                  duration_s=600, max_requests=requests)
            latencies = [o.latency for o in run.outcomes if o.ok]
            row.update(requests=len(run.outcomes), errors=len(run.outcomes) - len(latencies),
                       p50_ms=round(statistics.median(latencies) * 1000, 1) if latencies else None)
    finally:
        samples = sampler.stop()
        row["oom_killed"] = oom_killed(name)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
    row["peak_mib"] = round(max((s.memory_bytes for s in samples), default=0) / 2**20, 1)
    return row


def running(name: str) -> bool:
    state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
    return state.stdout.strip() == "true"


def oom_killed(name: str) -> bool:
    state = subprocess.run(["docker", "inspect", "-f", "{{.State.OOMKilled}}", name], capture_output=True, text=True)
    return state.stdout.strip() == "true"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-bench-serverless", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=os.environ.get("KENNEL_SERVE_IMAGE", "kennel-serve:latest"))
    parser.add_argument("--model-dir", type=Path, help="a kennel model dir (default: a random ResNet-50, 133 classes)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES_GB)),
                        help="GB, comma-separated (%(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="requests after the cold start (%(default)s)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to the first answer (%(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(float(size) * 1024) for size in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: GB numbers separated by commas, got {args.sizes!r}")
    if not 1 <= args.requests <= 5000:
        parser.error("--requests: 1 to 5000")
    from kennel_ops.load.payloads import dog_photos
    model_dir = args.model_dir
    if model_dir is None:
        from kennel_ops.bench.models import write_random_model
        model_dir = write_random_model(Path(tempfile.mkdtemp(prefix="kennel-serverless-")) / "model", "resnet50",
                                       num_classes=133)
    host_cpus = os.cpu_count() or 1
    payloads = dog_photos(8, seed=7)
    print(f"# {args.image} on {cpu_model()}, {host_cpus} CPUs; {args.requests} requests one at a time per size",
          flush=True)
    print(f"{'memory':>7} {'cpus':>5} {'ping s':>7} {'first s':>8} {'peak MiB':>9} {'p50 ms':>7} {'errors':>6} oom",
          flush=True)
    rows = []
    for memory_mb in sizes:
        row = measure_size(args.image, Path(model_dir).resolve(), memory_mb, vcpus_for(memory_mb, host_cpus),
                           payloads, args.requests, args.start_timeout)
        rows.append(row)
        print(f"{memory_mb:>6}M {row['cpus']:>5} {row.get('ping_s', '-'):>7} {row.get('first_s', '-'):>8} "
              f"{row['peak_mib']:>9} {row.get('p50_ms', '-'):>7} {row.get('errors', '-'):>6} {row['oom_killed']}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"image": args.image, "cpu": cpu_model(), "host_cpus": host_cpus,
                                         "rows": rows}, indent=2))
    return 0 if all("first_s" in row and not row["oom_killed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
