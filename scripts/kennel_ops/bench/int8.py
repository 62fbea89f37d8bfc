"""INT8 against FP32 on one host, side by side in one run: accuracy, agreement, serving speed.

    kennel-bench-int8 --model DIR --data DATASET [--seconds 20] [--rounds 2]

DIR is a model directory holding model.int8.onnx (a training job's or convert's
output); DATASET holds valid/ and test/ (one folder per class, the model's
classes). Prints markdown tables:

- accuracy: top-1 of each graph, their top-1 agreement and their largest score and
  probability differences, on valid/ and on test/;
- saturation: images per second with one single-threaded engine per CPU, each in
  its own process, all busy at once (the server's default layout: one worker per
  CPU), preprocessing and forward of a decoded 500x375 photo, no HTTP;
- alone: the median seconds of one such request on an engine with a thread per
  CPU (the solo session), the CPU otherwise idle.

Rounds alternate the order of the two graphs. Imports only the containers'
packages, the standard library, numpy and ONNX Runtime.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import kennel_artifact
from kennel_serve.engine import KennelModel
from kennel_train import data, quantize

GRAPHS = ("fp32", "int8")


def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    rgb = np.stack([x * 255 // 499, y * 255 // 374, (x + y) % 256], axis=-1) + rng.integers(-30, 30, (375, 500, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype("uint8"), "RGB")


def accuracy(model_dir: Path, dataset: Path) -> dict[str, quantize.Comparison]:
    manifest = kennel_artifact.load(model_dir)
    results = {}
    for split in ("valid", "test"):
        samples = data.index_split(split, dataset / split, manifest.class_names).samples
        results[split] = quantize.compare(model_dir / kennel_artifact.ONNX_FILE, model_dir / kennel_artifact.INT8_FILE,
                                          samples, manifest.preprocessing)
    return results


def _saturate(model_dir: str, graph: str, seconds: float, start, counts) -> None:
    model = KennelModel.load(model_dir, threads=1, precision_setting=graph)
    image = photo()
    model.predict([image])  # the first run allocates
    start.wait()
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        model.predict([image])
        done += 1
    counts.put(done)


def saturation(model_dir: Path, graph: str, seconds: float, workers: int) -> float:
    """Images per second of ``workers`` single-threaded engines, each in its own process, all busy."""
    context = multiprocessing.get_context("spawn")
    start, counts = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_saturate, args=(str(model_dir), graph, seconds, start, counts))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    total = sum(counts.get(timeout=seconds + 300) for _ in processes)
    for process in processes:
        process.join()
    return total / seconds


def alone(model_dir: Path, graph: str, threads: int, calls: int = 20) -> float:
    """Median seconds of one request on an engine with ``threads`` threads, nothing else running."""
    model = KennelModel.load(model_dir, threads=threads, precision_setting=graph)
    image = photo()
    for _ in range(2):
        model.predict([image])
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        model.predict([image])
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= {f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx")) or f == "avx2"}
    return " ".join(sorted(flags)) or "none of avx2/avx512/amx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not kennel_artifact.load(args.model).has_int8:
        print(f"kennel-bench-int8: error: {args.model} has no {kennel_artifact.INT8_FILE}", file=sys.stderr)
        return 1
    cpus = len(os.sched_getaffinity(0))
    print(f"CPU flags: {cpu_flags()}; {cpus} usable CPUs; {os.getloadavg()[0]:.1f} load average at start\n")
    print("| split | images | FP32 top-1 | INT8 top-1 | agreement | max abs score diff | max abs probability diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for split, result in accuracy(args.model, args.data).items():
        print(f"| {split} | {result.images} | {result.fp32_top1:.4f} | {result.int8_top1:.4f} | {result.agreement:.4f} "
              f"| {result.max_abs_logit_diff:.3f} | {result.max_abs_probability_diff:.3f} |")
    rates: dict[str, list[float]] = {graph: [] for graph in GRAPHS}
    latency: dict[str, list[float]] = {graph: [] for graph in GRAPHS}
    for round_ in range(args.rounds):
        for graph in (GRAPHS if round_ % 2 == 0 else GRAPHS[::-1]):
            rates[graph].append(saturation(args.model, graph, args.seconds, cpus))
            latency[graph].append(alone(args.model, graph, cpus))
    print(f"\n| graph | images/s at saturation ({cpus} workers x 1 thread), per round | "
          f"p50 alone ({cpus} threads), ms, per round |")
    print("| --- | --- | --- |")
    for graph in GRAPHS:
        print(f"| {graph.upper()} | {', '.join(f'{r:.1f}' for r in rates[graph])} | "
              f"{', '.join(f'{s * 1000:.1f}' for s in latency[graph])} |")
    speedups = [i / f for i, f in zip(rates["int8"], rates["fp32"])]
    faster = [f / i for i, f in zip(latency["int8"], latency["fp32"])]
    print(f"\nINT8 / FP32 throughput per round: {', '.join(f'{s:.2f}' for s in speedups)}; "
          f"p50 FP32 / INT8 per round: {', '.join(f'{s:.2f}' for s in faster)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
