"""The command line: `kennel-aws COMMAND [options]` (or `python -m kennel_ops.aws`).

Every failure ends as ONE line on stderr and a non-zero exit status:
1 for AWS, Docker and user-fixable failures, 2 for bad flags, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError,
                                 NoRegionError, PartialCredentialsError, ProfileNotFound, WaiterError)

from kennel_ops.aws import (add_model, autoscale, dashboard, deploy, function, invoke_async, list_models, push, role,
                            teardown, train, tune)
from kennel_ops.aws.arguments import argument_type
from kennel_ops.aws.context import CliError, DryRunViolation
from kennel_ops.aws.names import valid_name

COMMANDS = (push, role, train, tune, deploy, add_model, list_models, autoscale, dashboard, function, invoke_async,
            teardown)

DESCRIPTION = """\
Operate kennel on AWS. A typical path:
  push -> role -> train (or tune) -> deploy -> autoscale -> dashboard -> lambda -> teardown
(deploy --serverless or --async for the other hosting kinds; invoke-async calls an
async endpoint; deploy --multi-model serves the models add-model puts under one S3
prefix, list-models lists them)
Every command is idempotent and takes --dry-run (print the API requests that
would change something, as JSON on stdout, and send none of them)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def key_values(text: str) -> dict[str, str]:
    """KEY=VALUE[,KEY=VALUE...] -> dict (for --tags, --env, --hyperparameter)."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


name_type = argument_type(valid_name)


def shared_flags() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    group = shared.add_argument_group("shared options")
    group.add_argument("--region", help="AWS region (default: AWS_DEFAULT_REGION, AWS_REGION or the profile's region)")
    group.add_argument("--profile", help="named AWS profile (default: the standard credential chain)")
    group.add_argument("--name", type=name_type, default="kennel",
                       help="deployment name every resource name derives from (default: %(default)s)")
    group.add_argument("--tags", type=key_values, action="append", default=[], metavar="KEY=VALUE[,...]",
                       help="tags for everything created (repeatable); kennel:deployment=NAME is always added")
    group.add_argument("--dry-run", action="store_true",
                       help="print the mutating API requests as JSON on stdout and send none of them")
    return shared


def build_parser() -> Parser:
    parser = Parser(prog="kennel-aws", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    parents = [shared_flags()]
    for module in COMMANDS:
        sub = commands.add_parser(module.COMMAND, help=module.HELP, description=module.__doc__,
                                  parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_failure(error: BaseException) -> str:
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        operation = getattr(error, "operation_name", "request")
        return f"{operation} failed: {info.get('Code', 'Error')}: {info.get('Message', '')}"
    if isinstance(error, NoCredentialsError):
        return "no AWS credentials found: set AWS_PROFILE (or --profile), or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    if isinstance(error, NoRegionError):
        return "no AWS region: pass --region or set AWS_DEFAULT_REGION"
    if isinstance(error, EndpointConnectionError):
        return f"cannot reach {error.kwargs.get('endpoint_url', 'the AWS endpoint')}: check the network and region"
    if isinstance(error, WaiterError):
        return f"gave up waiting: {error}"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.tags = {key: value for pairs in args.tags for key, value in pairs.items()}
    try:
        args.run(args)
        return 0
    except KeyboardInterrupt:
        print("interrupted (what was already sent to AWS goes on; run the command again to resume)",
              file=sys.stderr)
        return 130
    except DryRunViolation as error:
        print(f"error: internal: {one_line(error)}", file=sys.stderr)
        return 70
    except (CliError, ClientError, BotoCoreError, PartialCredentialsError, ProfileNotFound) as error:
        print(f"error: {one_line(describe_failure(error))}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - Docker SDK and OS errors: one line, never a traceback
        if type(error).__module__.startswith(("docker", "requests", "urllib3")) or isinstance(error, OSError):
            print(f"error: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
            return 1
        raise
