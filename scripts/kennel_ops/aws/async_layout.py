"""Where an asynchronous endpoint's requests and answers live in S3.

`deploy --async --output s3://BUCKET/PREFIX/` makes PREFIX the endpoint's async
root, with three folders that never overlap, so the endpoint role can be given
each one for exactly what it needs:

  PREFIX/inputs/    requests (invoke-async uploads here; the role may read them)
  PREFIX/outputs/   answers (S3OutputPath; the role may write)
  PREFIX/failures/  error answers (S3FailurePath; the role may write)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kennel_ops.aws.context import Aws, CliError
from kennel_ops.aws.s3 import IAM_PATTERN_MARKS, S3Uri, parse_s3_uri

INPUTS, OUTPUTS, FAILURES = "inputs/", "outputs/", "failures/"
SNS_TOPIC = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$")


@dataclass(frozen=True)
class AsyncLayout:
    root: S3Uri  # a folder: s3://BUCKET/PREFIX/

    @property
    def inputs(self) -> S3Uri:
        return self.root.child(INPUTS)

    @property
    def outputs(self) -> S3Uri:
        return self.root.child(OUTPUTS)

    @property
    def failures(self) -> S3Uri:
        return self.root.child(FAILURES)

    @classmethod
    def from_output_path(cls, s3_output_path: str) -> "AsyncLayout":
        """The layout an endpoint config's S3OutputPath belongs to (it must end in outputs/)."""
        uri = parse_s3_uri(s3_output_path).folder()
        if uri.key_prefix != OUTPUTS and not uri.key_prefix.endswith("/" + OUTPUTS):
            raise CliError(f"S3OutputPath {s3_output_path} is not PREFIX/{OUTPUTS}: "
                           "the endpoint was not deployed with `kennel-aws deploy --async`; pass --input-prefix")
        return cls(S3Uri(uri.bucket, uri.key_prefix[:-len(OUTPUTS)]))


def layout_from_flag(text: str) -> AsyncLayout:
    """--output s3://BUCKET/PREFIX/ -> its layout; CliError for a URI IAM or SageMaker would misread."""
    try:
        root = parse_s3_uri(text).folder()
    except ValueError as error:
        raise CliError(f"--output: {error}") from None
    if any(mark in root.key_prefix for mark in IAM_PATTERN_MARKS):
        raise CliError(f"--output {text}: an IAM policy would read '*', '?' or '${{' in the prefix as a pattern")
    if len(str(root.child(FAILURES))) > 512:
        raise CliError(f"--output {text}: SageMaker takes S3 paths of at most 512 characters")
    return AsyncLayout(root)


def topic_arn(text: str) -> str:
    if not SNS_TOPIC.match(text):
        raise CliError(f"{text!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)")
    return text


def async_policy_statements(aws: Aws, configs: list[dict]) -> list[dict]:
    """IAM statements for the AsyncInferenceConfig of each config: read the inputs, write the
    answers and failures, publish to the topics; nothing else in S3 or SNS."""
    reads, writes, topics = set(), set(), set()
    for config in configs:
        output = config.get("OutputConfig", {})
        layout = AsyncLayout.from_output_path(output["S3OutputPath"])
        reads.add(object_arn(aws, layout.inputs))
        writes.add(object_arn(aws, parse_s3_uri(output["S3OutputPath"]).folder()))
        if output.get("S3FailurePath"):
            writes.add(object_arn(aws, parse_s3_uri(output["S3FailurePath"]).folder()))
        topics.update(value for key, value in (output.get("NotificationConfig") or {}).items()
                      if key in ("SuccessTopic", "ErrorTopic") and value)
    if not configs:
        return []
    statements = [{"Sid": "ReadAsyncRequests", "Effect": "Allow", "Action": "s3:GetObject", "Resource": sorted(reads)},
                  {"Sid": "WriteAsyncAnswers", "Effect": "Allow", "Action": "s3:PutObject",
                   "Resource": sorted(writes)}]
    if topics:
        statements.append({"Sid": "NotifyAsyncAnswers", "Effect": "Allow", "Action": "sns:Publish",
                           "Resource": sorted(topics)})
    return statements


def object_arn(aws: Aws, folder: S3Uri) -> str:
    """Every object under one folder: arn:PARTITION:s3:::BUCKET/PREFIX/*."""
    return f"arn:{aws.partition}:s3:::{folder.bucket}/{folder.key_prefix}*"
