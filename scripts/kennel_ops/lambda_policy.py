"""Fill the Lambda function's IAM policy templates for one account, region, endpoint and function.

    kennel-lambda-policy --region us-east-1 --account 123456789012 \\
        --endpoint kennel-prod --function kennel-classify > policy.json
    kennel-lambda-policy --trust > trust-policy.json

lambda/policy.json holds the placeholders {{PARTITION}}, {{REGION}},
{{ACCOUNT_ID}}, {{ENDPOINT_NAME}} and {{FUNCTION_NAME}}; lambda/trust-policy.json
needs none. Values are checked before they are put in, so a typo cannot widen
the policy (an endpoint name "*" is refused, not granted). SageMaker writes
endpoint names in lower case in its ARNs, and IAM compares ARNs case-sensitively,
so the endpoint name is lower-cased in the ARN.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from kennel_ops.checkout import REPO

LAMBDA_DIR = REPO / "lambda"
POLICY_TEMPLATE = LAMBDA_DIR / "policy.json"
TRUST_POLICY = LAMBDA_DIR / "trust-policy.json"
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
_CHECKS = {
    "PARTITION": (re.compile(r"^aws(-cn|-us-gov|-iso|-iso-b)?$"), "aws, aws-cn or aws-us-gov"),
    "REGION": (re.compile(r"^[a-z]{2}(-gov|-iso|-isob)?-[a-z]+-\d$"), "a region such as us-east-1"),
    "ACCOUNT_ID": (re.compile(r"^\d{12}$"), "12 digits"),
    "ENDPOINT_NAME": (re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$"), "a SageMaker endpoint name"),
    "FUNCTION_NAME": (re.compile(r"^[a-zA-Z0-9_-]{1,64}$"), "a Lambda function name (not an ARN)"),
}


class PolicyValueError(ValueError):
    """A value that is not what its placeholder stands for."""


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every {{NAME}} in template; every value checked, every placeholder filled."""
    checked = {}
    for name, value in values.items():
        pattern, meaning = _CHECKS[name]
        if not isinstance(value, str) or not pattern.match(value):
            raise PolicyValueError(f"{name.lower()} {value!r} is not {meaning}")
        checked[name] = value.lower() if name == "ENDPOINT_NAME" else value
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(checked))
    if missing:
        raise PolicyValueError(f"no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda match: checked[match.group(1)], template)


def function_policy(region: str, account_id: str, endpoint_name: str, function_name: str,
                    partition: str = "aws") -> dict[str, Any]:
    """lambda/policy.json filled in, as a dict ready for iam put-role-policy."""
    text = fill(POLICY_TEMPLATE.read_text(), {"PARTITION": partition, "REGION": region, "ACCOUNT_ID": account_id,
                                              "ENDPOINT_NAME": endpoint_name, "FUNCTION_NAME": function_name})
    return json.loads(text)


def trust_policy() -> dict[str, Any]:
    return json.loads(TRUST_POLICY.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-lambda-policy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trust", action="store_true", help="print the role's trust policy instead")
    parser.add_argument("--region")
    parser.add_argument("--account")
    parser.add_argument("--endpoint")
    parser.add_argument("--function")
    parser.add_argument("--partition", default="aws")
    args = parser.parse_args(argv)
    try:
        if args.trust:
            document = trust_policy()
        else:
            absent = [f"--{name}" for name in ("region", "account", "endpoint", "function") if not getattr(args, name)]
            if absent:
                raise PolicyValueError(f"{' '.join(absent)} required")
            document = function_policy(args.region, args.account, args.endpoint, args.function, args.partition)
    except PolicyValueError as exc:
        print(f"lambda_policy: {exc}", file=sys.stderr)
        return 2
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
