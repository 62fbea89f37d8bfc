"""Deploy the Lambda function NAME-classify in front of the endpoint NAME.

  role      NAME-lambda: trusted by Lambda only (lambda/trust-policy.json), one
            inline policy from lambda/policy.json with the endpoint's ARN filled
            in: sagemaker:InvokeEndpoint on that one endpoint and log writes to
            the function's own log group, nothing else
  function  the zip from lambda/ (built reproducibly, or --zip), handler
            kennel_lambda.handler, ENDPOINT_NAME=NAME (and, in front of a
            multi-model endpoint, DEFAULT_TARGET_MODEL=--target-model: the model
            asked when a caller names none); code and configuration are updated
            only when they differ
  version   published when the code or configuration changed
  alias     `live` -> that version; callers invoke NAME-classify:live
  provisioned concurrency on the alias (--provisioned-concurrency, default 2)
  reserved concurrency (--reserved-concurrency, default none)

Defaults and their cost (us-east-1 list prices; check the Lambda pricing page):
  --memory 256 MB: the function only forwards a request of at most 6 MB; more
    memory buys CPU it does not need.
  --timeout 30 s: a CPU ResNet-50 endpoint answers in well under a second, so
    30 s leaves room for the function's own retries on throttling (it plans
    connect/read timeouts and attempts inside this limit) and stays under API
    Gateway's 29 s integration limit plus margin.
  --architecture arm64: about 20% cheaper per GB-second than x86_64 for the
    same pure-Python code.
  --provisioned-concurrency 2: two environments kept initialised, so there are
    no cold starts at the load the smallest endpoint (1 x ml.m5.large at 250
    invocations per minute, ~0.3 s each) sees. Cost about 2 x 0.25 GB x
    2,592,000 s x $0.0000033334 = $4.32 per month (arm64), billed whether or
    not it is used. The original's 100 would cost about $216 per month, far
    beyond what a 4-instance endpoint can serve. 0 removes it.
  --reserved-concurrency: none by default (the function shares the account's
    unreserved pool, as the original). N caps the function at N concurrent
    executions and sets them aside for it; it costs nothing, and is a cheap
    guard that keeps a burst from overrunning the endpoint.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
from pathlib import Path

from botocore.exceptions import ClientError

from kennel_ops import build_lambda_zip, lambda_policy
from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.iam import ensure_role, retry_while_propagating
from kennel_ops.aws.names import ALIAS, Names, target_model_type
from kennel_ops.aws.waiting import Poll, wait_for

COMMAND = "lambda"
HELP = "the Lambda function with least-privilege role, version, alias `live` and provisioned concurrency"
POLICY_NAME = "invoke-endpoint"
HANDLER = "kennel_lambda.handler"


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"at least 0, got {value}")
    return value


def reserved(text: str) -> int | None:
    if text.lower() == "none":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1 (0 would throttle every request), or 'none'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zip", type=Path, help="deployment package (default: build lambda/ into build/lambda.zip)")
    parser.add_argument("--runtime", default="python3.12", help="(%(default)s)")
    parser.add_argument("--architecture", choices=("arm64", "x86_64"), default="arm64", help="(%(default)s)")
    parser.add_argument("--memory", type=int, default=256, metavar="MB", help="(%(default)s)")
    parser.add_argument("--timeout", type=int, default=30, metavar="SECONDS", help="(%(default)s)")
    parser.add_argument("--provisioned-concurrency", type=non_negative, default=2, metavar="N",
                        help="on the alias `live`; 0 removes it (%(default)s, about $4.32/month)")
    parser.add_argument("--reserved-concurrency", type=reserved, default=None, metavar="N|none",
                        help="cap and set aside N concurrent executions (default: none)")
    parser.add_argument("--target-model", type=target_model_type, metavar="MODEL.tar.gz",
                        help="in front of a multi-model endpoint: the model asked when a caller names none "
                             "(default: none; callers must name one)")
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="status poll interval (%(default)s)")


def package(args: argparse.Namespace) -> bytes:
    if args.zip:
        try:
            return args.zip.read_bytes()
        except OSError as error:
            raise CliError(f"cannot read --zip {args.zip}: {error.strerror}") from None
    return build_lambda_zip.build().read_bytes()


def code_sha256(code: bytes) -> str:
    """Lambda's CodeSha256: base64 of the zip's SHA-256 digest."""
    return base64.b64encode(hashlib.sha256(code).digest()).decode()


def ensure_lambda_role(aws: Aws, names: Names) -> tuple[str, bool]:
    try:
        policy = lambda_policy.function_policy(aws.region, aws.account, names.endpoint, names.function,
                                               partition=aws.partition)
    except lambda_policy.PolicyValueError as error:
        raise CliError(f"lambda policy: {error}") from None
    return ensure_role(aws, role_name=names.lambda_role, trust=lambda_policy.trust_policy(),
                       policy_name=POLICY_NAME, policy=policy,
                       description=f"kennel {names.base}: Lambda {names.function} invokes endpoint {names.endpoint}")


def desired_configuration(args: argparse.Namespace, names: Names, role_arn: str) -> dict:
    variables = {"ENDPOINT_NAME": names.endpoint}
    if args.target_model:
        variables["DEFAULT_TARGET_MODEL"] = args.target_model
    return {"Role": role_arn, "Runtime": args.runtime, "Handler": HANDLER, "Timeout": args.timeout,
            "MemorySize": args.memory, "Environment": {"Variables": variables},
            "Description": f"kennel {names.base}: classifies dog images with SageMaker endpoint {names.endpoint}"}


def configuration_differs(current: dict, wanted: dict) -> bool:
    return any(current.get(key) != value for key, value in wanted.items())


def ensure_function(aws: Aws, args: argparse.Namespace, names: Names, role_arn: str, code: bytes) -> None:
    lam = aws.client("lambda")
    wanted = desired_configuration(args, names, role_arn)
    found = describe_or_none(lam.get_function, FunctionName=names.function)
    if found is None:
        request = {"FunctionName": names.function, **wanted, "Code": {"ZipFile": code},
                   "Architectures": [args.architecture], "PackageType": "Zip", "Publish": False,
                   "Tags": aws.tag_map()}
        retry_while_propagating(lambda: aws.send("lambda", "create_function", **request), aws=aws,
                                what=f"function {names.function}", is_propagation_error=role_not_ready)
        aws.changed(f"function {names.function}: created")
        wait_function(aws, names, "function_active_v2")
        return
    current = found["Configuration"]
    if current.get("CodeSha256") != code_sha256(code) or current.get("Architectures") != [args.architecture]:
        aws.send("lambda", "update_function_code", FunctionName=names.function, ZipFile=code,
                 Architectures=[args.architecture])
        aws.changed(f"function {names.function}: code updated")
        wait_function(aws, names, "function_updated_v2")
    if configuration_differs(current, wanted):
        retry_while_propagating(
            lambda: aws.send("lambda", "update_function_configuration", FunctionName=names.function, **wanted),
            aws=aws, what=f"function {names.function}", is_propagation_error=role_not_ready)
        aws.changed(f"function {names.function}: configuration updated")
        wait_function(aws, names, "function_updated_v2")
    elif current.get("CodeSha256") == code_sha256(code):
        aws.console.note(f"function {names.function}: unchanged")


def role_not_ready(error: ClientError) -> bool:
    info = error.response.get("Error", {})
    return info.get("Code") == "InvalidParameterValueException" and "cannot be assumed" in info.get("Message", "")


def wait_function(aws: Aws, names: Names, waiter: str) -> None:
    if aws.dry_run:
        return
    aws.client("lambda").get_waiter(waiter).wait(FunctionName=names.function,
                                                 WaiterConfig={"Delay": 2, "MaxAttempts": 150})


def publish(aws: Aws, names: Names, code: bytes, wanted: dict, architecture: str) -> str:
    """The version `live` should point at: the alias's own when it already runs this code and
    configuration (nothing is sent), else a newly published one."""
    lam = aws.client("lambda")
    alias = describe_or_none(lam.get_alias, FunctionName=names.function, Name=ALIAS)
    if alias is not None:
        published = lam.get_function_configuration(FunctionName=names.function, Qualifier=alias["FunctionVersion"])
        if (published.get("CodeSha256") == code_sha256(code) and published.get("Architectures") == [architecture]
                and not configuration_differs(published, wanted)):
            return alias["FunctionVersion"]
    response = aws.send("lambda", "publish_version", FunctionName=names.function, CodeSha256=code_sha256(code))
    if response is None:
        return "<the version published above>"
    aws.console.note(f"function {names.function}: version {response['Version']}")
    return response["Version"]


def ensure_alias(aws: Aws, names: Names, version: str) -> bool:
    """Point `live` at version; True when it moved."""
    alias = describe_or_none(aws.client("lambda").get_alias, FunctionName=names.function, Name=ALIAS)
    if alias is None:
        aws.send("lambda", "create_alias", FunctionName=names.function, Name=ALIAS, FunctionVersion=version,
                 Description="what callers invoke")
        aws.changed(f"alias {ALIAS}: created -> {version}")
        return True
    if alias["FunctionVersion"] != version:
        aws.send("lambda", "update_alias", FunctionName=names.function, Name=ALIAS, FunctionVersion=version)
        aws.changed(f"alias {ALIAS}: {alias['FunctionVersion']} -> {version}")
        return True
    aws.console.note(f"alias {ALIAS}: unchanged ({version})")
    return False


def ensure_provisioned_concurrency(aws: Aws, names: Names, wanted: int, poll: Poll) -> None:
    lam = aws.client("lambda")
    current = describe_or_none(lam.get_provisioned_concurrency_config, FunctionName=names.function, Qualifier=ALIAS)
    if wanted == 0:
        if current is not None:
            aws.send("lambda", "delete_provisioned_concurrency_config", FunctionName=names.function, Qualifier=ALIAS)
            aws.changed(f"provisioned concurrency on {ALIAS}: removed")
        return
    if current is None or current["RequestedProvisionedConcurrentExecutions"] != wanted:
        aws.send("lambda", "put_provisioned_concurrency_config", FunctionName=names.function, Qualifier=ALIAS,
                 ProvisionedConcurrentExecutions=wanted)
        aws.changed(f"provisioned concurrency on {ALIAS}: {wanted} requested")
    if aws.dry_run:
        return
    wait_for(f"provisioned concurrency on {names.function}:{ALIAS}",
             lambda: lam.get_provisioned_concurrency_config(FunctionName=names.function, Qualifier=ALIAS),
             status=lambda d: d["Status"], done={"READY"}, failed={"FAILED"},
             detail=lambda d: f"{d.get('AvailableProvisionedConcurrentExecutions', 0)}/{wanted} available",
             reason=lambda d: d.get("StatusReason", ""), console=aws.console, poll=poll)


def ensure_reserved_concurrency(aws: Aws, names: Names, wanted: int | None) -> None:
    found = describe_or_none(aws.client("lambda").get_function_concurrency, FunctionName=names.function)
    current = (found or {}).get("ReservedConcurrentExecutions")
    if current == wanted:
        return
    if wanted is None:
        aws.send("lambda", "delete_function_concurrency", FunctionName=names.function)
        aws.changed("reserved concurrency: removed")
    else:
        aws.send("lambda", "put_function_concurrency", FunctionName=names.function,
                 ReservedConcurrentExecutions=wanted)
        aws.changed(f"reserved concurrency: {wanted}")


def run(args: argparse.Namespace) -> None:
    if not 128 <= args.memory <= 10240:
        raise CliError(f"--memory must be 128-10240 MB, got {args.memory}")
    if not 1 <= args.timeout <= 900:
        raise CliError(f"--timeout must be 1-900 seconds, got {args.timeout}")
    if args.reserved_concurrency is not None and args.provisioned_concurrency > args.reserved_concurrency:
        raise CliError(f"--provisioned-concurrency ({args.provisioned_concurrency}) cannot exceed "
                       f"--reserved-concurrency ({args.reserved_concurrency})")
    aws = Aws.from_args(args)
    names = Names(args.name)
    code = package(args)
    if describe_or_none(aws.client("sagemaker").describe_endpoint, EndpointName=names.endpoint) is None:
        aws.console.note(f"note: endpoint {names.endpoint} does not exist yet; the function answers 502 until it does")
    role_arn, _ = ensure_lambda_role(aws, names)
    ensure_function(aws, args, names, role_arn, code)
    version = publish(aws, names, code, desired_configuration(args, names, role_arn), args.architecture)
    ensure_alias(aws, names, version)
    ensure_reserved_concurrency(aws, names, args.reserved_concurrency)
    ensure_provisioned_concurrency(aws, names, args.provisioned_concurrency, Poll(interval_s=args.poll_seconds,
                                                                                  timeout_s=1800))
    aws.console.result(f"function {aws.arn('lambda', f'function:{names.function}:{ALIAS}')}")
    aws.console.result(f"role {role_arn}")
