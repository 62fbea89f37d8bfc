"""Serving benchmark: the serving image against its in-process engine and the original's way.

    kennel-bench-serve                      # ResNet-50, 133 classes, layouts 2x1/2, 1x2, 2x1
    kennel-bench-serve --layouts 1x2,2x1,1x1 --rounds 5 --json bench.json

Everything is measured side by side in one run on this machine (shared hosts are
noisy, so only ratios taken in the same run count), with a random-weight model
of the original's shape (torchvision ResNet-50 + Linear(2048,128)-ReLU-Linear(128,133),
converted like an original model: Resize((224, 224)), no normalisation) and
500x375 JPEGs (a typical dog photo):

- in-process: decode + preprocess + forward with the same engine (ONNX Runtime,
  kennel_serve.engine) and the same threads as a serving worker; median time of
  calls back to back, and of calls each after the idle gap that the served
  worker has between requests (served p50 minus the worker's own time): a CPU
  that idles between calls runs the next one slower (caches, a VM's vCPU halted).
- the original's way: PyTorch eager on the same weights, torchvision transforms,
  torch's default threads (what the managed PyTorch container's model_fn did): in
  process, and (--server host) as a code/inference.py served by the same stack.
- served: `docker run IMAGE serve` (layout WxT/S: SAGEMAKER_MODEL_SERVER_WORKERS=W,
  KENNEL_ORT_THREADS=T, KENNEL_ORT_SOLO_THREADS=S, the threads of a request that
  runs while the other workers idle; WxT alone means S=T), POST /invocations over 127.0.0.1 with a keep-alive connection:
  p50 of sequential requests (and of the worker's own time, from the answers'
  Server-Timing header: the rest is transport and dispatch), and the best throughput of closed-loop runs at
  1, 2 and 4 requests per worker in flight (saturation).
- cold start: `docker run` to the first 200 from POST /invocations, default layout.
- image size: `docker image inspect`.

Targets (docs/benchmarks.md): served p50 <= 1.15 x in-process (same threads);
throughput >= 0.85 x CPUs / single-thread in-process time; served p50 at least 2 x
faster than the original's way; cold start <= 10 s; image <= 1 GB.

The random-weight models come from kennel_ops.bench.models (the tests make theirs there too).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import kennel_artifact

from kennel_ops.bench.models import build_network, write_random_model
from kennel_ops.checkout import REPO
from kennel_ops.ports import free_mms_port

TARGETS = {"latency_ratio_max": 1.15, "throughput_ratio_min": 0.85, "speedup_vs_original_min": 2.0,
           "cold_start_s_max": 10.0, "image_bytes_max": 1_000_000_000}


# --------------------------------------------------------------------------- in process

def time_calls(call, payloads: list[bytes], count: int, gap_s: float = 0.0) -> float:
    """Median seconds of call(payload) over count calls (after two untimed ones), back to
    back or with the CPU left idle for gap_s before each call."""
    for payload in payloads[:2]:
        call(payload)
    times = []
    for i in range(count):
        if gap_s > 0:
            time.sleep(gap_s)
        started = time.perf_counter()
        call(payloads[i % len(payloads)])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def engine_config(threads: int) -> str:
    """The ONNX Runtime configuration a lone request runs on: its thread count."""
    return f"{threads}t"


def onnx_pipeline(model_dir: Path, config: str):
    """decode + preprocess + forward exactly as a serving worker with this engine configuration does it."""
    from kennel_serve.engine import KennelModel
    from kennel_serve.inputs import decode_request

    model = KennelModel.load(model_dir, threads=int(config.rstrip("t")))

    def call(payload: bytes):
        batch = decode_request(payload, "image/jpeg", fetch_url=None, max_images=1,
                               max_pixels=kennel_artifact.DEFAULT_MAX_PIXELS, max_request_pixels=200_000_000,
                               preprocessing=model.manifest.preprocessing)
        return model.forward(batch[0][None])
    return call


def eager_pipeline(model_dir: Path, architecture: str, num_classes: int):
    """The original's model_fn/predict_fn: PyTorch eager, torchvision transforms, default threads."""
    import torch
    from PIL import Image
    from torchvision import transforms

    network = build_network(architecture, num_classes)
    network.load_state_dict(torch.load(model_dir / kennel_artifact.WEIGHTS_FILE, weights_only=True))
    transform = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])

    def call(payload: bytes):
        image = Image.open(io.BytesIO(payload)).convert("RGB")
        with torch.no_grad():
            return network(transform(image).unsqueeze(0))
    return call


