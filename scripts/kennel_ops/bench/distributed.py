"""One host vs two hosts on this machine: epoch time and the bytes all-reduced per step.

    kennel-bench-distributed [--architecture resnet50] [--train-per-class 48]

Runs the real training entry point (the sagemaker-training toolkit's `train`
with kennel_train.main) on a generated dataset, side by side in one run:

* one host using every core of this machine;
* two hosts (two processes, gloo over the loopback), each pinned to its own
  share of the cores, so the pair has the same CPUs as the single host.

It reports the last epoch's training time (the first one warms up), and the
communication of a step: the gradients DDP all-reduces (the trainable
parameters: with a frozen backbone, the head only), the bytes a rank sends
for them in a ring all-reduce, and the time of that all-reduce on this
machine's loopback (a separate two-process measurement). Pretrained weights
are not used (random backbone, same compute).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from kennel_train.model import build_network
from kennel_train.sample import generate
from kennel_ops.ports import free_port

TRAIN = Path(sys.executable).with_name("train")


def run_job(root: Path, dataset: Path, hosts: list[str], cores: list[set[int]], hyperparameters: dict[str, str]) -> dict:
    """Start one `train` per host, wait for all; return each host's last-epoch numbers."""
    port = free_port()
    processes = {}
    for host, host_cores in zip(hosts, cores, strict=True):
        base = root / host
        config = base / "input" / "config"
        config.mkdir(parents=True)
        (config / "resourceconfig.json").write_text(json.dumps(
            {"current_host": host, "hosts": hosts, "network_interface_name": "lo"}))
        (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
        (config / "inputdataconfig.json").write_text(json.dumps({"training": {"TrainingInputMode": "File"}}))
        (base / "input" / "data").mkdir(parents=True)
        (base / "input" / "data" / "training").symlink_to(dataset)
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_TRAINING_MODULE": "kennel_train.main:main",
               "KENNEL_DIST_PORT": str(port),
               "KENNEL_DIST_ADDRESSES": ",".join(f"{h}=127.0.0.1" for h in hosts)}
        log = open(base / "train.log", "w")
        processes[host] = (subprocess.Popen([str(TRAIN)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=lambda c=host_cores: os.sched_setaffinity(0, c)), log)
    results = {}
    for host, (process, log) in processes.items():
        code = process.wait()
        log.close()
        text = (root / host / "train.log").read_text()
        if code != 0:
            sys.exit(f"{host} failed ({code}):\n{text[-3000:]}")
        epochs = re.findall(r"^progress train epoch=(\d+)/\d+ done images=(\d+) seconds=([\d.]+)", text, re.MULTILINE)
        epoch, images, seconds = epochs[-1]
        results[host] = {"epoch": int(epoch), "images": int(images), "seconds": float(seconds)}
    return results


def trainable_part(architecture: str, classes: int, freeze_backbone: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """What DDP wraps in training (kennel_train.model.SplitModel) and an input of its shape."""
    network = build_network(architecture, "original", classes)
    if freeze_backbone:
        return torch.nn.Sequential(network.fc), torch.randn(2, network.fc[0].in_features)
    part = torch.nn.Sequential(network.layer4, network.avgpool, torch.nn.Flatten(1), network.fc)
    return part, torch.randn(2, network.layer4[0].conv1.in_channels, 14, 14)


def _communication_worker(rank: int, port: int, architecture: str, classes: int, freeze_backbone: bool,
                          repeats: int, queue) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    # The buckets DDP really all-reduces, as the training loop wraps the trainable part.
    module, example = trainable_part(architecture, classes, freeze_backbone)
    model = DistributedDataParallel(module, gradient_as_bucket_view=True)
    buckets: list[int] = []

    def record(state, bucket):
        buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(None, record)
    for _ in range(2):  # DDP rebuilds its buckets after the first step, in gradient-ready order
        buckets.clear()
        model(example).sum().backward()
    # One all-reduce of all those bytes, timed on its own.
    tensor = torch.ones(sum(buckets) // 4)
    times = []
    for _ in range(repeats + 3):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - started)
    dist.destroy_process_group()
    if rank == 0:
        queue.put((list(buckets), statistics.median(times[3:])))


def communication(architecture: str, classes: int, freeze_backbone: bool, repeats: int = 30) -> tuple[list[int], float]:
    """(DDP's bucket sizes in bytes for one step, median seconds of one gloo all-reduce of them), 2 processes."""
    context = multiprocessing.get_context("spawn")
    queue, port = context.Queue(), free_port()
    workers = [context.Process(target=_communication_worker,
                               args=(rank, port, architecture, classes, freeze_backbone, repeats, queue))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    result = queue.get(timeout=600)
    for worker in workers:
        worker.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-bench-distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="one-host and two-host runs, alternating")
    parser.add_argument("--communication-only", action="store_true", help="skip the training runs")
    parser.add_argument("--comm-classes", type=int, default=133,
                        help="classes of the head whose all-reduce is measured (133: dogImages)")
    args = parser.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    halves = [set(cpus[: max(1, len(cpus) // 2)]), set(cpus[len(cpus) // 2:]) or set(cpus)]
    hyperparameters = {"architecture": json.dumps(args.architecture), "pretrained": "false",
                       "epochs": str(args.epochs), "batch_size": str(args.batch_size), "workers": "auto",
                       "progress_interval": "1000"}
    one_times, two_times = [], []
    total = args.classes * args.train_per_class
    with tempfile.TemporaryDirectory(prefix="kennel-bench-dist-") as tmp:
        root = Path(tmp)
        dataset = generate(root / "data", classes=args.classes,
                           counts={"train": args.train_per_class, "valid": 2, "test": 2})
        print(f"machine: {len(cpus)} CPUs ({platform_cpu()}), torch {torch.__version__}; "
              f"{args.architecture} frozen backbone, batch {args.batch_size}, {total} training images, "
              f"epoch {args.epochs} of {args.epochs} timed; runs alternate, {args.repeats} of each", flush=True)
        # Alternating runs: a shared machine's load drifts, and both sides see the same drift.
        for repeat in range(0 if args.communication_only else args.repeats):
            one = run_job(root / f"one-{repeat}", dataset, ["bench-host-a"], [set(cpus)], hyperparameters)
            one_times.append(one["bench-host-a"]["seconds"])
            print(f"one host  ({len(cpus)} CPUs):      epoch {one_times[-1]:6.1f} s, "
                  f"{total / one_times[-1]:5.1f} images/s  (load average {os.getloadavg()[0]:.1f})", flush=True)
            two = run_job(root / f"two-{repeat}", dataset, ["bench-host-a", "bench-host-b"], halves, hyperparameters)
            two_times.append(max(result["seconds"] for result in two.values()))
            print(f"two hosts ({len(halves[0])} CPU{'s' if len(halves[0]) > 1 else ''} each): epoch "
                  f"{two_times[-1]:6.1f} s, {total / two_times[-1]:5.1f} images/s; images per rank "
                  + ", ".join(str(result["images"]) for result in two.values())
                  + f"  (load average {os.getloadavg()[0]:.1f})", flush=True)
    ratios = [b / a for a, b in zip(one_times, two_times, strict=True)]
    if ratios:
        print(f"two hosts / one host epoch time: {statistics.median(ratios):.2f} (median; each pair: "
              + ", ".join(f"{r:.2f}" for r in ratios) + ")")

    steps = -(-total // 2 // args.batch_size)
    print(f"communication per step of {args.architecture} with {args.comm_classes} classes, 2 ranks:")
    for frozen in (True, False):
        buckets, seconds = communication(args.architecture, args.comm_classes, frozen)
        payload = sum(buckets)
        ring = 2 * (2 - 1) / 2 * payload
        what = "head only (freeze_backbone=true)" if frozen else "layer4 + head (freeze_backbone=false)"
        print(f"  {what}: DDP buckets " + " + ".join(f"{size:,}" for size in buckets)
              + f" = {payload / 2**20:.2f} MiB of fp32 gradients; a rank of 2 sends {ring / 2**20:.2f} MiB; "
              f"gloo on the loopback {seconds * 1000:.1f} ms; x {steps} steps of this run's epoch = "
              f"{steps * seconds:.2f} s")
    return 0

def platform_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
