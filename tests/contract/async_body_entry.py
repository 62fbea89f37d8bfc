"""Peak memory of one JSON lines request at an async endpoint's limits, on the worker's own request path.

    python async_body_entry.py MODEL_DIR COUNT   ->  {"status": ..., "peak_mib": ..., "bytes": ...}

Runs in a process of its own (as kennel_ops.bench.budget does), with the settings
`kennel-aws deploy --async` gives the container (kennel_ops.aws.deploy.ASYNC_ENV).
"""
import json
import sys
from pathlib import Path

from kennel_ops.aws.deploy import ASYNC_ENV
from kennel_ops.bench.budget import Worker, _status_kib, reset_peak
from kennel_serve.settings import ServeSettings
from serve_support import b64, jpeg_bytes


def main() -> None:
    model_dir, count = Path(sys.argv[1]), int(sys.argv[2])
    read_env = ServeSettings.from_env.__func__
    ServeSettings.from_env = classmethod(lambda cls, env: read_env(cls, {**env, **ASYNC_ENV}))
    worker = Worker(model_dir)
    photos = [jpeg_bytes((500, 375), seed=seed, quality=95) for seed in range(8)]
    worker.invoke(bytearray(b"".join(json.dumps({"image": b64(p)}).encode() + b"\n" for p in photos)),
                  "application/jsonlines")  # the engine's arena grows once, for a batch of 8, as in service
    body = "".join(json.dumps({"image": b64(photos[i % len(photos)])}) + "\n" for i in range(count)).encode()
    idle_kib = reset_peak()
    status, _ = worker.invoke(bytearray(body), "application/jsonlines")
    print(json.dumps({"status": status, "peak_mib": (_status_kib("VmHWM") - idle_kib) / 1024, "bytes": len(body)}))


if __name__ == "__main__":
    main()
