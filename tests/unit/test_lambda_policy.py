"""The function's IAM policy grants exactly InvokeEndpoint on one endpoint and writes to its own logs.

Read from lambda/policy.json as the deploy script reads it; any wildcard action,
any wildcard resource other than the log-stream suffix of the function's own log
group, any extra action or statement fails here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kennel_ops import lambda_policy

LAMBDA_DIR = Path(__file__).resolve().parents[2] / "lambda"
POLICY = LAMBDA_DIR / "policy.json"
TRUST = LAMBDA_DIR / "trust-policy.json"
VALUES = {"region": "eu-west-1", "account_id": "123456789012", "endpoint_name": "Kennel-Prod",
          "function_name": "kennel-classify"}
LOG_GROUP = "arn:aws:logs:eu-west-1:123456789012:log-group:/aws/lambda/kennel-classify"
ALLOWED = {
    "sagemaker:InvokeEndpoint": {"arn:aws:sagemaker:eu-west-1:123456789012:endpoint/kennel-prod"},
    "logs:CreateLogGroup": {f"{LOG_GROUP}:*"},
    "logs:CreateLogStream": {f"{LOG_GROUP}:*"},
    "logs:PutLogEvents": {f"{LOG_GROUP}:log-stream:*"},
}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def grants(policy: dict) -> dict[str, set[str]]:
    """action -> resources, over every statement; only plain Allow statements are accepted."""
    result: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource"}, f"unexpected keys in {statement}"
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            result.setdefault(action, set()).update(as_list(statement["Resource"]))
    return result


def wildcard_problems(policy: dict, log_group_arn: str) -> list[str]:
    """Every wildcard that is not the log-stream suffix of the function's own log group."""
    problems = []
    for statement in policy["Statement"]:
        for action in as_list(statement["Action"]):
            if "*" in action or "?" in action:
                problems.append(f"wildcard action {action}")
        for resource in as_list(statement["Resource"]):
            suffix_free = resource
            for suffix in (":log-stream:*", ":*"):
                if resource.startswith(log_group_arn) and resource == log_group_arn + suffix:
                    suffix_free = log_group_arn
            if "*" in suffix_free or "?" in suffix_free:
                problems.append(f"wildcard resource {resource}")
    return problems


@pytest.fixture(scope="module")
def filled() -> dict:
    return lambda_policy.function_policy(**VALUES)


def test_the_template_is_json_with_only_known_placeholders():
    text = POLICY.read_text()
    json.loads(text)
    assert set(re.findall(r"\{\{([A-Z_]+)\}\}", text)) == {"PARTITION", "REGION", "ACCOUNT_ID", "ENDPOINT_NAME",
                                                           "FUNCTION_NAME"}


def test_the_filled_policy_grants_exactly_what_the_function_uses(filled):
    assert filled["Version"] == "2012-10-17"
    assert grants(filled) == ALLOWED


def test_no_wildcard_action_or_resource_beyond_the_log_stream_suffix(filled):
    assert wildcard_problems(filled, LOG_GROUP) == []


def test_the_template_itself_has_no_wildcard_but_the_log_suffix():
    template = json.loads(POLICY.read_text())
    group = "arn:{{PARTITION}}:logs:{{REGION}}:{{ACCOUNT_ID}}:log-group:/aws/lambda/{{FUNCTION_NAME}}"
    assert wildcard_problems(template, group) == []


@pytest.mark.parametrize("policy, problem", [
    ({"Statement": [{"Effect": "Allow", "Action": "sagemaker:*", "Resource": "arn:x"}]}, "wildcard action"),
    ({"Statement": [{"Effect": "Allow", "Action": "sagemaker:InvokeEndpoint", "Resource": "*"}]}, "wildcard resource"),
    ({"Statement": [{"Effect": "Allow", "Action": "sagemaker:InvokeEndpoint",
                     "Resource": "arn:aws:sagemaker:eu-west-1:123456789012:endpoint/*"}]}, "wildcard resource"),
    ({"Statement": [{"Effect": "Allow", "Action": "logs:PutLogEvents",
                     "Resource": "arn:aws:logs:eu-west-1:123456789012:log-group:*"}]}, "wildcard resource"),
    ({"Statement": [{"Effect": "Allow", "Action": "logs:PutLogEvents",
                     "Resource": "arn:aws:logs:eu-west-1:123456789012:log-group:/aws/lambda/other:*"}]},
     "wildcard resource"),
])
def test_the_wildcard_check_catches_what_it_must(policy, problem):
    """The check above can fail: wider grants than ours are caught."""
    assert any(problem in found for found in wildcard_problems(policy, LOG_GROUP))


def test_the_endpoint_arn_uses_the_lower_case_name_sagemaker_writes(filled):
    assert "endpoint/kennel-prod" in json.dumps(filled)


@pytest.mark.parametrize("field, value", [("endpoint_name", "*"), ("endpoint_name", "a/b"), ("account_id", "1234"),
                                          ("region", "*"), ("function_name", "arn:aws:lambda:x"),
                                          ("function_name", "fn*")])
def test_values_that_would_widen_or_break_the_policy_are_refused(field, value):
    with pytest.raises(lambda_policy.PolicyValueError):
        lambda_policy.function_policy(**{**VALUES, field: value})


def test_the_cli_prints_the_filled_policy_and_refuses_bad_values(capsys):
    assert lambda_policy.main(["--region", "eu-west-1", "--account", "123456789012", "--endpoint", "kennel-prod",
                               "--function", "kennel-classify"]) == 0
    assert grants(json.loads(capsys.readouterr().out)) == ALLOWED
    assert lambda_policy.main(["--region", "eu-west-1", "--account", "x", "--endpoint", "e", "--function", "f"]) == 2
    assert "account_id 'x' is not 12 digits" in capsys.readouterr().err


def test_the_trust_policy_lets_only_lambda_assume_the_role():
    trust = json.loads(TRUST.read_text())
    (statement,) = trust["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"Service": "lambda.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"
