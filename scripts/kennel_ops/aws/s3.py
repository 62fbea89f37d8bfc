"""S3 URIs: parsing, joining, the models folder of a multi-model endpoint, and a check
that a data prefix holds objects."""
from __future__ import annotations

import re
from dataclasses import dataclass

from kennel_ops.aws.arguments import argument_type
from kennel_ops.aws.context import Aws

BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Characters IAM reads as wildcards or policy variables in a resource ARN.
IAM_PATTERN_MARKS = ("*", "?", "${")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key_prefix: str = ""  # no leading slash; "" or ending in "/" for a folder

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key_prefix}"

    def folder(self) -> "S3Uri":
        if not self.key_prefix or self.key_prefix.endswith("/"):
            return self
        return S3Uri(self.bucket, self.key_prefix + "/")

    def child(self, *parts: str) -> "S3Uri":
        tail = "/".join(part.strip("/") for part in parts if part.strip("/"))
        return S3Uri(self.bucket, self.folder().key_prefix + tail + "/")


def parse_s3_uri(text: str) -> S3Uri:
    if not text.startswith("s3://"):
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {text!r}")
    bucket, _, key = text[len("s3://"):].partition("/")
    if not BUCKET.match(bucket):
        raise ValueError(f"invalid bucket name {bucket!r} in {text!r}")
    return S3Uri(bucket, key)


def s3_folder(text: str) -> S3Uri:
    """A folder-like S3 URI (ValueError when it is not an S3 URI)."""
    return parse_s3_uri(text).folder()


s3_uri = argument_type(s3_folder)  # argparse type: a folder-like S3 URI


def models_prefix(text: str) -> S3Uri:
    """s3://BUCKET/PREFIX/, the folder a multi-model endpoint loads its models from; ValueError
    for anything else. The trailing "/" is required, not added: SageMaker joins the prefix and
    the TargetModel as strings, so s3://b/models and s3://b/models/ name different objects."""
    uri = parse_s3_uri(text)
    if uri.key_prefix.strip("/") == "":
        raise ValueError(f"name a folder inside the bucket (s3://BUCKET/PREFIX/), not its root: {text!r}")
    if not uri.key_prefix.endswith("/"):
        raise ValueError(f"the models' prefix must end with '/' (s3://BUCKET/PREFIX/), got {text!r}")
    if any(mark in uri.key_prefix for mark in IAM_PATTERN_MARKS):
        raise ValueError(f"an IAM policy would read '*', '?' or '${{' in {text!r} as a pattern")
    return uri


models_prefix_type = argument_type(models_prefix)


def has_objects(aws: Aws, uri: S3Uri) -> bool:
    response = aws.client("s3").list_objects_v2(Bucket=uri.bucket, Prefix=uri.folder().key_prefix, MaxKeys=1)
    return response.get("KeyCount", 0) > 0
