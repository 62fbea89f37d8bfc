"""SageMaker's multi-model routes on the client port, in front of MMS (SAGEMAKER_MULTI_MODEL=true).

    POST   /models               {"model_name", "url"}: load (409 loaded, 507 no memory)
    GET    /models               ?next_page_token=&page_size=: {"models": [...], "nextPageToken"}
    GET    /models/NAME          {"modelName", "modelUrl"} (404 when not loaded)
    DELETE /models/NAME          unload (404 when not loaded)
    POST   /models/NAME/invoke   what /invocations answers on a single-model endpoint
    GET    /ping                 MMS's (the kennel plugin's) answer

Nothing else answers on the client port: MMS's own routes and management API stay on
loopback.

Why not MMS's multi-model mode, as sagemaker-inference runs it: MMS gives every
registered model Python processes of its own, so no two models can share anything,
and every extra model costs an interpreter, ONNX Runtime and its weights. Here MMS
runs ONE model, the multi-model host (kennel_serve.multi_model), on a loopback port;
its workers hold every loaded model, and the models trained with one frozen backbone
share that backbone. These routes keep the list of loaded models (models.json in the
state dir, which the workers watch to drop unloaded models) and send a load or an
invoke to MMS's /invocations as a job for the host's workers: X-Kennel-Mme-* headers
with KENNEL_MME_SECRET, which only the launcher, MMS and its workers know (a client's
X-Kennel-Mme-* headers are dropped). A load runs on one worker, which checks the model
and the memory; the other workers load the model at their first request for it.

Why not a route in the MMS plugin (mms-plugin/): MMS runs plugin endpoints on another
thread after its Netty handler has released the request, so a plugin reading a body
races the buffer's reuse (multi-model-server 1.1.11, HttpRequestHandlerChain.handleCustomEndpoint).

Proved by: tests/contract/test_serve_multi_model.py, tests/unit/test_serve_multi_model_host.py.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from kennel_serve.settings import ServeSettings

log = logging.getLogger("kennel_serve")

REGISTRY_FILE = "models.json"  # read by kennel_serve.multi_model
JOB_HEADER_PREFIX = "x-kennel-mme-"
# SageMaker's model names are hashes: anything that could leave a path or a header is refused.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,254}")
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
# Hop-by-hop headers are this connection's, not the request's (RFC 9110 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "host", "content-length"}
INTERNAL_ERROR = "internal error while handling the request; the server log has the details"


@dataclass
class Entry:
    url: str
    token: int  # a reload of a name is another model to the workers
    loaded: bool = False  # False while its load job runs: not listed, not invocable


class Registry:
    """The loaded models, by name; written to models.json for the workers on every change."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / REGISTRY_FILE
        self.models: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._tokens = 0
        self._write()

    def reserve(self, name: str, url: str) -> Entry | None:
        """A new entry for a load about to run; None when the name is taken (409)."""
        with self._lock:
            if name in self.models:
                return None
            self._tokens += 1
            entry = self.models[name] = Entry(url, self._tokens)
            return entry

    def loaded(self, name: str) -> Entry | None:
        with self._lock:
            entry = self.models.get(name)
            return entry if entry is not None and entry.loaded else None

    def finish(self, name: str, entry: Entry, ok: bool) -> None:
        with self._lock:
            if ok:
                entry.loaded = True
                self._write()  # a failed load was never listed: nothing to write
            elif self.models.get(name) is entry:
                del self.models[name]

    def remove(self, name: str) -> bool:
        with self._lock:
            entry = self.models.get(name)
            if entry is None or not entry.loaded:
                return False
            del self.models[name]
            self._write()
            return True

    def page(self, after: str | None, size: int) -> tuple[list[tuple[str, Entry]], str | None]:
        with self._lock:
            names = sorted(name for name, entry in self.models.items() if entry.loaded)
            rest = [n for n in names if after is None or n > after]
            return [(n, self.models[n]) for n in rest[:size]], (rest[size - 1] if len(rest) > size else None)

    def _write(self) -> None:
        listed = {name: {"url": e.url, "token": e.token} for name, e in self.models.items() if e.loaded}
        staged = self.path.with_name(f".{REGISTRY_FILE}.{os.getpid()}")
        staged.write_text(json.dumps({"models": listed}))
        os.replace(staged, self.path)  # the workers never read half a list


