"""Send one request to the asynchronous endpoint NAME and print its answer.

Uploads FILE under the endpoint's inputs/ folder (see kennel_ops.aws.async_layout),
calls InvokeEndpointAsync, then polls the answer's OutputLocation and
FailureLocation until one exists (at most --wait-minutes) and prints the answer
on stdout (or writes it to --out). A failed request ends with the endpoint's own
error line and exit status 1; --no-wait prints where the answer will appear.

  kennel-aws invoke-async --input dogs.jsonl              # one JSON line per image
  kennel-aws invoke-async --input rex.jpg --accept application/vnd.kennel.topk+json
"""
from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from botocore.exceptions import ClientError

from kennel_ops.aws.async_layout import AsyncLayout
from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.names import Names
from kennel_ops.aws.s3 import S3Uri, parse_s3_uri
from kennel_ops.aws.waiting import Poll, wait_for

COMMAND = "invoke-async"
HELP = "send one request to the async endpoint (through S3) and print the answer"
# InvokeEndpointAsync takes request bodies of up to 1 GB.
MAX_INPUT_BYTES = 1_000_000_000
CONTENT_TYPES = {".jsonl": "application/jsonlines", ".jsonlines": "application/jsonlines",
                 ".json": "application/json", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
                 ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff",
                 ".tiff": "image/tiff"}
MISSING_OBJECT_CODES = {"NoSuchKey", "404", "NotFound"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, required=True, metavar="FILE", help="the request body")
    parser.add_argument("--content-type", help="(default: from FILE's extension: .jsonl, .json, .jpg, .png ...)")
    parser.add_argument("--accept", default="application/json", help="answer type (%(default)s)")
    parser.add_argument("--input-prefix", metavar="S3URI",
                        help="where to upload FILE (default: the endpoint's s3://.../inputs/ from deploy --async)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the answer here instead of stdout")
    parser.add_argument("--no-wait", action="store_true", help="print the answer's S3 location and return")
    parser.add_argument("--poll-seconds", type=float, default=5.0, help="answer poll interval (%(default)s)")
    parser.add_argument("--wait-minutes", type=float, default=20.0,
                        help="give up waiting after (%(default)s; the request itself may take up to 60)")


def content_type_of(args: argparse.Namespace) -> str:
    if args.content_type:
        return args.content_type
    guessed = CONTENT_TYPES.get(args.input.suffix.lower())
    if guessed is None:
        raise CliError(f"cannot tell the content type of {args.input.name}: pass --content-type")
    return guessed


def read_input(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CliError(f"no input file {path}") from None
    if not path.is_file():
        raise CliError(f"{path} is not a file")
    if size == 0:
        raise CliError(f"{path} is empty")
    if size > MAX_INPUT_BYTES:
        raise CliError(f"{path} has {size} bytes; asynchronous requests take at most 1 GB")
    return path.read_bytes()


def inputs_folder(aws: Aws, args: argparse.Namespace, names: Names) -> S3Uri:
    endpoint = describe_or_none(aws.client("sagemaker").describe_endpoint, EndpointName=names.endpoint)
    if endpoint is None:
        raise CliError(f"no endpoint {names.endpoint}: run `kennel-aws deploy --async --output s3://...` first")
    config = aws.client("sagemaker").describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    async_config = config.get("AsyncInferenceConfig")
    if not async_config:
        raise CliError(f"endpoint {names.endpoint} is not asynchronous: call it with InvokeEndpoint "
                       "(the Lambda or kennel-smoke), or deploy it with --async")
    if args.input_prefix:
        try:
            return parse_s3_uri(args.input_prefix).folder()
        except ValueError as error:
            raise CliError(f"--input-prefix: {error}") from None
    return AsyncLayout.from_output_path(async_config["OutputConfig"]["S3OutputPath"]).inputs


def s3_object(aws: Aws, location: str) -> bytes | None:
    """The object's bytes, or None while it does not exist."""
    uri = parse_s3_uri(location)
    try:
        response = aws.client("s3").get_object(Bucket=uri.bucket, Key=uri.key_prefix)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in MISSING_OBJECT_CODES:
            return None
        raise
    return response["Body"].read()


def wait_for_answer(aws: Aws, names: Names, response: dict, poll: Poll) -> bytes:
    output, failure = response["OutputLocation"], response.get("FailureLocation")
    found: dict[str, bytes] = {}

    def describe() -> dict:
        answer = s3_object(aws, output)
        if answer is not None:
            found["answer"] = answer
            return {"state": "answered"}
        error = s3_object(aws, failure) if failure else None
        if error is not None:
            return {"state": "failed", "reason": error.decode("utf-8", "replace")}
        return {"state": "waiting"}

    wait_for(f"request {response['InferenceId']} to {names.endpoint}", describe,
             status=lambda d: d["state"], done={"answered"}, failed={"failed"},
             reason=lambda d: " ".join(d["reason"].split())[:500], console=aws.console, poll=poll)
    return found["answer"]


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    names = Names(args.name)
    body = read_input(args.input)
    content_type = content_type_of(args)
    folder = inputs_folder(aws, args, names)
    inference_id = uuid.uuid4().hex
    key = f"{folder.key_prefix}{inference_id}/{args.input.name}"
    aws.send("s3", "put_object", Bucket=folder.bucket, Key=key, Body=body, ContentType=content_type)
    input_location = f"s3://{folder.bucket}/{key}"
    aws.changed(f"request uploaded to {input_location} ({len(body)} bytes)")
    response = aws.send("sagemaker-runtime", "invoke_endpoint_async", EndpointName=names.endpoint,
                        InputLocation=input_location, ContentType=content_type, Accept=args.accept,
                        InferenceId=inference_id)
    if response is None:  # --dry-run
        return
    aws.console.note(f"request {inference_id} queued; answer at {response['OutputLocation']}")
    if args.no_wait:
        aws.console.result(f"output {response['OutputLocation']}")
        if response.get("FailureLocation"):
            aws.console.result(f"failure {response['FailureLocation']}")
        return
    answer = wait_for_answer(aws, names, {**response, "InferenceId": inference_id},
                             Poll(interval_s=args.poll_seconds, timeout_s=args.wait_minutes * 60))
    if args.out:
        args.out.write_bytes(answer)
        aws.console.note(f"answer written to {args.out} ({len(answer)} bytes)")
    else:
        aws.console.result(answer.decode("utf-8", "replace").rstrip("\n"))
