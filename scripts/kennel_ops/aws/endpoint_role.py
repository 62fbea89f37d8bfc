"""NAME-endpoint: the execution role of the endpoint's models, apart from the training role.

NAME-sagemaker may write the output prefix where model.tar.gz (with its
code/inference.py) lives. The serving container parses untrusted images, so it
runs with a role that cannot plant code for the next deploy:

  - s3:GetObject on the model artifact objects themselves, nothing else in S3
    (no ListBucket: a missing artifact reads as AccessDenied); for a multi-model
    endpoint (deploy --multi-model), on the objects under its models' prefix,
    which SageMaker loads from as requests name them;
  - pull from the serving image's ECR repository (NAME-serve by default);
  - write CloudWatch logs under /aws/sagemaker/Endpoints/ and metrics in the
    /aws/sagemaker/Endpoints namespace;
  - in a VPC (--subnets), the network-interface calls an endpoint there needs;
  - for an asynchronous endpoint (deploy --async), s3:GetObject on its inputs/
    folder, s3:PutObject on its outputs/ and failures/ folders and sns:Publish
    on its success and error topics (see kennel_ops.aws.async_layout).

deploy keeps the readable artifacts (and repositories) to the ones it
deploys, plus, while an update rolls out, the ones still serving: instances
the old variant launches meanwhile (auto-scaling, a rollback) must still be
able to download them. Once the endpoint is InService on the new config, the
policy narrows to the new artifact alone.
"""
from __future__ import annotations

import re

from botocore.exceptions import ClientError

from kennel_ops.aws.async_layout import async_policy_statements
from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.iam import ensure_role
from kennel_ops.aws.names import Names
from kennel_ops.aws.role import VPC_ACTIONS, trust_policy
from kennel_ops.aws.s3 import IAM_PATTERN_MARKS, models_prefix, parse_s3_uri

POLICY_NAME = "kennel-endpoint-execution"
METRICS_NAMESPACE = "/aws/sagemaker/Endpoints"
# A ContainerDefinition's Mode: ModelDataUrl names one model.tar.gz, or the prefix of many.
SINGLE_MODEL, MULTI_MODEL = "SingleModel", "MultiModel"
ECR_IMAGE = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
                       r"/(?P<repository>[a-z0-9][a-z0-9._/-]*)(?::[\w.-]+)?(?:@sha256:[0-9a-f]{64})?$")


def artifact_arn(aws: Aws, model_data: str) -> str:
    """The ARN of exactly the one artifact object (refusing keys IAM would read as a pattern)."""
    try:
        uri = parse_s3_uri(model_data)
    except ValueError as error:
        raise CliError(f"model data: {error}") from None
    if not uri.key_prefix or uri.key_prefix.endswith("/"):
        raise CliError(f"model data {model_data} names a folder, not the model.tar.gz object")
    if any(mark in uri.key_prefix for mark in IAM_PATTERN_MARKS):
        raise CliError(f"model data {model_data}: an IAM policy would read '*', '?' or '${{' in the key as a "
                       "pattern; copy the artifact to a plain key, or pass --role-arn")
    return f"arn:{aws.partition}:s3:::{uri.bucket}/{uri.key_prefix}"


def models_arn(aws: Aws, prefix: str) -> str:
    """Every object under a multi-model endpoint's prefix: arn:PARTITION:s3:::BUCKET/PREFIX/*."""
    try:
        uri = models_prefix(prefix)
    except ValueError as error:
        raise CliError(f"model data: {error}") from None
    return f"arn:{aws.partition}:s3:::{uri.bucket}/{uri.key_prefix}*"


def readable_arn(aws: Aws, container: dict) -> str:
    """What a container's instances download: its one artifact, or a multi-model container's prefix."""
    if container.get("Mode") == MULTI_MODEL:
        return models_arn(aws, container["ModelDataUrl"])
    return artifact_arn(aws, container["ModelDataUrl"])


def repository_arn(aws: Aws, image: str) -> str:
    """The ECR repository an image URI points into (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG or @DIGEST)."""
    match = ECR_IMAGE.match(image)
    if match is None:
        raise CliError(f"--image {image} is not an ECR image URI (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG): "
                       f"the endpoint role can only be scoped to an ECR repository; pass --role-arn for another")
    return (f"arn:{aws.partition}:ecr:{match['region']}:{match['account']}:"
            f"repository/{match['repository']}")


