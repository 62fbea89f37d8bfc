"""List the models under a multi-model endpoint's prefix, one line each:
TargetModel, size in bytes, last modified (UTC).

  kennel-aws list-models s3://BUCKET/models/

Only NAME.tar.gz objects directly under the prefix count (what `add-model`
writes and the Lambda function lets a caller name); sub-folders are not read.
"""
from __future__ import annotations

import argparse

from kennel_lambda_events import TARGET_MODEL

from kennel_ops.aws.context import Aws
from kennel_ops.aws.s3 import models_prefix_type

COMMAND = "list-models"
HELP = "list the NAME.tar.gz models under a multi-model endpoint's S3 prefix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", type=models_prefix_type, metavar="S3URI",
                        help="s3://BUCKET/PREFIX/, the prefix given to `deploy --multi-model`")


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    prefix = args.prefix
    found = 0
    pages = aws.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=prefix.bucket, Prefix=prefix.key_prefix, Delimiter="/")
    for page in pages:
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix.key_prefix):]
            if TARGET_MODEL.fullmatch(name):
                found += 1
                aws.console.result(f"{name} {item['Size']} {item['LastModified'].isoformat(timespec='seconds')}")
    if not found:
        aws.console.note(f"no models under {prefix}: add one with `kennel-aws add-model MODEL_DIR {prefix}`")
