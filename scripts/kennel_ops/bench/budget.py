"""Request budget: what each hostile request costs a serving worker, beside a plain photo.

    kennel-bench-budget                         # ResNet-50, 133 classes, random weights
    kennel-bench-budget --model-dir model --json budget.json

Runs the worker's own request path in this process: kennel_serve's transformer
and handlers (input_fn -> predict_fn -> output_fn) inside sagemaker-inference,
with MMS's request context, the model loaded and warmed up as a worker does.
Each request of kennel_ops.load.bombs, and a 500 x 375 JPEG first for reference,
is measured alone: the resident-set high-water mark is reset (/proc/self/clear_refs)
after freed memory has gone back to the system (malloc_trim), so the figure is
what that one request added to an idle worker.

Prints one row per request (status, peak MiB above idle, seconds) and exits 1
when an answer is not the expected one or a request exceeds --budget-mib (the
serving docs' 256 MiB): the budget tests run it on a small model.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BUDGET_MIB = 256


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Give freed heap back, reset the high-water mark; the resident KiB it starts from."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_kib("VmRSS")


class Worker:
    """The serving worker's request path, in this process."""

    def __init__(self, model_dir: Path):
        from mms.context import Context, RequestProcessor

        from kennel_serve.mms_toolkit.transformer import KennelTransformer
        from kennel_serve.request_path import KennelInferenceHandler
        from kennel_serve.settings import ServeSettings

        env = {"SAGEMAKER_BASE_DIR": str(model_dir.parent), "KENNEL_URL_FETCH": "false",
               "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "KENNEL_ORT_THREADS": "1",
               "KENNEL_SERVE_STATE_DIR": tempfile.mkdtemp(prefix="kennel-budget-")}
        self.settings = ServeSettings.from_env(env)
        self.transformer = KennelTransformer(KennelInferenceHandler(self.settings), self.settings)
        # One context for the worker's life, its request processor replaced per request: as MMS
        # does it (the toolkit keeps the context it was initialised with and reads headers there).
        self.context = Context("model", str(model_dir), {}, 1, None, "1.1.11")
        self.context.request_processor = [RequestProcessor({})]
        self.transformer.validate_and_initialize(model_dir=str(model_dir), context=self.context)

    def invoke(self, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        from mms.context import RequestProcessor
        self.context.request_processor = [RequestProcessor(
            {"Content-Type": content_type, "Accept": "application/json", **(headers or {})})]
        (answer,) = self.transformer.transform([{"body": body}], self.context)
        status = self.context.request_processor[0].get_response_status_code()
        return int(status or 200), answer if isinstance(answer, str) else bytes(answer).decode("utf-8", "replace")


def measure(model_dir: Path) -> list[dict]:
    from kennel_ops.load import bombs
    from kennel_ops.load.payloads import dog_photos

    worker = Worker(model_dir)
    requests = [bombs.BudgetCase("500 x 375 JPEG (a typical dog photo)", dog_photos(1, seed=3)[0],
                                 "image/jpeg", 200), *bombs.cases()]
    rows = []
    for case in requests:
        idle_kib = reset_peak()
        began = time.perf_counter()
        status, answer = worker.invoke(case.body, case.content_type, case.headers)
        seconds = time.perf_counter() - began
        peak_mib = (_status_kib("VmHWM") - idle_kib) / 1024
        reason = "" if status == 200 else json.loads(answer).get("error", "")
        rows.append({"request": case.name, "bytes": len(case.body), "expected": case.expect, "status": status,
                     "peak_mib": round(peak_mib, 1), "seconds": round(seconds, 3), "reason": reason})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-bench-budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a kennel model dir (default: a random ResNet-50, 133 classes)")
    parser.add_argument("--budget-mib", type=float, default=BUDGET_MIB, help="most a request may add (MiB)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if args.model_dir is None:
        from kennel_ops.bench.models import write_random_model
        args.model_dir = write_random_model(Path(tempfile.mkdtemp(prefix="kennel-budget-")) / "model",
                                            "resnet50", num_classes=133)
    rows = measure(args.model_dir.resolve())
    print(f"{'request':<72} {'bytes':>9} {'status':>6} {'peak MiB':>9} {'seconds':>8}")
    failures = []
    for row in rows:
        print(f"{row['request']:<72} {row['bytes']:>9} {row['status']:>6} {row['peak_mib']:>9.1f} "
              f"{row['seconds']:>8.3f}")
        if row["status"] != row["expected"]:
            failures.append(f"{row['request']}: HTTP {row['status']}, expected {row['expected']} ({row['reason']})")
        if row["peak_mib"] > args.budget_mib:
            failures.append(f"{row['request']}: {row['peak_mib']:.0f} MiB above idle, budget {args.budget_mib:.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
