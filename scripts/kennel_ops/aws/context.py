"""What every command shares: the boto3 session, clients, account/partition/ARNs,
tags, the dry-run switch and the console.

Mutating requests go through Aws.send(): under --dry-run it prints the request
(service, API operation name, parameters) as JSON on stdout and sends nothing.
Read-only requests (Describe*, List*, Get*, Head*) are sent either way, so a plan
reflects what exists. As a safety net, every client made under --dry-run
refuses any other operation before it reaches the network.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import datetime
from functools import cached_property
from typing import Any, Callable, TextIO

import boto3
import botocore.loaders
import botocore.session
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

# The operations that only read state; everything else changes something.
READ_ONLY_PREFIXES = ("Describe", "List", "Get", "BatchGet", "BatchCheck", "Head")
# Error codes that mean "no such resource" across the services used here.
NOT_FOUND_CODES = frozenset({
    "ResourceNotFound", "ResourceNotFoundException", "NoSuchEntity", "NoSuchEntityException",
    "RepositoryNotFoundException", "LifecyclePolicyNotFoundException", "ImageNotFoundException",
    "ProvisionedConcurrencyConfigNotFoundException", "ObjectNotFoundException",
})
DEPLOYMENT_TAG = "kennel:deployment"


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


class DryRunViolation(RuntimeError):
    """A mutating request was about to be sent under --dry-run (a bug in a command)."""


def is_read_only(operation_name: str) -> bool:
    return operation_name.startswith(READ_ONLY_PREFIXES)


def is_not_found(error: ClientError) -> bool:
    """True when the error says the resource does not exist.

    SageMaker answers a Describe of a missing model, endpoint config or endpoint
    with ValidationException "Could not find ..."; the other services have codes.
    """
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "")
    return code in NOT_FOUND_CODES or (code == "ValidationException" and "Could not find" in message)


def describe_or_none(call: Callable[..., dict], **params: Any) -> dict | None:
    """The response of a read call, or None when the resource does not exist."""
    try:
        return call(**params)
    except ClientError as error:
        if is_not_found(error):
            return None
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        digest = hashlib.sha256(value).hexdigest()
        return f"<{len(value)} bytes, sha256 {digest}>"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=_json_default)


class Console:
    """Progress and notes on stderr, results on stdout (so stdout can be piped)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def note(self, message: str) -> None:
        print(message, file=self.err, flush=True)

    def result(self, message: str) -> None:
        print(message, file=self.out, flush=True)


# Parsing the JSON service models is most of what creating a client costs (sagemaker's is
# megabytes): every session of this process shares one loader, which keeps them parsed. A
# command makes one session; a process that runs many (kennel-local-runtime, the tests)
# parses each model once.
_MODEL_LOADER = botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))


def new_session(profile: str | None = None, region: str | None = None) -> boto3.Session:
    core = botocore.session.Session()
    core.register_component("data_loader", _MODEL_LOADER)
    session = boto3.Session(botocore_session=core, profile_name=profile, region_name=region)
    # boto3 appends its own data folder to the loader's search path for every new session.
    _MODEL_LOADER.search_paths[:] = list(dict.fromkeys(_MODEL_LOADER.search_paths))
    return session


class Aws:
    """One account + region, as the shared flags chose it."""

    def __init__(self, *, region: str | None = None, profile: str | None = None, dry_run: bool = False,
                 tags: dict[str, str] | None = None, console: Console | None = None,
                 session: boto3.Session | None = None) -> None:
        # botocore reads AWS_DEFAULT_REGION; AWS_REGION (what Lambda and the newer SDKs set) is accepted too.
        region = region or os.environ.get("AWS_REGION") or None
        self.session = session or new_session(profile, region)
        if not self.session.region_name:
            raise CliError("no AWS region: pass --region, set AWS_DEFAULT_REGION or give the profile a region")
        self.dry_run = dry_run
        self.tags = dict(tags or {})
        self.console = console or Console()
        self._clients: dict[str, BaseClient] = {}

    @classmethod
    def from_args(cls, args: Any) -> "Aws":
        """From the shared flags; every resource gets the kennel:deployment=NAME tag."""
        return cls(region=args.region, profile=args.profile, dry_run=args.dry_run,
                   tags={**args.tags, DEPLOYMENT_TAG: args.name})

    @property
    def region(self) -> str:
        return self.session.region_name

    def client(self, service: str) -> BaseClient:
        if service not in self._clients:
            config = Config(retries={"mode": "standard", "max_attempts": 8}, user_agent_extra="kennel-aws")
            client = self.session.client(service, config=config)
            if self.dry_run:
                client.meta.events.register("before-call", _refuse_mutation)
            self._clients[service] = client
        return self._clients[service]

    @cached_property
    def account(self) -> str:
        return self.client("sts").get_caller_identity()["Account"]

    @cached_property
    def partition(self) -> str:
        return self.session.get_partition_for_region(self.region)

    def arn(self, service: str, resource: str, *, regional: bool = True) -> str:
        """arn:<partition>:<service>:<region>:<account>:<resource> (no region for IAM)."""
        region = self.region if regional else ""
        return f"arn:{self.partition}:{service}:{region}:{self.account}:{resource}"

    def send(self, service: str, operation: str, **params: Any) -> dict | None:
        """Send a mutating request, or under --dry-run print it and return None."""
        client = self.client(service)
        api_name = client.meta.method_to_api_mapping.get(operation, operation)
        if self.dry_run:
            self.console.result(to_json({"service": client.meta.service_model.service_name, "operation": api_name,
                                         "params": params}))
            return None
        return getattr(client, operation)(**params)

    def changed(self, message: str) -> None:
        """Progress note for a change just sent (or, under --dry-run, printed and not sent)."""
        self.console.note(f"dry run, not sent: {message}" if self.dry_run else message)

    def tag_list(self) -> list[dict[str, str]]:
        """Tags as [{"Key": k, "Value": v}] (SageMaker, ECR, IAM)."""
        return [{"Key": key, "Value": value} for key, value in sorted(self.tags.items())]

    def tag_map(self) -> dict[str, str]:
        """Tags as {k: v} (Lambda, Application Auto Scaling)."""
        return dict(sorted(self.tags.items()))


def _refuse_mutation(model: Any, **_: Any) -> None:
    if not is_read_only(model.name):
        raise DryRunViolation(f"{model.name} would change AWS state but --dry-run is set")