# The original system's serving code, as a code/inference.py on the same serving stack
# (launcher, MMS, sagemaker-inference): PyTorch eager on the same weights, its eval transform.
ORIGINAL_HANDLERS = """
import io
import json

import torch
import torchvision
from PIL import Image
from torchvision import transforms

TRANSFORM = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])


def model_fn(model_dir):
    model = torchvision.models.{arch}(weights=None)
    model.fc = torch.nn.Sequential(torch.nn.Linear(model.fc.in_features, 128), torch.nn.ReLU(inplace=True),
                                   torch.nn.Linear(128, {classes}))
    model.load_state_dict(torch.load(model_dir + "/model.pth", map_location="cpu", weights_only=True))
    return model.eval()


def input_fn(body, content_type):
    return Image.open(io.BytesIO(body)).convert("RGB")


def predict_fn(image, model):
    with torch.no_grad():
        return model(TRANSFORM(image).unsqueeze(0))


def output_fn(prediction, accept):
    return json.dumps(prediction.tolist()), "application/json"
"""


def original_model_dir(model_dir: Path, architecture: str, num_classes: int) -> Path:
    """model_dir's files plus code/inference.py with the original's handlers, in a sibling base dir."""
    original = model_dir.parent / "original" / "model"
    (original / "code").mkdir(parents=True)
    for item in model_dir.iterdir():
        (original / item.name).symlink_to(item)
    (original / "code" / "inference.py").write_text(ORIGINAL_HANDLERS.format(arch=architecture, classes=num_classes))
    return original


# --------------------------------------------------------------------------- served

class ServedImage:
    """`docker run -d IMAGE serve` with the model mounted read-only, published on 127.0.0.1."""

    def __init__(self, image: str, model_dir: Path, env: dict[str, str], cgroup_parent: str | None = None):
        self.name = f"kennel-bench-{uuid.uuid4().hex[:8]}"
        self.port = free_mms_port()
        args = ["docker", "run", "-d", "--rm", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8080",
                "-v", f"{model_dir}:/opt/ml/model:ro"] + (["--cgroup-parent", cgroup_parent] if cgroup_parent else [])
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        self.started = time.monotonic()
        subprocess.run(args + [image, "serve"], check=True, capture_output=True, timeout=120)
        self.url = f"http://127.0.0.1:{self.port}/invocations"

    def container_url(self) -> str:
        """POST /invocations at the container's own address, past docker's port proxy: only traffic
        from this host goes through that proxy (the kernel forwards other hosts' requests), and
        its CPU time per request would be charged to the served model at saturation."""
        address = subprocess.run(["docker", "inspect", "--format",
                                  "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", self.name],
                                 capture_output=True, text=True, timeout=60).stdout.split()
        return f"http://{address[0]}:8080/invocations" if address else self.url

    def stop(self) -> None:
        subprocess.run(["docker", "stop", "--time", "30", self.name], capture_output=True, timeout=120)


class ServedOnHost:
    """The same `serve` (launcher, MMS, workers) run from this checkout, without a container."""

    def __init__(self, model_dir: Path, env: dict[str, str], plugins: Path):
        self.port = free_mms_port()
        self.state = Path(tempfile.mkdtemp(prefix="kb-"))
        full_env = {**os.environ, "SAGEMAKER_BASE_DIR": str(model_dir.parent), "SAGEMAKER_BIND_TO_PORT": str(self.port),
                    "KENNEL_BIND_ADDRESS": "127.0.0.1", "KENNEL_SERVE_STATE_DIR": str(self.state),
                    "KENNEL_MMS_PLUGINS": str(plugins),
                    "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("containers/artifact", "containers/serve")),
                    # No Prometheus port: two of these run at once (the original's and kennel's).
                    "KENNEL_METRICS_PORT": "0",
                    **env}
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "kennel_serve", "serve"], env=full_env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/invocations"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        shutil.rmtree(self.state, ignore_errors=True)


