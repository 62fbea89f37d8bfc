"""The names of everything a deployment creates, all derived from --name.

One deployment name (default "kennel") gives stable names to the long-lived
resources, so every command finds what the others made and teardown finds it
all. Models and endpoint configs are immutable in SageMaker: their names carry
a digest of their content, so an unchanged deploy reuses them and a changed one
makes new ones.

The models of a multi-model endpoint are named by the rule the Lambda function
checks callers against (kennel_lambda_events.TARGET_MODEL): NAME.tar.gz.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kennel_lambda_events import TARGET_MODEL, TARGET_MODEL_RULE, TARGET_MODEL_SUFFIX
from kennel_ops.aws.arguments import argument_type

# Leaves room for the longest suffix within SageMaker's 63-character names.
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,39}$")
VARIANT = "AllTraffic"
ALIAS = "live"
# Hyperparameter tuning job names are at most 32 characters.
TUNING_NAME_MAX = 32


def valid_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(f"invalid name {value!r}: 1-40 letters, digits and hyphens, "
                         "starting and ending with a letter or digit")
    return value


def target_model(name: str) -> str:
    """A model's name -> its TargetModel on a multi-model endpoint, NAME.tar.gz (ValueError if none)."""
    if not TARGET_MODEL.fullmatch(name + TARGET_MODEL_SUFFIX):
        raise ValueError(f"invalid model name {name!r}: a model is {TARGET_MODEL_RULE}")
    return name + TARGET_MODEL_SUFFIX


def valid_target_model(value: str) -> str:
    """A TargetModel as given (--target-model NAME.tar.gz): ValueError unless it follows the rule."""
    if not TARGET_MODEL.fullmatch(value):
        raise ValueError(f"invalid target model {value!r}: {TARGET_MODEL_RULE}")
    return value


target_model_type = argument_type(valid_target_model)  # --target-model NAME.tar.gz


def content_digest(content: Any, length: int = 10) -> str:
    """A short stable digest of JSON-able content (used in immutable resource names)."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class Names:
    base: str

    @property
    def train_repository(self) -> str:
        return f"{self.base}-train"

    @property
    def serve_repository(self) -> str:
        return f"{self.base}-serve"

    @property
    def sagemaker_role(self) -> str:
        return f"{self.base}-sagemaker"

    @property
    def endpoint_role(self) -> str:
        return f"{self.base}-endpoint"

    @property
    def endpoint(self) -> str:
        return self.base

    @property
    def scaling_resource_id(self) -> str:
        return f"endpoint/{self.endpoint}/variant/{VARIANT}"

    @property
    def scaling_policy(self) -> str:
        return f"{self.base}-invocations-per-instance"

    @property
    def dashboard(self) -> str:
        return f"{self.base}-endpoint"

    @property
    def backlog_policy(self) -> str:
        """Async endpoints: target tracking on ApproximateBacklogSizePerInstance."""
        return f"{self.base}-backlog-per-instance"

    @property
    def wake_policy(self) -> str:
        """Async endpoints: the step from zero instances to one when requests wait."""
        return f"{self.base}-scale-from-zero"

    @property
    def wake_alarm(self) -> str:
        """The CloudWatch alarm on HasBacklogWithoutCapacity that runs wake_policy."""
        return f"{self.base}-has-backlog-without-capacity"

    @property
    def function(self) -> str:
        return f"{self.base}-classify"

    @property
    def lambda_role(self) -> str:
        return f"{self.base}-lambda"

    def training_job(self, now: datetime | None = None) -> str:
        return f"{self.base}-{timestamp(now)}"

    def tuning_job(self, now: datetime | None = None) -> str:
        # yymmdd-HHMMSS: 13 characters, so the base keeps at most 18.
        stamp = timestamp(now)[2:]
        return f"{self.base[:TUNING_NAME_MAX - len(stamp) - 1].rstrip('-')}-{stamp}"

    def model(self, content: Any) -> str:
        return f"{self.base}-{content_digest(content)}"

    def endpoint_config(self, content: Any) -> str:
        return f"{self.base}-{content_digest(content)}"
