"""The cost of serving's metrics and logging: served p50 with them on against off.

    kennel-bench-overhead --image kennel-serve:latest --rounds 6 --requests 100

Two containers of the same image, the same model (a random-weight ResNet-50 of the
original's shape, kennel_ops.bench.models) and the default layout: one with
KENNEL_METRICS=true (EMF lines, the Prometheus endpoint), one with KENNEL_METRICS=false.
Each round sends its requests one at a time, alternating between the two (which one
goes first swaps with each pair), each over its own keep-alive connection, 500x375
JPEGs: whatever else the host does falls on both alike. (Runs of a hundred requests
to one container, then to the other, gave round ratios from 0.88 to 1.41 on a shared
host.) Printed: the p50 of each over all rounds and per round, the ratio on / off,
the median difference of the pairs (the least noisy figure), and each one's p50
outside the worker (the client's time less Server-Timing's worker: where the log
line and the counts file cost). Target (docs/benchmarks.md): under 1.02.
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


def post(port: int, payload: bytes, connection: http.client.HTTPConnection | None = None) -> tuple[int, float, float]:
    """(status, the client's seconds, the worker's seconds from Server-Timing; 0 when absent)."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    began = time.perf_counter()
    try:
        connection.request("POST", "/invocations", body=payload, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        response.read()
        seconds = time.perf_counter() - began
        return response.status, seconds, worker_seconds(response.getheader("Server-Timing") or "")
    finally:
        if own:
            connection.close()


def worker_seconds(server_timing: str) -> float:
    for entry in server_timing.split(","):
        name, _, duration = entry.strip().partition(";dur=")
        if name == "worker":
            return float(duration) / 1000
    return 0.0


def run_round(ports: dict[str, int], payloads: list[bytes], count: int) -> dict[str, list[tuple[float, float]]]:
    """count requests to each port, one at a time, alternating; per name: (client s, worker s) of each."""
    connections = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=60) for name, port in ports.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ports}
    try:
        for index in range(count):
            for name in (list(ports) if index % 2 == 0 else list(reversed(ports))):
                status, seconds, worker = post(ports[name], payloads[index % len(payloads)], connections[name])
                if status != 200:
                    raise RuntimeError(f"HTTP {status} from 127.0.0.1:{ports[name]}")
                times[name].append((seconds, worker))
    finally:
        for connection in connections.values():
            connection.close()
    return times


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


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
            ports = {name: server.port for name, server in servers.items()}
            run_round(ports, payloads, 10)  # warm
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in SETUPS}
            per_round = []
            for index in range(args.rounds):
                # Which one goes first also swaps from round to round.
                measured = run_round(ports if index % 2 == 0 else dict(reversed(ports.items())), payloads,
                                     args.requests)
                for name in SETUPS:
                    times[name] += measured[name]
                per_round.append({name: p50_ms([t for t, _ in measured[name]]) for name in SETUPS})
        finally:
            for server in servers.values():
                server.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    on, off = (p50_ms([t for t, _ in times[name]]) for name in ("on", "off"))
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, load average now {os.getloadavg()[0]:.2f}")
    print(f"{args.architecture}, 500x375 JPEGs, {args.rounds} rounds x {args.requests} requests to each, "
          f"one at a time, alternating")
    for index, medians in enumerate(per_round, 1):
        print(f"  round {index}: on {medians['on']:.1f} ms, off {medians['off']:.1f} ms, "
              f"ratio {medians['on'] / medians['off']:.3f}")
    print(f"served p50: metrics and logging on {on:.1f} ms, off {off:.1f} ms, "
          f"ratio {on / off:.3f} (target < {TARGET_RATIO})")
    print(f"median of the per-round ratios: {statistics.median(r['on'] / r['off'] for r in per_round):.3f}")
    # Each request to one has its pair, sent right before or after it to the other: the median
    # of the pairs' differences leaves out most of what the host's other work adds to both.
    paired = p50_ms([a - b for (a, _), (b, _) in zip(times["on"], times["off"])])
    print(f"paired: median of on - off per pair {paired:.2f} ms, {paired / off * 100:.1f}% of the off p50")
    outside = {name: p50_ms([t - w for t, w in times[name]]) for name in SETUPS}
    worker = {name: p50_ms([w for _, w in times[name]]) for name in SETUPS}
    print(f"worker p50 (Server-Timing): on {worker['on']:.1f} ms, off {worker['off']:.1f} ms; "
          f"outside the worker p50: on {outside['on']:.2f} ms, off {outside['off']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
