"""Measure the Lambda function's cold start: module import, first call, warm call.

    kennel-lambda-cold-start [--runs 15]

Each run is a fresh Python process, as a new execution environment is. It
imports the handler module (Lambda's init phase), calls it once (the first
invocation: the client is created here) and once more (a warm invocation). The
calls go over real HTTP to kennel_ops.local_runtime, which forwards to a small
server answering /invocations with 133 scores at once, so what is measured is
the function's own cost, not the model's.

Side by side, in the same run, the original function's shape: a module that
imports boto3 and creates its client at import time, then calls invoke_endpoint.
Medians of --runs runs are printed with their ratio; docs/benchmarks.md holds
the figures and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kennel_ops.checkout import REPO
from kennel_ops.local_runtime import LocalRuntime

ENDPOINT = "kennel-cold-start"
SCORES = json.dumps([[round(0.01 * i - 0.66, 4) for i in range(133)]]).encode()

_KENNEL = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import kennel_lambda
    t1 = time.perf_counter()
    class Context:
        def get_remaining_time_in_millis(self):
            return 30_000
    first = kennel_lambda.handler({"url": "https://example.com/dog.jpg"}, Context())
    t2 = time.perf_counter()
    warm = kennel_lambda.handler({"url": "https://example.com/dog.jpg"}, Context())
    t3 = time.perf_counter()
    assert first["statusCode"] == warm["statusCode"] == 200, (first, warm)
    print(json.dumps({"import": t1 - t0, "first": t2 - t1, "warm": t3 - t2}))
""")

# The original function's shape: boto3 imported and the client created at import time.
_ORIGINAL = textwrap.dedent("""
    import json, os, time
    t0 = time.perf_counter()
    import boto3
    runtime = boto3.client("sagemaker-runtime")
    t1 = time.perf_counter()
    def handler(event):
        response = runtime.invoke_endpoint(EndpointName=os.environ["ENDPOINT_NAME"], ContentType="application/json",
                                           Accept="application/json", Body=json.dumps(event))
        return {"statusCode": 200, "body": response["Body"].read().decode()}
    first = handler({"url": "https://example.com/dog.jpg"})
    t2 = time.perf_counter()
    warm = handler({"url": "https://example.com/dog.jpg"})
    t3 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "first": t2 - t1, "warm": t3 - t2}))
""")


class _ScoresHandler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # one segment per answer, as a real server sends it
    def log_message(self, *_args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(SCORES)))
        self.end_headers()
        self.wfile.write(SCORES)


def measure(code: str, env: dict[str, str]) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-lambda-cold-start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)

    container = ThreadingHTTPServer(("127.0.0.1", 0), _ScoresHandler)
    threading.Thread(target=container.serve_forever, daemon=True).start()
    samples: dict[str, list[dict[str, float]]] = {"kennel": [], "original": []}
    with LocalRuntime(f"http://127.0.0.1:{container.server_address[1]}", [ENDPOINT]) as runtime:
        env = {**os.environ, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime.url, "AWS_ACCESS_KEY_ID": "local",
               "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1", "ENDPOINT_NAME": ENDPOINT,
               "PYTHONPATH": str(REPO / "lambda"), "PYTHONDONTWRITEBYTECODE": "", "AWS_CONFIG_FILE": "/dev/null",
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        measure(_KENNEL, env), measure(_ORIGINAL, env)  # bytecode caches written, disk cache warm
        codes = {"kennel": _KENNEL, "original": _ORIGINAL}
        for run in range(args.runs):
            # Interleaved, and in alternating order, so that machine noise and the
            # page cache left by the previous process favour neither.
            for name in (("kennel", "original") if run % 2 == 0 else ("original", "kennel")):
                samples[name].append(measure(codes[name], env))
    container.shutdown()

    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {args.runs} fresh processes each, medians:")
    print(f"{'':28}{'import':>10}{'first call':>12}{'warm call':>11}{'import+first':>14}")
    medians = {}
    for name, label in (("kennel", "kennel_lambda"), ("original", "original (client at import)")):
        m = {key: statistics.median(s[key] for s in samples[name]) * 1000 for key in ("import", "first", "warm")}
        m["total"] = statistics.median((s["import"] + s["first"]) * 1000 for s in samples[name])
        medians[name] = m
        print(f"{label:28}{m['import']:>8.1f}ms{m['first']:>10.1f}ms{m['warm']:>9.1f}ms{m['total']:>12.1f}ms")
    ratio = medians["kennel"]["total"] / medians["original"]["total"]
    print(f"import+first call, kennel / original: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
