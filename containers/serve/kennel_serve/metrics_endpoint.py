"""`GET /metrics` on a port of its own: Prometheus text (format 0.0.4) for compose and EC2.

MMS runs each model worker in its own process, so no process holds every count. The
launcher serves this endpoint from a thread: each scrape sums the workers' files
(metrics.read_all_workers) and adds gauges read at that moment: the busy and live
workers (the activity flags) and the resident memory of serve's processes (the
launcher and everything it started: MMS's JVM and its Python workers). Standard
library only; a scrape costs the workers nothing.

Proved by: tests/unit/test_serve_metrics.py,
tests/contract/test_serve_observability.py.
"""
from __future__ import annotations

import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kennel_serve import metrics
from kennel_serve.mms_toolkit import activity
from kennel_serve.settings import ServeSettings

log = logging.getLogger("kennel_serve")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _histogram(lines: list[str], name: str, labels: str, histogram: metrics.Histogram) -> None:
    cumulative = 0
    for bound, count in zip(metrics.BUCKETS_S, histogram.buckets):
        cumulative += count
        lines.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {cumulative}')
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {histogram.count}')
    lines.append(f"{name}_sum{{{labels}}} {histogram.sum:.6f}")
    lines.append(f"{name}_count{{{labels}}} {histogram.count}")


def prometheus_text(counts: metrics.WorkerCounts, model: str, busy: int, live: int, resident_bytes: int) -> str:
    label = f'model="{model}"'
    lines = ["# HELP kennel_requests_total Answers to POST /invocations, by status class.",
             "# TYPE kennel_requests_total counter"]
    for key in sorted(counts.answers):
        lines.append(f'kennel_requests_total{{{label},status_class="{key}"}} {counts.answers[key]}')
    lines += ["# HELP kennel_request_seconds The worker's time per answer (Server-Timing: worker).",
              "# TYPE kennel_request_seconds histogram"]
    _histogram(lines, "kennel_request_seconds", label, counts.worker)
    lines += ["# HELP kennel_stage_seconds The worker's time per answer in each stage of the request path.",
              "# TYPE kennel_stage_seconds histogram"]
    for name in metrics.STAGES:
        _histogram(lines, "kennel_stage_seconds", f'{label},stage="{name}"', counts.stages[name])
    lines += ["# HELP kennel_received_bytes_total Request body bytes.", "# TYPE kennel_received_bytes_total counter",
              f"kennel_received_bytes_total{{{label}}} {counts.received_bytes}",
              "# HELP kennel_sent_bytes_total Answer body bytes.", "# TYPE kennel_sent_bytes_total counter",
              f"kennel_sent_bytes_total{{{label}}} {counts.sent_bytes}",
              "# HELP kennel_busy_workers Workers handling a request now.", "# TYPE kennel_busy_workers gauge",
              f"kennel_busy_workers{{{label}}} {busy}",
              "# HELP kennel_workers Live model workers.", "# TYPE kennel_workers gauge",
              f"kennel_workers{{{label}}} {live}",
              "# HELP kennel_resident_memory_bytes Resident memory of serve's processes (launcher, JVM, workers).",
              "# TYPE kennel_resident_memory_bytes gauge",
              f"kennel_resident_memory_bytes{{{label}}} {resident_bytes}"]
    return "\n".join(lines) + "\n"


def _process_tree(root: int) -> list[int]:
    """root and every process descended from it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def resident_bytes(root: int) -> int:
    total = 0
    for pid in _process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    return total


def live_workers(state_dir: Path) -> int:
    live = 0
    for path in (Path(state_dir) / activity.WORKERS_DIR).glob("*"):
        try:
            os.kill(int(path.name), 0)
            live += 1
        except (ValueError, OSError):
            continue
    return live


def scrape(settings: ServeSettings) -> str:
    return prometheus_text(metrics.read_all_workers(settings.state_dir), settings.metrics_model,
                           activity.busy_workers(settings.state_dir), live_workers(settings.state_dir),
                           resident_bytes(os.getpid()))


def start_metrics_endpoint(settings: ServeSettings) -> ThreadingHTTPServer:
    """Serve GET /metrics on settings.metrics_port from a daemon thread; OSError when the port is taken."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] != "/metrics":
                self._answer(404, "only GET /metrics is here\n", "text/plain; charset=utf-8")
                return
            self._answer(200, scrape(settings), CONTENT_TYPE)

        def _answer(self, status: int, text: str, content_type: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # one line per scrape would bury the log
            pass

    server = ThreadingHTTPServer((settings.bind_address, settings.metrics_port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True).start()
    return server