def endpoint_policy(aws: Aws, *, containers: list[dict], vpc: bool, async_configs: list[dict] = ()) -> dict:
    """containers: {"Image", "ModelDataUrl", "Mode"} of the models that run with the role;
    async_configs: the AsyncInferenceConfig of the endpoint configs they serve in, if asynchronous."""
    log_group = aws.arn("logs", "log-group:/aws/sagemaker/Endpoints/*")
    statements = [
        {"Sid": "ReadTheModel", "Effect": "Allow", "Action": "s3:GetObject",
         "Resource": sorted({readable_arn(aws, container) for container in containers})},
        {"Sid": "PullTheServingImage", "Effect": "Allow",
         "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
         "Resource": sorted({repository_arn(aws, container["Image"]) for container in containers})},
        {"Sid": "EcrLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        {"Sid": "WriteLogs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
         "Resource": [log_group, f"{log_group}:log-stream:*"]},
        {"Sid": "PublishMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData", "Resource": "*",
         "Condition": {"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}}},
    ]
    if vpc:
        statements.append({"Sid": "RunInTheVpc", "Effect": "Allow", "Action": VPC_ACTIONS, "Resource": "*"})
    statements += async_policy_statements(aws, list(async_configs))
    return {"Version": "2012-10-17", "Statement": statements}


def ensure_endpoint_role(aws: Aws, names: Names, *, containers: list[dict], vpc: bool,
                         async_configs: list[dict] = ()) -> str:
    """Create NAME-endpoint, or set its policy to exactly these containers' artifacts and images
    (and these async configs' S3 folders and topics); returns its ARN."""
    arn, _ = ensure_role(aws, role_name=names.endpoint_role, trust=trust_policy(aws), policy_name=POLICY_NAME,
                         policy=endpoint_policy(aws, containers=containers, vpc=vpc, async_configs=async_configs),
                         description=f"kennel {names.base}: execution role of endpoint {names.endpoint}")
    return arn


def planned_role_arn(aws: Aws, names: Names) -> str:
    return aws.arn("iam", f"role/{names.endpoint_role}", regional=False)


def serving_containers(aws: Aws, endpoint: dict | None, role_arn: str) -> list[dict]:
    """{"Image", "ModelDataUrl", "Mode"} of the models in the endpoint's current (and pending) config that
    run with role_arn."""
    if endpoint is None:
        return []
    sagemaker = aws.client("sagemaker")
    pending = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
    found = {}
    for config_name in sorted({endpoint["EndpointConfigName"], pending} - {None}):
        config = describe_or_none(sagemaker.describe_endpoint_config, EndpointConfigName=config_name)
        for variant in (config or {}).get("ProductionVariants", []):
            model = describe_or_none(sagemaker.describe_model, ModelName=variant["ModelName"])
            if model is None or model.get("ExecutionRoleArn") != role_arn:
                continue
            for container in [model.get("PrimaryContainer") or {}, *model.get("Containers", [])]:
                if container.get("ModelDataUrl") and container.get("Image"):
                    entry = {"Image": container["Image"], "ModelDataUrl": container["ModelDataUrl"],
                             "Mode": container.get("Mode") or SINGLE_MODEL}
                    found[tuple(entry.values())] = entry
    return [found[key] for key in sorted(found)]


def serving_async_configs(aws: Aws, endpoint: dict | None) -> list[dict]:
    """The AsyncInferenceConfig of the endpoint's current (and pending) config, while it serves asynchronously."""
    if endpoint is None:
        return []
    pending = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
    found = []
    for config_name in sorted({endpoint["EndpointConfigName"], pending} - {None}):
        config = describe_or_none(aws.client("sagemaker").describe_endpoint_config, EndpointConfigName=config_name)
        if config and config.get("AsyncInferenceConfig"):
            found.append(config["AsyncInferenceConfig"])
    return found


def role_not_ready(error: ClientError) -> bool:
    """SageMaker refuses a role IAM has not propagated yet: ValidationException "Could not assume role ..."."""
    info = error.response.get("Error", {})
    return info.get("Code") == "ValidationException" and "Could not assume role" in info.get("Message", "")
