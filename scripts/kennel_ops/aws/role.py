"""Create (or update) NAME-sagemaker: the execution role of training and tuning
jobs, with a least-privilege inline policy instead of
AmazonSageMakerFullAccess:

  - read the S3 buckets given with --bucket (training data, pretrained weights);
  - write under --output (default s3://<first bucket>/NAME/): models,
    checkpoints, TensorBoard logs, output data;
  - pull from the two ECR repositories NAME-train and NAME-serve;
  - write CloudWatch logs under /aws/sagemaker/ and metrics in /aws/sagemaker/*;
  - with --vpc, the network-interface permissions a job or endpoint in a VPC needs.

The trust policy lets only SageMaker assume it, only for this account. The
train and tune commands use this role unless given --role-arn. The endpoint
runs with a role of its own, NAME-endpoint, that deploy manages (it must not
write where models live: see kennel_ops.aws.endpoint_role); NAME-sagemaker keeps
the NAME-serve pull and the VPC calls for a deploy given it with --role-arn.
"""
from __future__ import annotations

import argparse

from kennel_ops.aws.context import Aws, CliError
from kennel_ops.aws.iam import ensure_role
from kennel_ops.aws.names import Names
from kennel_ops.aws.s3 import S3Uri, s3_uri

COMMAND = "role"
HELP = "create/update the least-privilege SageMaker execution role NAME-sagemaker"
POLICY_NAME = "kennel-sagemaker-execution"
VPC_ACTIONS = [
    "ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
    "ec2:DeleteNetworkInterfacePermission", "ec2:DescribeDhcpOptions", "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSecurityGroups", "ec2:DescribeSubnets", "ec2:DescribeVpcs",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bucket", action="append", required=True, metavar="BUCKET",
                        help="S3 bucket the jobs read (data, pretrained weights); repeatable")
    parser.add_argument("--output", type=s3_uri, metavar="S3URI",
                        help="where jobs write (default: s3://<first bucket>/NAME/)")
    parser.add_argument("--vpc", action="store_true", help="also allow the ENI calls of jobs/endpoints in a VPC")


def trust_policy(aws: Aws) -> dict:
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "SageMakerOnlyForThisAccount",
        "Effect": "Allow",
        "Principal": {"Service": "sagemaker.amazonaws.com"},
        "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"aws:SourceAccount": aws.account}},
    }]}


def execution_policy(aws: Aws, names: Names, buckets: list[str], output: S3Uri, vpc: bool) -> dict:
    s3 = f"arn:{aws.partition}:s3:::"
    readable = {f"{s3}{bucket}/*" for bucket in buckets}
    if output.bucket not in buckets:  # read back checkpoints and models from the output prefix
        readable.add(f"{s3}{output.bucket}/{output.key_prefix}*")
    log_group = aws.arn("logs", "log-group:/aws/sagemaker/*")
    statements = [
        {"Sid": "ListTheBuckets", "Effect": "Allow", "Action": "s3:ListBucket",
         "Resource": sorted({f"{s3}{bucket}" for bucket in [*buckets, output.bucket]})},
        {"Sid": "ReadData", "Effect": "Allow", "Action": "s3:GetObject",
         "Resource": sorted(readable)},
        {"Sid": "WriteOutputs", "Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
         "Resource": f"{s3}{output.bucket}/{output.key_prefix}*"},
        {"Sid": "PullTheImages", "Effect": "Allow",
         "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
         "Resource": [aws.arn("ecr", f"repository/{names.train_repository}"),
                      aws.arn("ecr", f"repository/{names.serve_repository}")]},
        {"Sid": "EcrLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        {"Sid": "WriteLogs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
         "Resource": [log_group, f"{log_group}:log-stream:*"]},
        {"Sid": "PublishMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData", "Resource": "*",
         "Condition": {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}}},
    ]
    if vpc:
        statements.append({"Sid": "RunInTheVpc", "Effect": "Allow", "Action": VPC_ACTIONS, "Resource": "*"})
    return {"Version": "2012-10-17", "Statement": statements}


def default_output(bucket: str, names: Names) -> S3Uri:
    return S3Uri(bucket, f"{names.base}/")


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    names = Names(args.name)
    for bucket in args.bucket:
        if not bucket or "/" in bucket or bucket.startswith("s3:"):
            raise CliError(f"--bucket takes a bucket name, got {bucket!r}")
    output = args.output or default_output(args.bucket[0], names)
    arn, _ = ensure_role(aws, role_name=names.sagemaker_role, trust=trust_policy(aws),
                         policy_name=POLICY_NAME, policy=execution_policy(aws, names, args.bucket, output, args.vpc),
                         description=f"kennel {names.base}: SageMaker training and tuning execution role")
    aws.console.result(arn)
