"""IAM roles with one inline policy, created or brought up to date in place."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from botocore.exceptions import ClientError

from kennel_ops.aws.context import Aws, describe_or_none

T = TypeVar("T")
# A new role can take several seconds to be usable by other services.
PROPAGATION_WAIT_S = 120.0


def ensure_role(aws: Aws, *, role_name: str, trust: dict, policy_name: str, policy: dict,
                description: str) -> tuple[str, bool]:
    """Create the role or update its trust and inline policy; returns (ARN, created now).

    Only the named inline policy is managed; the policy document is replaced
    when it differs from `policy`.
    """
    iam = aws.client("iam")
    found = describe_or_none(iam.get_role, RoleName=role_name)
    created = found is None
    if created:
        response = aws.send("iam", "create_role", RoleName=role_name, AssumeRolePolicyDocument=aws_json(trust),
                            Description=description, Tags=aws.tag_list(), MaxSessionDuration=3600)
        arn = response["Role"]["Arn"] if response else aws.arn("iam", f"role/{role_name}", regional=False)
        aws.changed(f"role {role_name}: created")
        current_policy = None
    else:
        arn = found["Role"]["Arn"]
        if found["Role"].get("AssumeRolePolicyDocument") != trust:
            aws.send("iam", "update_assume_role_policy", RoleName=role_name, PolicyDocument=aws_json(trust))
            aws.changed(f"role {role_name}: trust policy updated")
        current = describe_or_none(iam.get_role_policy, RoleName=role_name, PolicyName=policy_name)
        current_policy = current["PolicyDocument"] if current else None
    if current_policy != policy:
        aws.send("iam", "put_role_policy", RoleName=role_name, PolicyName=policy_name, PolicyDocument=aws_json(policy))
        aws.changed(f"role {role_name}: inline policy {policy_name} {'set' if created else 'updated'}")
    elif not created:
        aws.console.note(f"role {role_name}: unchanged")
    return arn, created


def aws_json(document: dict) -> str:
    import json
    return json.dumps(document, separators=(",", ":"))


def retry_while_propagating(call: Callable[[], T], *, is_propagation_error: Callable[[ClientError], bool],
                            aws: Aws, what: str, timeout_s: float = PROPAGATION_WAIT_S,
                            sleep: Callable[[float], None] = time.sleep) -> T:
    """Retry `call` while it fails because a new role is not visible yet (back-off 2, 4, 8 ... s)."""
    waited, delay = 0.0, 2.0
    while True:
        try:
            return call()
        except ClientError as error:
            if not is_propagation_error(error) or waited >= timeout_s:
                raise
            aws.console.note(f"{what}: the new role is not usable yet (IAM propagation), retrying in {delay:.0f} s")
            sleep(delay)
            waited += delay
            delay = min(delay * 2, 16.0)