def first_answer(server, payload: bytes, timeout_s: float = 300) -> float:
    """Seconds from the server's start to its first 200 from POST /invocations."""
    from kennel_ops.load.client import Connection, Target
    connection = Connection(Target(server.url, timeout_s=10))
    while time.monotonic() - server.started < timeout_s:
        try:
            status, _ = connection.post(payload)
            if status == 200:
                return time.monotonic() - server.started
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.05)
    raise RuntimeError(f"no answer within {timeout_s} s")


NICE_MINUS_19_WEIGHT = 71755  # the kernel's CFS weight of nice -19
PRIORITY_CGROUP = Path("/sys/fs/cgroup/cpu/kennel-bench")


def prioritize_self() -> None:
    """nice -19 for this process's autogroup (its session): Linux applies nice within an autogroup only."""
    Path("/proc/self/autogroup").write_text("-19")


def priority_cgroup() -> str:
    """A cgroup (v1 cpu controller) of the same weight, as the parent of the served containers: every
    container shares the one `docker` cgroup, weighted like a single process, however many run."""
    if not PRIORITY_CGROUP.parent.joinpath("cpu.shares").exists():
        raise SystemExit("--priority with --server docker needs the cgroup v1 cpu controller; use --server host")
    PRIORITY_CGROUP.mkdir(exist_ok=True)
    (PRIORITY_CGROUP / "cpu.shares").write_text(str(NICE_MINUS_19_WEIGHT))
    return "/" + PRIORITY_CGROUP.name


def build_plugin(directory: Path) -> Path:
    import mms
    jar = Path(mms.__file__).parent / "frontend" / "model-server.jar"
    subprocess.run(["sh", str(REPO / "containers/serve/mms-plugin/build.sh"), str(jar),
                    str(directory / "kennel-mms-plugin.jar")], check=True, capture_output=True, timeout=300)
    return directory


def sequential(url: str, payloads: list[bytes], count: int) -> tuple[float, float | None]:
    """p50 of one request at a time, and p50 of the worker's own time (Server-Timing) when the server says."""
    from kennel_ops.load.client import Target, run_closed_loop
    from kennel_ops.load.stats import summarize
    step = summarize(run_closed_loop(Target(url), payloads, 1, duration_s=600, max_requests=count))
    if step.successes != step.requests:
        raise RuntimeError(f"failed requests: {step.errors}")
    return step.p50, step.worker_p50


def saturation(url: str, payloads: list[bytes], workers: int, seconds: float) -> dict:
    from kennel_ops.load.client import Target, run_closed_loop
    from kennel_ops.load.stats import summarize
    steps = {}
    for in_flight in (workers, 2 * workers, 4 * workers):
        step = summarize(run_closed_loop(Target(url), payloads, in_flight, duration_s=seconds, max_requests=10**6))
        steps[in_flight] = {"throughput": step.throughput, "p50": step.p50, "p99": step.p99,
                            "errors": step.errors}
    return steps


# --------------------------------------------------------------------------- report

def machine() -> dict:
    from kennel_env import usable_cpus
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": model, "cpus": usable_cpus(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                         * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "docker": docker,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def parse_layouts(text: str) -> list[tuple[int, int, int]]:
    """"2x1/2,1x2" -> [(workers, threads, solo threads), ...]; without /S the solo threads are T."""
    layouts = []
    for item in text.split(","):
        layout, _, solo = item.strip().partition("/")
        workers, _, threads = layout.partition("x")
        layouts.append((int(workers), int(threads), int(solo or threads)))
    return layouts


