"""Add a kennel model to a multi-model endpoint: MODEL_DIR -> s3://BUCKET/PREFIX/MODEL.tar.gz.

  kennel-aws add-model ./model s3://BUCKET/models/ --model-name rex-v2
  target-model rex-v2.tar.gz        <- InvokeEndpoint's TargetModel; the Lambda's "model"

MODEL_DIR must be a kennel model (kennel.json and model.onnx, checksums matching).
It is packed as a reproducible MODEL.tar.gz (kennel_ops.aws.model_archive: the
same model gives the same bytes) without model.pth, which serving never reads,
and uploaded with boto3's managed transfer (multipart for large files). The
endpoint (deploy --multi-model with the same prefix) loads it at its first
request; nothing is redeployed.

The object records the tar's digest: adding the same model again sends nothing.
A different model under a name already taken is refused: instances that have
loaded the old one keep serving it (SageMaker does not reload a model whose
object changed), so a new version takes a new name.
"""
from __future__ import annotations

import argparse
import tempfile
import urllib.parse
from pathlib import Path

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError

from kennel_ops.aws.context import Aws, CliError
from kennel_ops.aws.model_archive import pack
from kennel_ops.aws.names import target_model
from kennel_ops.aws.s3 import S3Uri, models_prefix_type

COMMAND = "add-model"
HELP = "pack a model folder (without model.pth) as MODEL.tar.gz under a multi-model endpoint's S3 prefix"
DIGEST_METADATA = "kennel-tar-sha256"  # S3 returns user metadata keys in lower case
MISSING_OBJECT_CODES = {"404", "NoSuchKey", "NotFound"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                        help="a kennel model folder; its model.pth is left out (serving reads model.onnx only)")
    parser.add_argument("prefix", type=models_prefix_type, metavar="S3URI",
                        help="s3://BUCKET/PREFIX/, the prefix given to `deploy --multi-model`")
    parser.add_argument("--model-name", metavar="MODEL",
                        help="the model's name, MODEL.tar.gz on the endpoint (default: MODEL_DIR's folder name); "
                             "letters, digits, '.', '_' and '-'")


def check_model(model_dir: Path) -> str:
    """A one-line description of the model; CliError when the folder is not a kennel model."""
    import kennel_artifact
    if not model_dir.is_dir():
        raise CliError(f"{model_dir} is not a folder")
    try:
        manifest = kennel_artifact.load(model_dir)
    except kennel_artifact.ArtifactError as error:
        raise CliError(f"{model_dir} is not a kennel model: {error}") from None
    return f"{manifest.architecture}, {manifest.num_classes} classes"


def stored_digest(aws: Aws, uri: S3Uri) -> str | None:
    """The tar digest the object records ("" when it records none), or None when there is no object."""
    try:
        head = aws.client("s3").head_object(Bucket=uri.bucket, Key=uri.key_prefix)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in MISSING_OBJECT_CODES:
            return None
        raise
    return head.get("Metadata", {}).get(DIGEST_METADATA, "")


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    described = check_model(args.model_dir)
    try:
        target = target_model(args.model_name or args.model_dir.resolve().name)
    except ValueError as error:
        raise CliError(f"{error} (pass --model-name)" if not args.model_name else str(error)) from None
    uri = S3Uri(args.prefix.bucket, args.prefix.key_prefix + target)
    with tempfile.TemporaryDirectory(prefix="kennel-add-model-") as folder:
        archive = pack(args.model_dir, Path(folder) / target)
        aws.console.note(f"packed {args.model_dir} ({described}): {', '.join(archive.members)}; "
                         f"{archive.size} bytes, tar sha256 {archive.tar_sha256}")
        stored = stored_digest(aws, uri)
        if stored == archive.tar_sha256:
            aws.console.note(f"{uri}: holds this model already")
        elif stored is not None:
            raise CliError(f"{uri} holds another model, and instances that loaded it would go on serving it: "
                           "add this one under a new --model-name")
        else:
            upload(aws, archive.path, uri, archive.tar_sha256)
    aws.console.result(f"target-model {target}")
    aws.console.result(f"object {uri}")


def upload(aws: Aws, path: Path, uri: S3Uri, digest: str) -> None:
    extra = {"ContentType": "application/gzip", "Metadata": {DIGEST_METADATA: digest},
             "Tagging": urllib.parse.urlencode(aws.tag_map())}
    try:
        aws.send("s3", "upload_file", Filename=str(path), Bucket=uri.bucket, Key=uri.key_prefix, ExtraArgs=extra)
    except S3UploadFailedError as error:  # the managed transfer wraps the ClientError in its own
        raise CliError(f"upload to {uri} failed: {error}") from None
    aws.changed(f"{uri}: uploaded ({path.stat().st_size} bytes)")
