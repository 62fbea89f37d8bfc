"""Local end-to-end smoke test: the serving container and the Lambda function on this host.

    make smoke                                  # ./model, after `make train`
    MODEL_DIR=path/to/model make smoke
    kennel-smoke --model-dir ./model            # or python -m kennel_ops.smoke

Steps, each of which must pass:

1. the model folder holds a kennel model (kennel.json + model.onnx);
2. the sample image: --image, else the first of data/sample/test, else one drawn
   like the bundled sample (kennel_train.sample);
3. `serve` of compose.yaml, with compose.smoke.yaml's overlay (a static file
   server `images`, the only host serve may fetch from besides public ones),
   comes up under its own project name on a free 127.0.0.1 port and answers /ping;
4. the image as JPEG bytes, as base64 JSON and as a URL on `images`: the top
   breeds are printed, and the three must agree;
5. the Lambda handler (lambda/kennel_lambda.py), called in this process with
   AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME pointing at kennel_ops.local_runtime, which
   forwards to the container: its raw scores must equal the container's, its
   top-k the container's top-k; a bad event must get a 400.

Any failure prints one line, "smoke: FAILED at <step>: <reason>", and exits 1.
Whatever was started is torn down in every case (also on Ctrl-C).
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kennel_ops.checkout import REPO
from kennel_ops.local_runtime import LocalRuntime

COMPOSE_FILES = (REPO / "compose.yaml", REPO / "compose.smoke.yaml")
ENDPOINT = "kennel-smoke"
TOPK_JSON = "application/vnd.kennel.topk+json"
IMAGE_FILE = "sample.jpg"
IMAGES_URL = f"http://images:8000/{IMAGE_FILE}"  # as the serve container reaches the file server


class SmokeFailure(Exception):
    """One step failed; the message is the reason."""


class Step:
    """`with Step("name"):` turns any failure inside into SmokeFailure naming the step."""

    current = "start"

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> "Step":
        Step.current = self.name
        return self

    def __exit__(self, kind, error, _trace) -> bool:
        if error is not None and not isinstance(error, (SmokeFailure, KeyboardInterrupt, SystemExit)):
            raise SmokeFailure(f"{type(error).__name__}: {error}") from error
        return False


def say(message: str) -> None:
    print(f"smoke: {message}", flush=True)


# -- 1, 2: model and image ------------------------------------------------------------------

def check_model(model_dir: Path) -> int:
    import kennel_artifact
    if not model_dir.is_dir():
        raise SmokeFailure(f"{model_dir} does not exist: run `make train` first, or set MODEL_DIR")
    try:
        manifest = kennel_artifact.load(model_dir)
    except kennel_artifact.ArtifactError as exc:
        raise SmokeFailure(str(exc)) from None
    say(f"model {model_dir}: {manifest.architecture}, {manifest.num_classes} classes")
    return manifest.num_classes


def sample_image(explicit: Path | None) -> bytes:
    if explicit is not None:
        say(f"image {explicit}")
        return explicit.read_bytes()
    bundled = sorted((REPO / "data" / "sample" / "test").glob("*/*.jpg"))
    if bundled:
        say(f"image {bundled[0].relative_to(REPO)}")
        return bundled[0].read_bytes()
    import io
    from kennel_train.sample import BREEDS, draw_image
    buffer = io.BytesIO()
    draw_image(0, random.Random("smoke")).save(buffer, "JPEG", quality=90)
    say(f"image drawn like the bundled sample's {BREEDS[0]} (no data/sample yet)")
    return buffer.getvalue()


# -- 3: the containers -------------------------------------------------------------------------

class ComposeProject:
    def __init__(self, model_dir: Path, images_dir: Path, serve_image: str) -> None:
        self.name = f"kennel-smoke-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "KENNEL_MODEL_DIR": str(model_dir), "KENNEL_SMOKE_IMAGES": str(images_dir),
                    "KENNEL_SERVE_IMAGE": serve_image}
        self.started = False

    def command(self, *args: str) -> list[str]:
        files = [arg for path in COMPOSE_FILES for arg in ("--file", str(path))]
        return ["docker", "compose", "--project-name", self.name, "--project-directory", str(REPO), *files, *args]

    def run(self, *args: str, timeout: float = 300) -> str:
        process = subprocess.Popen(self.command(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or too slow: let compose stop by itself rather than
            # SIGKILL it, or containers it asked the engine for appear after our `down` ran.
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
            raise
        if process.returncode != 0:
            lines = [line for line in stderr.strip().splitlines() if line.strip()] or ["no output"]
            raise SmokeFailure(f"docker compose {args[0]}: {lines[-1]}")
        return stdout

    def up(self) -> None:
        self.started = True
        self.run("up", "--detach", "--no-build", "serve", "images", timeout=600)

    def serve_address(self) -> str:
        return "http://" + self.run("port", "serve", "8080").strip()

    def serve_state(self) -> str:
        output = self.run("ps", "--all", "--format", "json", "serve")
        for line in output.strip().splitlines():
            return json.loads(line).get("State", "")
        return "missing"

    def last_log_line(self) -> str:
        result = subprocess.run(self.command("logs", "--no-color", "--tail", "20", "serve"), env=self.env,
                                capture_output=True, text=True, timeout=60)
        lines = [line.split("|", 1)[-1].strip() for line in result.stdout.splitlines() if line.strip()]
        return lines[-1] if lines else "no log output"

    def leftovers(self) -> list[str]:
        """Containers and networks of this project that still exist (docker's own labels)."""
        label = f"label=com.docker.compose.project={self.name}"
        found = []
        for kind in (["ps", "--all"], ["network", "ls"]):
            result = subprocess.run(["docker", *kind, "--quiet", "--filter", label], capture_output=True, text=True,
                                    timeout=60)
            found += result.stdout.split()
        return found

    def down(self) -> None:
        """Remove the project; again while anything of it is left (the engine may still be
        finishing a create that an interrupted `up` asked for), for 120 s at most: on a busy
        host one `down` alone (a 10 s stop, then the removals) can take most of a minute."""
        if not self.started:
            return
        deadline = time.monotonic() + 120
        while True:
            subprocess.run(self.command("down", "--volumes", "--remove-orphans", "--timeout", "10"), env=self.env,
                           capture_output=True, timeout=300)
            left = self.leftovers()
            if not left:
                # A create that an interrupted `up` asked for can land after `down` looked:
                # done only when nothing has appeared a few seconds later either.
                time.sleep(3)
                left = self.leftovers()
                if not left:
                    return
            if time.monotonic() > deadline:
                say(f"could not remove {len(left)} container(s)/network(s) of compose project {self.name}; "
                    f"remove them with: docker compose --project-name {self.name} down")
                return
            time.sleep(1)


def wait_for_ping(project: ComposeProject, address: str, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            with urllib.request.urlopen(f"{address}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        state = project.serve_state()
        if state not in ("running", "created", "restarting"):
            raise SmokeFailure(f"serve is {state}: {project.last_log_line()}")
        time.sleep(0.5)
    raise SmokeFailure(f"/ping did not answer 200 within {timeout_s:.0f} s: {project.last_log_line()}")


# -- 4: the container directly -----------------------------------------------------------------

def invoke(address: str, body: bytes, content_type: str, accept: str, top_k: int | None = None) -> Any:
    headers = {"Content-Type": content_type, "Accept": accept}
    if top_k is not None:
        headers["X-Amzn-SageMaker-Custom-Attributes"] = f"top_k={top_k}"
    request = urllib.request.Request(f"{address}/invocations", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise SmokeFailure(f"HTTP {exc.code}: {exc.read()[:300].decode('utf-8', 'replace')}") from None


def breeds_line(top: list[dict[str, Any]]) -> str:
    return ", ".join(f"{entry['breed']} {entry['probability']:.3f}" for entry in top)


def same_top_k(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> bool:
    return [e["class_name"] for e in first] == [e["class_name"] for e in second] and all(
        math.isclose(a["probability"], b["probability"], abs_tol=1e-5) for a, b in zip(first, second))


def classify_directly(address: str, image: bytes, top_k: int, num_classes: int) -> tuple[list, list]:
    """Raw scores and top-k for the JPEG; the base64 JSON and URL forms must give the same top-k."""
    with Step("container, raw scores"):
        scores = invoke(address, image, "image/jpeg", "application/json")
        if len(scores) != 1 or len(scores[0]) != num_classes:
            raise SmokeFailure(f"expected [[{num_classes} scores]], got {str(scores)[:100]}")
    forms = {
        "JPEG": (image, "image/jpeg"),
        "base64 JSON": (json.dumps({"image": base64.b64encode(image).decode()}).encode(), "application/json"),
        "URL": (json.dumps({"url": IMAGES_URL}).encode(), "application/json"),
    }
    answers = {}
    for form, (body, content_type) in forms.items():
        with Step(f"container, {form}"):
            started = time.monotonic()
            (answer,) = invoke(address, body, content_type, TOPK_JSON, top_k)
            say(f"{form:12} -> {breeds_line(answer)}  ({(time.monotonic() - started) * 1000:.0f} ms)")
            answers[form] = answer
    with Step("container, forms agree"):
        for form, answer in answers.items():
            if not same_top_k(answer, answers["JPEG"]):
                raise SmokeFailure(f"{form} gave {breeds_line(answer)}, JPEG gave {breeds_line(answers['JPEG'])}")
    return scores, answers["JPEG"]


# -- 5: the Lambda function ---------------------------------------------------------------------

# How each Lambda call is labelled in the output, padded to one width.
LABELS = {key: f"{label:30}" for key, label in {
    "image": '{"image"}', "url": '{"url", "top_k"}', "function-url": "Function URL event, JPEG body",
    "bad": "bad event"}.items()}


class LambdaContext:
    """What the Lambda runtime passes: the function's remaining time (a 30 s function here)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


def show(response: dict[str, Any]) -> str:
    body = response["body"]
    return f"{response['statusCode']} {body if len(body) <= 160 else body[:150] + ' ...'}"


def call_lambda(address: str, image: bytes, scores: list, top: list, top_k: int) -> None:
    with LocalRuntime(address, [ENDPOINT]) as runtime:
        os.environ.update({"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime.url, "ENDPOINT_NAME": ENDPOINT,
                           "AWS_ACCESS_KEY_ID": "smoke", "AWS_SECRET_ACCESS_KEY": "smoke",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"})
        os.environ.pop("AWS_PROFILE", None)
        import kennel_lambda
        say(f"lambda via local SageMaker runtime {runtime.url} -> {address}/invocations")
        encoded = base64.b64encode(image).decode()

        with Step("lambda, image event"):
            response = kennel_lambda.handler({"image": encoded, "content_type": "image/jpeg"}, LambdaContext())
            say(f"lambda {LABELS['image']} -> {show(response)}")
            if response["statusCode"] != 200:
                raise SmokeFailure(show(response))
            got = json.loads(response["body"])
            if len(got) != 1 or len(got[0]) != len(scores[0]) or not all(
                    math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(got[0], scores[0])):
                raise SmokeFailure("the Lambda's scores differ from the container's for the same image")

        with Step("lambda, URL event"):
            response = kennel_lambda.handler({"url": IMAGES_URL, "top_k": top_k}, LambdaContext())
            say(f"lambda {LABELS['url']} -> {show(response)}")
            if response["statusCode"] != 200 or not same_top_k(json.loads(response["body"])[0], top):
                raise SmokeFailure(f"expected the container's top {top_k}: {show(response)}")

        with Step("lambda, Function URL event"):
            event = {"version": "2.0", "rawPath": "/", "rawQueryString": f"top_k={top_k}",
                     "queryStringParameters": {"top_k": str(top_k)}, "headers": {"content-type": "image/jpeg"},
                     "requestContext": {"http": {"method": "POST", "path": "/"}},
                     "body": encoded, "isBase64Encoded": True}
            response = kennel_lambda.handler(event, LambdaContext())
            say(f"lambda {LABELS['function-url']} -> {show(response)}")
            if response["statusCode"] != 200:
                raise SmokeFailure(show(response))
            say(f"lambda top {top_k}: {breeds_line(json.loads(response['body'])[0])}")

        with Step("lambda, bad event"):
            response = kennel_lambda.handler({"url": "ftp://example.com/dog.jpg"}, LambdaContext())
            say(f"lambda {LABELS['bad']} -> {show(response)}")
            if response["statusCode"] != 400:
                raise SmokeFailure(f"expected 400, got {show(response)}")


# -- the whole run ------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    with Step("model"):
        num_classes = check_model(args.model_dir.resolve())
    with Step("image"):
        image = sample_image(args.image)
    with Step("serving image"):
        found = subprocess.run(["docker", "image", "inspect", args.serve_image], capture_output=True, timeout=60)
        if found.returncode != 0:
            raise SmokeFailure(f"image {args.serve_image} not found: run `make image-serve`")
    images_dir = Path(tempfile.mkdtemp(prefix="kennel-smoke-"))
    project = ComposeProject(args.model_dir.resolve(), images_dir, args.serve_image)
    try:
        (images_dir / IMAGE_FILE).write_bytes(image)
        images_dir.chmod(0o755)  # the file server runs as the image's unprivileged user
        (images_dir / IMAGE_FILE).chmod(0o644)
        with Step("start"):
            say(f"starting serve and images (compose project {project.name})")
            project.up()
            address = project.serve_address()
        with Step("ping"):
            say(f"serve healthy on {address} after {wait_for_ping(project, address, args.timeout):.1f} s")
        scores, top = classify_directly(address, image, args.top_k, num_classes)
        call_lambda(address, image, scores, top, args.top_k)
    finally:
        # A SIGTERM or Ctrl-C during the teardown must not cut it short and leave containers.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            project.down()
        except (OSError, subprocess.SubprocessError) as exc:
            say(f"warning: `docker compose -p {project.name} down` failed ({exc}); remove it by hand")
        shutil.rmtree(images_dir, ignore_errors=True)


def _interrupt(*_: object) -> None:
    """SIGTERM (a CI job cancelled, `docker compose` stopping us) tears down like Ctrl-C."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR") or REPO / "model"))
    parser.add_argument("--image", type=Path, help="a JPEG to classify (default: the bundled sample's first)")
    parser.add_argument("--serve-image", default=os.environ.get("KENNEL_SERVE_IMAGE", "kennel-serve:latest"))
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for /ping")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(args)
    except SmokeFailure as exc:
        say(f"FAILED at {Step.current}: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; what it had started is removed")
        return 130
    say("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