class MmsClient:
    """Keep-alive HTTP/1.1 connections to MMS on loopback, one per front thread."""

    def __init__(self, port: int, timeout_s: float):
        self.port = port
        self.timeout_s = timeout_s
        self._local = threading.local()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
        for attempt in (1, 2):  # MMS may have closed an idle kept-alive connection: one retry on a fresh one
            connection = getattr(self._local, "connection", None)
            fresh = connection is None
            if fresh:
                connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                                 timeout=self.timeout_s)
            try:
                connection.request(method, path, body=body, headers=headers or {})
                response = connection.getresponse()
                return response.status, response.getheaders(), response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                connection.close()
                self._local.connection = None
                if fresh or attempt == 2:
                    raise
            except OSError:
                connection.close()
                self._local.connection = None
                raise
        raise AssertionError("unreachable")


class MultiModelFront(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, settings: ServeSettings, mms_port: int, secret: str):
        self.settings = settings
        self.registry = Registry(settings.state_dir)
        self.mms = MmsClient(mms_port, settings.model_server_timeout_s + 5)
        self.secret = secret
        self.max_body = max(2 * settings.max_payload_bytes, settings.max_payload_bytes + (1 << 20))
        super().__init__((settings.bind_address, settings.port), FrontHandler)

    def job_headers(self, op: str, name: str, entry: Entry) -> dict[str, str]:
        return {"X-Kennel-Mme-Op": op, "X-Kennel-Mme-Model": name, "X-Kennel-Mme-Url": entry.url,
                "X-Kennel-Mme-Token": str(entry.token), "X-Kennel-Mme-Secret": self.secret}


class FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MultiModelFront
    server_version = "kennel"
    sys_version = ""
    # A connection that sends nothing for this long is closed: a client trickling a request
    # (or idling on keep-alive) cannot hold a thread for ever.
    timeout = 120

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _route(self, method: str) -> None:
        try:
            body = self._body()
            if body is None:
                return
            path = urlsplit(self.path).path
            segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
            if segments == ["ping"] and method == "GET":
                return self._ping()
            if not segments or segments[0] != "models" or len(segments) > 3:
                return self._error(404, "no such route; this multi-model endpoint answers GET /ping, POST /models, "
                                        "GET /models[/NAME], DELETE /models/NAME, POST /models/NAME/invoke")
            name = segments[1] if len(segments) > 1 else None
            if name is not None and not MODEL_NAME.fullmatch(name):
                return self._error(404, "model names are 1 to 255 letters, digits, '.', '_', '~' or '-'")
            allowed = {1: "GET, POST", 2: "GET, DELETE", 3: "POST"}[len(segments)]
            if len(segments) == 3 and segments[2] != "invoke":
                return self._error(404, f"no such route: /models/{name}/{segments[2]}")
            if method not in allowed.split(", "):
                return self._error(405, f"{method} is not allowed here; allowed: {allowed}", {"Allow": allowed})
            if len(segments) == 1:
                return self._list() if method == "GET" else self._load(body)
            if len(segments) == 2:
                return self._describe(name) if method == "GET" else self._unload(name)
            return self._invoke(name, body)
        except (OSError, http.client.HTTPException) as exc:
            log.warning("multi-model routes: multi-model-server did not answer %s %s: %s", self.command, self.path,
                        exc)
            self._error(503, "the model server is not answering; try again")
        except Exception:  # noqa: BLE001 (a client gets JSON, never a dropped connection)
            log.exception("multi-model front: request failed")
            self._error(500, INTERNAL_ERROR)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's answer to a malformed request line or headers, as JSON."""
        self.close_connection = True
        self._error(code, message or _phrase(code))

    def _body(self) -> bytes | None:
        """The request body (Content-Length only); None when an error was already answered."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._error(411, "send the body with a Content-Length")
            return None
        raw = self.headers.get("Content-Length") or "0"
        if not raw.isdigit():
            self._error(400, "Content-Length must be a whole number")
            return None
        length = int(raw)
        if length > self.server.max_body:
            self._error(413, f"the request body is {length} bytes, more than the limit of "
                             f"{self.server.settings.max_payload_bytes} bytes (SAGEMAKER_MAX_PAYLOAD_IN_MB)")
            self.close_connection = True  # the unread body would be taken for the next request
            return None
        return self.rfile.read(length) if length else b""

    # ------------------------------------------------------------------ routes

    def _ping(self) -> None:
        """MMS's /ping (the kennel plugin: 200 once a worker is up, 503 while draining)."""
        try:
            self._relay(*self.server.mms.request("GET", "/ping"))
        except (OSError, http.client.HTTPException):  # still starting, or already stopped
            self._json(503, {"status": "Unhealthy", "reason": "the model server is not up"})

    def _load(self, body: bytes) -> None:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            request = None
        if not isinstance(request, dict):
            return self._error(400, 'the body must be a JSON object {"model_name": ..., "url": ...}')
        name, url = request.get("model_name"), request.get("url")
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            return self._error(400, "model_name must be 1 to 255 letters, digits, '.', '_', '~' or '-', starting "
                                    "with a letter or digit")
        if not isinstance(url, str) or not url.startswith("/") or not Path(url).is_dir():
            return self._error(400, "url must name the model's directory in the container (SageMaker: "
                                    "/opt/ml/models/NAME/model)")
        entry = self.server.registry.reserve(name, url)
        if entry is None:
            return self._error(409, f"model {name} is already loaded")
        ok = False
        try:
            status, headers, answer = self.server.mms.request(
                "POST", "/invocations", headers=self.server.job_headers("load", name, entry))
            ok = status == 200
        finally:
            self.server.registry.finish(name, entry, ok)
        self._relay(status, headers, answer)

    def _invoke(self, name: str, body: bytes) -> None:
        entry = self.server.registry.loaded(name)
        if entry is None:
            return self._error(404, f"model {name} is not loaded")
        headers = {key: value for key, value in self.headers.items()
                   if key.lower() not in HOP_BY_HOP and not key.lower().startswith(JOB_HEADER_PREFIX)}
        headers.update(self.server.job_headers("invoke", name, entry))
        self._relay(*self.server.mms.request("POST", "/invocations", body, headers))

    def _list(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        size_text = (query.get("page_size") or query.get("limit") or [str(DEFAULT_PAGE_SIZE)])[0]
        if not size_text.isdigit() or not 1 <= int(size_text) <= MAX_PAGE_SIZE:
            return self._error(400, f"page_size must be a whole number from 1 to {MAX_PAGE_SIZE}")
        token = (query.get("next_page_token") or query.get("nextPageToken") or [""])[0]
        try:
            after = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode() if token else None
        except ValueError:
            return self._error(400, "next_page_token is not a token this server gave")
        page, last = self.server.registry.page(after, int(size_text))
        answer: dict = {"models": [{"modelName": n, "modelUrl": e.url} for n, e in page]}
        if last is not None:
            answer["nextPageToken"] = base64.urlsafe_b64encode(last.encode()).decode().rstrip("=")
        self._json(200, answer)

    def _describe(self, name: str) -> None:
        entry = self.server.registry.loaded(name)
        if entry is None:
            return self._error(404, f"model {name} is not loaded")
        self._json(200, {"modelName": name, "modelUrl": entry.url})

    def _unload(self, name: str) -> None:
        if not self.server.registry.remove(name):
            return self._error(404, f"model {name} is not loaded")
        self._json(200, {"status": f"model {name} unloaded"})  # the workers drop it on seeing models.json

    # ------------------------------------------------------------------ answers

    def _relay(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status, _phrase(status))
        for key, value in headers:
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, answer: dict, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(answer) + "\n").encode()
        self._relay(status, [("Content-Type", "application/json"), *(headers or {}).items()], body)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": message}, headers)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # MMS's access log has every request that reaches a worker


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def start_front(settings: ServeSettings, mms_port: int, secret: str) -> MultiModelFront:
    """Bind the client port and serve it from a thread of the launcher."""
    front = MultiModelFront(settings, mms_port, secret)
    threading.Thread(target=front.serve_forever, name="kennel-mme-front", daemon=True).start()
    return front