def layout_label(workers: int, threads: int, solo: int) -> str:
    return f"{workers}x{threads}" + (f"/{solo}" if solo != threads else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-bench-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=os.environ.get("KENNEL_SERVE_IMAGE", "kennel-serve:latest"))
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--layouts", default="2x1/2,1x2,2x1",
                        help="WORKERSxTHREADS[/SOLO_THREADS],... to serve with (2x1/2: the default on 2 CPUs)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating in-process/served rounds per layout")
    parser.add_argument("--requests", type=int, default=60, help="sequential requests per round")
    parser.add_argument("--saturation-s", type=float, default=12.0, help="seconds per saturation step")
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--server", choices=("docker", "host"), default="docker",
                        help="serve with the image (docker run) or this checkout's launcher on the host")
    parser.add_argument("--priority", action="store_true",
                        help="give the benchmark and the served processes the CPU weight of nice -19 (this "
                             "session's autogroup; the containers' cgroup), to approximate an unshared machine "
                             "on a busy one")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    cgroup_parent = None
    if args.priority:
        prioritize_self()
        cgroup_parent = priority_cgroup() if args.server == "docker" else None
    from kennel_ops.load.payloads import dog_photos
    from kennel_env import usable_cpus

    cpus = usable_cpus()
    results: dict = {"machine": machine(), "model": f"{args.arch}, {args.classes} classes, random weights",
                     "image": args.image, "server": args.server, "priority": args.priority, "targets": TARGETS, "layouts": {}}
    payloads = dog_photos(8)
    results["payload_bytes"] = statistics.median(len(p) for p in payloads)
    inspect = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", args.image],
                             capture_output=True, text=True, check=True)
    results["image_bytes"] = int(inspect.stdout.strip())

    with tempfile.TemporaryDirectory(prefix="kennel-bench-") as tmp:
        print(f"writing a random {args.arch} ({args.classes} classes) ...", flush=True)
        model_dir = write_random_model(Path(tmp) / "model", args.arch, args.classes, kennel_artifact.ORIGINAL_EVAL,
                                       weights=True)
        os.chmod(tmp, 0o755)  # the image's unprivileged user reads the mount
        plugins = build_plugin(Path(tmp)) if args.server == "host" else None

        def start(env: dict[str, str]):
            if args.server == "host":
                return ServedOnHost(model_dir, env, plugins)  # same session: shares our autogroup
            return ServedImage(args.image, model_dir, env, cgroup_parent)

        configs = {"1t", *(engine_config(solo) for _, _, solo in parse_layouts(args.layouts))}
        pipelines = {config: onnx_pipeline(model_dir, config) for config in sorted(configs)}
        eager = eager_pipeline(model_dir, args.arch, args.classes)
        inproc: dict[str, list[float]] = {config: [] for config in pipelines}
        eager_times: list[float] = []

        original_server = None
        if args.server == "host":  # the image has no torch: the original's way runs from this checkout
            print("== the original's handlers (PyTorch eager) on the same serving stack", flush=True)
            original_server = ServedOnHost(original_model_dir(model_dir, args.arch, args.classes),
                                           {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}, plugins)
            first_answer(original_server, payloads[0])
            sequential(original_server.url, payloads, 10)  # warm
        original_served: list[float] = []

        for workers, threads, solo in parse_layouts(args.layouts):
            label = layout_label(workers, threads, solo)
            print(f"== layout {label}: {workers} worker(s) x {threads} engine thread(s), {solo} for a request "
                  "alone", flush=True)
            server = start({"SAGEMAKER_MODEL_SERVER_WORKERS": str(workers), "KENNEL_ORT_THREADS": str(threads),
                            "KENNEL_ORT_SOLO_THREADS": str(solo)})
            try:
                first_answer(server, payloads[0])
                sequential(server.url, payloads, 10)  # warm
                served, worker, gapped = [], [], []
                for _ in range(args.rounds):
                    config = engine_config(solo)
                    inproc[config].append(time_calls(pipelines[config], payloads, args.requests))
                    if config != "1t":
                        inproc["1t"].append(time_calls(pipelines["1t"], payloads, args.requests))
                    eager_times.append(time_calls(eager, payloads, args.requests))
                    if original_server is not None:
                        original_served.append(sequential(original_server.url, payloads, args.requests)[0])
                    p50, worker_p50 = sequential(server.url, payloads, args.requests)
                    served.append(p50)
                    if worker_p50 is not None:
                        worker.append(worker_p50)
                        # The served worker idles between requests while each answer travels:
                        # the same engine in process, with that idle gap before each call.
                        gapped.append(time_calls(pipelines[config], payloads, args.requests,
                                                 gap_s=max(0.0, p50 - worker_p50)))
                steps = saturation(server.url, payloads, workers, args.saturation_s)
            finally:
                server.stop()
            results["layouts"][label] = {"workers": workers, "threads": threads, "solo_threads": solo,
                                         "served_p50_s": statistics.median(served), "served_p50_rounds_s": served,
                                         "worker_p50_s": statistics.median(worker) if worker else None,
                                         "inproc_gapped_p50_s": statistics.median(gapped) if gapped else None,
                                         "saturation": steps}

        if original_server is not None:
            original_server.stop()
        print("== cold starts (default layout)", flush=True)
        cold = []
        for _ in range(args.cold_starts):
            server = start({})
            try:
                cold.append(first_answer(server, payloads[0]))
            finally:
                server.stop()
        results["cold_start_s"] = cold

    single = statistics.median(inproc["1t"])
    results["inproc_p50_s"] = {config: statistics.median(v) for config, v in inproc.items() if v}
    results["original_eager_p50_s"] = statistics.median(eager_times)
    if original_served:
        results["original_served_p50_s"] = statistics.median(original_served)
    for label, layout in results["layouts"].items():
        best = max(step["throughput"] for step in layout["saturation"].values())
        layout["engine"] = engine_config(layout["solo_threads"])
        layout["latency_ratio"] = layout["served_p50_s"] / results["inproc_p50_s"][layout["engine"]]
        if layout["inproc_gapped_p50_s"]:
            layout["latency_ratio_gapped"] = layout["served_p50_s"] / layout["inproc_gapped_p50_s"]
        layout["throughput_per_s"] = best
        layout["throughput_ratio"] = best / (cpus / single)
        layout["speedup_vs_original"] = results["original_eager_p50_s"] / layout["served_p50_s"]
        if original_served:
            layout["speedup_vs_original_served"] = results["original_served_p50_s"] / layout["served_p50_s"]
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if cgroup_parent:
        PRIORITY_CGROUP.rmdir()  # empty again: the containers (--rm) are gone
    report(results, cpus)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict, cpus: int) -> None:
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    m = results["machine"]
    print(f"\nmachine: {m['cpu']}, {cpus} CPUs, {m['memory_gib']} GiB, docker {m['docker']}, "
          f"load average {m['load_average_at_start']} -> {m['load_average_at_end']}")
    print(f"model: {results['model']}; payload: 500x375 JPEG, {results['payload_bytes'] / 1000:.0f} kB; "
          f"served by {results['server']}" + (", CPU weight of nice -19" if results["priority"] else ""))
    print("in-process decode+preprocess+forward (ONNX Runtime, by engine threads): " +
          ", ".join(f"{config} {ms(v)}" for config, v in sorted(results["inproc_p50_s"].items())))
    print(f"original's way (PyTorch eager, default threads): {ms(results['original_eager_p50_s'])} in process"
          + (f", {ms(results['original_served_p50_s'])} served by the same stack (p50)"
             if "original_served_p50_s" in results else ""))
    target = results["targets"]
    for label, layout in results["layouts"].items():
        print(f"\nlayout {label}: served p50 {ms(layout['served_p50_s'])} "
              f"= {layout['latency_ratio']:.2f} x in-process {layout['engine']} (target <= {target['latency_ratio_max']})"
              + (f"; the worker's own time {ms(layout['worker_p50_s'])} (Server-Timing), "
                 f"{ms(layout['served_p50_s'] - layout['worker_p50_s'])} outside it"
                 if layout.get("worker_p50_s") is not None else ""))
        if layout.get("latency_ratio_gapped"):
            print(f"  in process with that idle gap before each call: {ms(layout['inproc_gapped_p50_s'])}, "
                  f"served = {layout['latency_ratio_gapped']:.2f} x that")
        print(f"  throughput {layout['throughput_per_s']:.1f}/s = {layout['throughput_ratio']:.2f} x "
              f"{cpus} CPUs / single-thread time (target >= {target['throughput_ratio_min']}); steps: " +
              ", ".join(f"{k} in flight {v['throughput']:.1f}/s p99 {ms(v['p99'])}"
                        for k, v in layout["saturation"].items()))
        print(f"  {layout['speedup_vs_original']:.2f} x faster than the original's way in process"
              + (f", {layout['speedup_vs_original_served']:.2f} x served" if "speedup_vs_original_served" in layout
                 else "") + f" (target >= {target['speedup_vs_original_min']})")
    cold = results["cold_start_s"]
    print(f"\ncold start ({'docker run' if results['server'] == 'docker' else 'serve'} -> first 200): median {statistics.median(cold):.1f} s of "
          f"{', '.join(f'{c:.1f}' for c in cold)} (target <= {target['cold_start_s_max']} s)")
    print(f"image size: {results['image_bytes'] / 1e6:.0f} MB (target <= {target['image_bytes_max'] / 1e6:.0f} MB)")


if __name__ == "__main__":
    sys.exit(main())
