"""Multi-model endpoint: what loading the Nth model costs with its backbone resident, and what invoking costs.

    kennel-bench-multi-model --image kennel-serve:latest                # 100 models, ResNet-50
    kennel-bench-multi-model --models 10 --json mme.json

Writes N random-weight ResNet-50 models of the original's shape (133 classes) that share
one frozen backbone (as training writes them with freeze_backbone=true: one identity,
a head graph each), plus one model that shares nothing, and runs the serving image as
SageMaker runs a multi-model endpoint (SAGEMAKER_MULTI_MODEL=true, the models under
/opt/ml/models, 2 CPUs). It measures, side by side in one run:

  load_first_ms   POST /models of the first model: backbone and head (a full load)
  load_nth_ms     median POST /models of the others, with the backbone resident
  load_whole_ms   POST /models of the model that shares nothing (the whole graph)
  memory_mib      the container's memory (docker's figure) with 0, 1, 10, ... N models
                  loaded, each invoked on both workers
  invoke p50      POST /models/NAME/invoke against a single-model container's
                  /invocations of the same model, requests interleaved one at a time

Figures for docs/benchmarks.md, not assertions.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kennel_artifact

from kennel_ops.bench.models import write_random_model
from kennel_ops.ports import free_mms_port

CLASSES = 133
CPUS = "2"
MEMORY = "6g"


def write_head_variant(base: Path, target: Path, seed: int) -> Path:
    """A model trained on ``base``'s frozen backbone with another head: the backbone file shared (hard link)."""
    import torch

    target.mkdir(parents=True)
    os.link(base / kennel_artifact.BACKBONE_FILE, target / kennel_artifact.BACKBONE_FILE)
    shutil.copy(base / kennel_artifact.ONNX_FILE, target / kennel_artifact.ONNX_FILE)  # unread by the endpoint
    manifest = kennel_artifact.read_manifest(base)
    torch.manual_seed(seed)
    features = manifest.backbone["features"]
    # The original system's head: Linear(F, 128) - ReLU - Linear(128, classes).
    head = torch.nn.Sequential(torch.nn.Linear(features, 128), torch.nn.ReLU(), torch.nn.Linear(128, manifest.num_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head.eval(), (torch.zeros(1, features),), str(target / kennel_artifact.HEAD_FILE),
                          input_names=[kennel_artifact.FEATURES], output_names=[kennel_artifact.ONNX_OUTPUT],
                          dynamic_axes={kennel_artifact.FEATURES: {0: "batch"}, kennel_artifact.ONNX_OUTPUT: {0: "batch"}},
                          dynamo=False)
    kennel_artifact.write_manifest(target, manifest)
    return target


def photo() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class Container:
    def __init__(self, image: str, mounts: list[str], env: dict[str, str]):
        self.name = f"kennel-bench-mme-{uuid.uuid4().hex[:8]}"
        self.port = free_mms_port()
        command = ["docker", "run", "-d", "--name", self.name, "--cpus", CPUS, "--memory", MEMORY,
                   "-p", f"127.0.0.1:{self.port}:8080"]
        for mount in mounts:
            command += ["-v", mount]
        for key, value in env.items():
            command += ["-e", f"{key}={value}"]
        subprocess.run(command + [image, "serve"], check=True, capture_output=True)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, bytes, float]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            began = time.perf_counter()
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return response.status, data, time.perf_counter() - began
        finally:
            connection.close()

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/ping", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        logs = subprocess.run(["docker", "logs", "--tail", "40", self.name], capture_output=True, text=True)
        raise RuntimeError(f"{self.name} did not become healthy:\n{logs.stdout}{logs.stderr}")

    def memory_mib(self) -> float:
        time.sleep(1.5)  # let the kernel settle freed pages
        out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{json .}}", self.name],
                             capture_output=True, text=True, check=True).stdout
        raw = json.loads(out)["MemUsage"].split("/")[0].strip()  # docker's figure: less the page cache
        return _mib(raw)

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True)


def _mib(text: str) -> float:
    units = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "kB": 1e3 / 2**20, "MB": 1e6 / 2**20,
             "GB": 1e9 / 2**20}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text) / 2**20


def load(container: Container, name: str) -> float:
    status, body, seconds = container.request("POST", "/models", json.dumps(
        {"model_name": name, "url": f"/opt/ml/models/{name}/model"}).encode(), {"Content-Type": "application/json"})
    if status != 200:
        raise RuntimeError(f"loading {name}: {status} {body[:300]!r}")
    return seconds


