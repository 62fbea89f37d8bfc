"""ECR: the repositories push creates, their login token, and finding the newest image."""
from __future__ import annotations

import base64
import json

from kennel_ops.aws.context import Aws, CliError, describe_or_none

DNS_SUFFIX = {"aws": "amazonaws.com", "aws-cn": "amazonaws.com.cn", "aws-us-gov": "amazonaws.com"}


def lifecycle_policy(keep: int) -> dict:
    return {"rules": [{
        "rulePriority": 1,
        "description": f"keep the last {keep} images",
        "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep},
        "action": {"type": "expire"},
    }]}


def ensure_repository(aws: Aws, name: str, keep: int) -> str:
    """Create one repository, or bring an existing one to these settings; returns its URI."""
    ecr = aws.client("ecr")
    found = describe_or_none(ecr.describe_repositories, repositoryNames=[name])
    if found is None:
        created = aws.send("ecr", "create_repository", repositoryName=name, tags=aws.tag_list(),
                           imageTagMutability="IMMUTABLE", imageScanningConfiguration={"scanOnPush": True},
                           encryptionConfiguration={"encryptionType": "AES256"})
        uri = created["repository"]["repositoryUri"] if created else planned_uri(aws, name)
        aws.changed(f"repository {name}: created")
        current_policy = None
    else:
        repository = found["repositories"][0]
        uri = repository["repositoryUri"]
        if repository.get("imageTagMutability") != "IMMUTABLE":
            aws.send("ecr", "put_image_tag_mutability", repositoryName=name, imageTagMutability="IMMUTABLE")
        if not repository.get("imageScanningConfiguration", {}).get("scanOnPush"):
            aws.send("ecr", "put_image_scanning_configuration", repositoryName=name,
                     imageScanningConfiguration={"scanOnPush": True})
        current_policy = describe_or_none(ecr.get_lifecycle_policy, repositoryName=name)
        aws.console.note(f"repository {name}: exists")
    policy = lifecycle_policy(keep)
    if current_policy is None or json.loads(current_policy["lifecyclePolicyText"]) != policy:
        aws.send("ecr", "put_lifecycle_policy", repositoryName=name, lifecyclePolicyText=json.dumps(policy))
    return uri


def planned_uri(aws: Aws, name: str) -> str:
    """The URI a repository will have (for a dry run, before it exists)."""
    return f"{aws.account}.dkr.ecr.{aws.region}.{DNS_SUFFIX.get(aws.partition, 'amazonaws.com')}/{name}"


def auth_config(token_response: dict) -> dict:
    """Docker credentials from a GetAuthorizationToken answer (base64 "AWS:<password>")."""
    data = token_response["authorizationData"][0]
    username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    return {"username": username, "password": password, "serveraddress": data["proxyEndpoint"]}


def newest_image_uri(aws: Aws, repository: str) -> str:
    """repositoryUri:tag of the most recently pushed tagged image."""
    ecr = aws.client("ecr")
    found = describe_or_none(ecr.describe_repositories, repositoryNames=[repository])
    if found is None:
        raise CliError(f"no ECR repository {repository}: run `kennel-aws push` first, or pass --image")
    newest = None
    for page in ecr.get_paginator("describe_images").paginate(repositoryName=repository,
                                                              filter={"tagStatus": "TAGGED"}):
        for detail in page["imageDetails"]:
            if detail.get("imageTags") and (newest is None or detail["imagePushedAt"] > newest["imagePushedAt"]):
                newest = detail
    if newest is None:
        raise CliError(f"ECR repository {repository} has no tagged image: run `kennel-aws push` first, or pass --image")
    return f"{found['repositories'][0]['repositoryUri']}:{sorted(newest['imageTags'])[0]}"
