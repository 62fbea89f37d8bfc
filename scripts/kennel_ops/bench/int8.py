"""INT8 against FP32 on one host, side by side in one run: accuracy, agreement, serving speed.

    kennel-bench-int8 --model DIR [--data DATASET] [--layouts 2x1/2,1x2,2x1] [--seconds 20] [--rounds 2]
    kennel-bench-int8 --random resnet50 [--layouts ...]

DIR is a model directory holding model.int8.onnx (a training job's or convert's
output); DATASET holds valid/ and test/ (one folder per class, the model's
classes). ``--random ARCH`` makes one instead (torch needed): random weights, the
original's head and 133 classes, the INT8 graph calibrated on 200 generated
images and shipped without the gate (its accuracy means nothing; its speed is a
trained model's). Prints markdown tables:

- accuracy (with --data): top-1 of each graph, their top-1 agreement and their
  largest score and probability differences, on valid/ and on test/;
- engine, no HTTP: images per second at saturation, one single-threaded engine
  per CPU, each in its own process, all busy at once (the server's default
  layout), preprocessing and forward of a decoded 500x375 photo; and the median
  of one such request alone on an engine with a thread per CPU (the solo session);
- served, per layout (WxT/S as kennel-bench-serve names them): the serving image
  run with KENNEL_PRECISION pinned to each graph in turn (the first answer's
  X-Kennel-Precision must name it; every worker serves the graph the first one
  chose), p50 of sequential POST /invocations of 500x375 JPEGs to the
  container's own address and the best throughput at 1, 2 and 4 requests per
  worker in flight. The load generator shares this host's CPUs: its cost per
  request, the same for both graphs, weighs more beside INT8's shorter forward.
  ``--layouts ''`` skips it.

Rounds alternate the order of the two graphs.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

import kennel_artifact
from kennel_serve.engine import KennelModel
from kennel_train import data, quantize, sample

GRAPHS = ("fp32", "int8")
CALIBRATION_IMAGES = 200


def in_turn(round_: int) -> tuple[str, ...]:
    """The graphs in this round's order: every other round starts with INT8."""
    return GRAPHS if round_ % 2 == 0 else GRAPHS[::-1]


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