def invoke_on_both_workers(container: Container, name: str, payload: bytes) -> None:
    """Two requests at once, twice: both workers hold the model afterwards."""
    def one(_: int) -> int:
        return container.request("POST", f"/models/{name}/invoke", payload, {"Content-Type": "image/jpeg"})[0]

    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            statuses = list(pool.map(one, range(2)))
            if statuses != [200, 200]:
                raise RuntimeError(f"invoking {name}: {statuses}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-bench-multi-model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="kennel-serve:latest")
    parser.add_argument("--models", type=int, default=100, help="models sharing one backbone (default 100)")
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--requests", type=int, default=40, help="invocations of each kind for the p50 (default 40)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.models < 2:
        parser.error("--models must be at least 2")

    root = Path(tempfile.mkdtemp(prefix="kennel-bench-mme-"))
    containers: list[Container] = []
    try:
        names = [f"dogs-{i:03d}" for i in range(args.models)]
        base = write_random_model(root / names[0] / "model", args.architecture, CLASSES, seed=0, head_seed=0,
                                  split=True)
        for i, name in enumerate(names[1:], start=1):
            write_head_variant(base, root / name / "model", seed=i)
        write_random_model(root / "whole" / "model", args.architecture, CLASSES, seed=7)
        os.chmod(root, 0o755)
        payload = photo()

        mme = Container(args.image, [f"{root}:/opt/ml/models:ro"], {"SAGEMAKER_MULTI_MODEL": "true"})
        containers.append(mme)
        single = Container(args.image, [f"{base}:/opt/ml/model:ro"], {})
        containers.append(single)
        mme.wait_ready()
        single.wait_ready()

        memory = {0: mme.memory_mib()}
        load_first = load(mme, names[0])
        invoke_on_both_workers(mme, names[0], payload)
        memory[1] = mme.memory_mib()
        nth = []
        checkpoints = sorted({c for c in (10, 25, 50, args.models) if c <= args.models})
        for count, name in enumerate(names[1:], start=2):
            nth.append(load(mme, name))
            invoke_on_both_workers(mme, name, payload)
            if count in checkpoints:
                memory[count] = mme.memory_mib()
        load_whole = load(mme, "whole")

        # invoke vs /invocations of the same model, one request at a time, interleaved
        headers = {"Content-Type": "image/jpeg", "Accept": "application/json"}
        for _ in range(3):  # warm both paths
            mme.request("POST", f"/models/{names[0]}/invoke", payload, headers)
            single.request("POST", "/invocations", payload, headers)
        invoke_s, single_s = [], []
        for _ in range(args.requests):
            status, _, seconds = mme.request("POST", f"/models/{names[0]}/invoke", payload, headers)
            invoke_s.append(seconds) if status == 200 else None
            status, _, seconds = single.request("POST", "/invocations", payload, headers)
            single_s.append(seconds) if status == 200 else None
    finally:
        for container in containers:
            container.remove()
        shutil.rmtree(root, ignore_errors=True)

    full_mib = memory[1] - memory[0]
    per_model_mib = (memory[args.models] - memory[1]) / (args.models - 1)
    results = {
        "architecture": args.architecture, "models": args.models, "cpus": CPUS, "memory_limit": MEMORY,
        "load_first_ms": round(load_first * 1000, 1),
        "load_nth_ms": round(statistics.median(nth) * 1000, 1),
        "load_whole_ms": round(load_whole * 1000, 1),
        "load_ratio": round(load_first / statistics.median(nth), 1),
        "memory_mib": {str(k): round(v, 1) for k, v in memory.items()},
        "first_model_mib": round(full_mib, 1),
        "per_added_model_mib": round(per_model_mib, 2),
        "per_added_model_share": round(per_model_mib / full_mib, 4) if full_mib > 0 else None,
        "invoke_p50_ms": round(statistics.median(invoke_s) * 1000, 1),
        "invocations_p50_ms": round(statistics.median(single_s) * 1000, 1),
        "invoke_ratio": round(statistics.median(invoke_s) / statistics.median(single_s), 3),
        "requests": len(invoke_s),
    }
    print(json.dumps(results, indent=2))
    print(f"\nloading the Nth model: {results['load_nth_ms']} ms, a full load {results['load_first_ms']} ms "
          f"({results['load_ratio']} x); memory per added model {results['per_added_model_mib']} MiB = "
          f"{100 * (results['per_added_model_share'] or 0):.2f} % of the first model's {results['first_model_mib']} "
          f"MiB; invoke p50 {results['invoke_p50_ms']} ms vs /invocations {results['invocations_p50_ms']} ms "
          f"({results['invoke_ratio']} x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
