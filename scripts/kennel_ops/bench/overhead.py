"""The cost of serving's metrics and logging: served p50 with them on against off.

    kennel-bench-overhead --image kennel-serve:latest --rounds 6 --requests 100

Two containers of the same image, the same model (a random-weight ResNet-50 of the
original's shape, kennel_ops.bench.models) and the default layout: one as shipped
(KENNEL_METRICS=true, EMF lines, the Prometheus endpoint), one with KENNEL_METRICS=false.
Rounds alternate between them (the first one swaps each round), each round a run of
sequential requests over one keep-alive connection, 500x375 JPEGs. Printed: the p50 of
each over all rounds and per round, and the ratio on / off. Target (docs/benchmarks.md):
under 1.02.
"""
from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kennel_ops.bench.models import write_random_model
from kennel_ops.bench.serve import ServedImage

TARGET_RATIO = 1.02
SETUPS = {"on": {"KENNEL_METRICS": "true", "KENNEL_METRICS_EMF": "true"}, "off": {"KENNEL_METRICS": "false"}}


def photos(count: int = 4) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def wait_ready(port: int, payload: bytes, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if post(port, payload)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no answer from 127.0.0.1:{port} within {timeout_s} s")


def post(port: int, payload: bytes, connection: http.client.HTTPConnection | None = None) -> tuple[int, float]:
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    began = time.perf_counter()
    try:
        connection.request("POST", "/invocations", body=payload, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - began
    finally:
        if own:
            connection.close()


def run_round(port: int, payloads: list[bytes], count: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    try:
        for index in range(count):
            status, seconds = post(port, payloads[index % len(payloads)], connection)
            if status != 200:
                raise RuntimeError(f"HTTP {status} from 127.0.0.1:{port}")
            times.append(seconds)
    finally:
        connection.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-bench-overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="kennel-serve:latest")
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per round and setup")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        print("kennel-bench-overhead: --rounds and --requests must be at least 1", file=sys.stderr)
        return 2
    payloads = photos()
    with tempfile.TemporaryDirectory(prefix="kennel-overhead-") as tmp:
        model_dir = write_random_model(Path(tmp) / "model", args.architecture, num_classes=133)
        servers = {}
        try:
            for name, env in SETUPS.items():
                servers[name] = ServedImage(args.image, model_dir, env)
            for server in servers.values():
                wait_ready(server.port, payloads[0])
                run_round(server.port, payloads, 10)  # warm
            times: dict[str, list[float]] = {name: [] for name in SETUPS}
            per_round = []
            for index in range(args.rounds):
                order = list(SETUPS) if index % 2 == 0 else list(reversed(SETUPS))
                medians = {}
                for name in order:
                    measured = run_round(servers[name].port, payloads, args.requests)
                    times[name] += measured
                    medians[name] = statistics.median(measured)
                per_round.append(medians)
        finally:
            for server in servers.values():
                server.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, load average now {os.getloadavg()[0]:.2f}")
    print(f"{args.architecture}, 500x375 JPEGs, {args.rounds} alternating rounds x {args.requests} sequential requests")
    for index, medians in enumerate(per_round, 1):
        print(f"  round {index}: on {medians['on'] * 1000:.1f} ms, off {medians['off'] * 1000:.1f} ms, "
              f"ratio {medians['on'] / medians['off']:.3f}")
    print(f"served p50: metrics and logging on {on * 1000:.1f} ms, off {off * 1000:.1f} ms, "
          f"ratio {on / off:.3f} (target < {TARGET_RATIO})")
    print(f"median of the per-round ratios: {statistics.median(r['on'] / r['off'] for r in per_round):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