def random_int8_model(model_dir: Path, architecture: str, scratch: Path, classes: int = 133,
                      calibration_images: int = CALIBRATION_IMAGES) -> Path:
    """A random-weight model of the original's shape with an ungated INT8 graph (see the module doc)."""
    from kennel_ops.bench.models import write_random_model

    write_random_model(model_dir, architecture, classes, kennel_artifact.ORIGINAL_EVAL)
    images = sample.generate(scratch / "calibration", classes=5,
                             counts={"train": max(1, calibration_images // 5)})
    manifest = kennel_artifact.read_manifest(model_dir)
    calibration = [(str(path), 0) for path in sorted((images / "train").rglob("*.jpg"))]
    count = quantize.quantize(model_dir / kennel_artifact.ONNX_FILE, model_dir / kennel_artifact.INT8_FILE,
                              calibration, manifest.preprocessing)
    manifest.int8 = {"shipped": True, "calibration_images": count,
                     "reason": "kennel-bench-int8 --random: random weights, no gate"}
    kennel_artifact.write_manifest(model_dir, manifest)
    return model_dir


def answered_by(url: str, payload: bytes) -> str:
    """The graph named by an answer's X-Kennel-Precision ('int8; setting=int8' -> 'int8')."""
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.headers.get("X-Kennel-Precision", "").split(";")[0]


def served(model_dir: Path, image: str, layouts: str, rounds: int, requests: int,
           seconds: float) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{layout: {graph: {"p50_s": [per round], "throughput": [per round]}}}, the image serving each graph in turn."""
    from kennel_ops.bench.serve import (ServedImage, first_answer, layout_label, parse_layouts, saturation,
                                        sequential)
    from kennel_ops.load.payloads import dog_photos

    payloads = dog_photos(8)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for workers, threads, solo in parse_layouts(layouts):
        label = layout_label(workers, threads, solo)
        figures = results[label] = {graph: {"p50_s": [], "throughput": []} for graph in GRAPHS}
        for round_ in range(rounds):
            for graph in in_turn(round_):
                print(f"== served {label}, {graph}, round {round_ + 1}", flush=True)
                server = ServedImage(image, model_dir, {
                    "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers), "KENNEL_ORT_THREADS": str(threads),
                    "KENNEL_ORT_SOLO_THREADS": str(solo), "KENNEL_PRECISION": graph})
                try:
                    first_answer(server, payloads[0])
                    url = server.container_url()
                    if (answered := answered_by(url, payloads[0])) != graph:
                        raise RuntimeError(f"KENNEL_PRECISION={graph} but the answer came from {answered!r}")
                    sequential(url, payloads, 10)  # warm every worker's sessions
                    figures[graph]["p50_s"].append(sequential(url, payloads, requests)[0])
                    steps = saturation(url, payloads, workers, seconds)
                    figures[graph]["throughput"].append(max(step["throughput"] for step in steps.values()))
                finally:
                    server.stop()
    return results


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
    parser = argparse.ArgumentParser(prog="kennel-bench-int8", description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="a model directory with model.int8.onnx")
    model.add_argument("--random", metavar="ARCH", help="make a random-weight model of the original's shape (resnet50)")
    parser.add_argument("--data", type=Path, help="a dataset with valid/ and test/: also compare accuracy")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per saturation step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image", default=os.environ.get("KENNEL_SERVE_IMAGE", "kennel-serve:latest"))
    parser.add_argument("--layouts", default="2x1/2,1x2,2x1",
                        help="serving layouts to compare in the image ('' skips the served comparison)")
    parser.add_argument("--requests", type=int, default=60, help="sequential requests per served round")
    args = parser.parse_args(argv)
    if args.random and args.data:
        parser.error("--data compares a trained model's accuracy: not with --random")
    with tempfile.TemporaryDirectory(prefix="kennel-bench-int8-") as scratch:
        if args.random:
            print(f"writing a random {args.random} (133 classes) and its INT8 graph ...", flush=True)
            args.model = random_int8_model(Path(scratch) / "model", args.random, Path(scratch))
            os.chmod(scratch, 0o755)  # the image's unprivileged user reads the mount
        elif not kennel_artifact.load(args.model).has_int8:
            print(f"kennel-bench-int8: error: {args.model} has no {kennel_artifact.INT8_FILE}", file=sys.stderr)
            return 1
        return compare_all(args)


def compare_all(args: argparse.Namespace) -> int:
    cpus = len(os.sched_getaffinity(0))
    print(f"CPU flags: {cpu_flags()}; {cpus} usable CPUs; {os.getloadavg()[0]:.1f} load average at start\n")
    if args.data:
        print("| split | images | FP32 top-1 | INT8 top-1 | agreement | max abs score diff | max abs probability diff |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for split, result in accuracy(args.model, args.data).items():
            print(f"| {split} | {result.images} | {result.fp32_top1:.4f} | {result.int8_top1:.4f} "
                  f"| {result.agreement:.4f} | {result.max_abs_logit_diff:.3f} | {result.max_abs_probability_diff:.3f} |")
    rates: dict[str, list[float]] = {graph: [] for graph in GRAPHS}
    latency: dict[str, list[float]] = {graph: [] for graph in GRAPHS}
    for round_ in range(args.rounds):
        for graph in in_turn(round_):
            rates[graph].append(saturation(args.model, graph, args.seconds, cpus))
            latency[graph].append(alone(args.model, graph, cpus))
    print(f"\nEngine, no HTTP:\n\n| graph | images/s at saturation ({cpus} workers x 1 thread), per round | "
          f"p50 alone ({cpus} threads), ms, per round |")
    print("| --- | --- | --- |")
    for graph in GRAPHS:
        print(f"| {graph.upper()} | {per_round(rates[graph])} | {per_round(latency[graph], 1000)} |")
    print(f"\nINT8 / FP32 throughput per round: {ratios(rates['int8'], rates['fp32'])}; "
          f"p50 FP32 / INT8 per round: {ratios(latency['fp32'], latency['int8'])}")
    if args.layouts.strip():
        layouts = served(args.model, args.image, args.layouts, args.rounds, args.requests, args.seconds)
        print(f"\nServed by {args.image}, POST /invocations of 500x375 JPEGs:\n\n"
              "| layout | FP32 p50, ms | INT8 p50, ms | FP32 / INT8 p50 | FP32 images/s | INT8 images/s "
              "| INT8 / FP32 throughput |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, figures in layouts.items():
            fp32, int8 = figures["fp32"], figures["int8"]
            print(f"| {label} | {per_round(fp32['p50_s'], 1000)} | {per_round(int8['p50_s'], 1000)} "
                  f"| {ratios(fp32['p50_s'], int8['p50_s'])} | {per_round(fp32['throughput'])} "
                  f"| {per_round(int8['throughput'])} | {ratios(int8['throughput'], fp32['throughput'])} |")
    print(f"\n{os.getloadavg()[0]:.1f} load average at the end")
    return 0


def per_round(values: list[float], scale: float = 1.0) -> str:
    return ", ".join(f"{value * scale:.1f}" for value in values)


def ratios(numerators: list[float], denominators: list[float]) -> str:
    return ", ".join(f"{a / b:.2f}" for a, b in zip(numerators, denominators))


if __name__ == "__main__":
    sys.exit(main())
