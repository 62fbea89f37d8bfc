"""Push the training and serving images to Amazon ECR, or to any OCI registry.

ECR (the default): the repositories NAME-train and NAME-serve are created when
missing, with scan on push, IMMUTABLE tags, AES256 encryption and a lifecycle
policy that keeps the last --keep images; existing ones are brought to those
settings. Docker logs in with the ECR authorization token. Images are tagged
<version>-<commit> (--image-version, else the image's OCI version label, else
"dev"; the commit from the image's OCI revision label, which `make images` sets,
else the checkout's), so a tag always names exactly one build; pushing the same
build again is a no-op.

--registry HOST[:PORT] pushes to a plain OCI registry instead (no ECR or other
AWS call); --registry-username with --registry-password-stdin logs in first.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from kennel_ops.aws.context import Aws, CliError, Console, describe_or_none, to_json
from kennel_ops.aws.ecr import auth_config, ensure_repository
from kennel_ops.aws.images import docker_client, git_commit, image_tag, local_image, push, registry_digest
from kennel_ops.aws.names import Names

COMMAND = "push"
HELP = "push kennel-train and kennel-serve to ECR (or --registry) and print their URIs"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-image", default="kennel-train:latest", help="local training image (%(default)s)")
    parser.add_argument("--serve-image", default="kennel-serve:latest", help="local serving image (%(default)s)")
    parser.add_argument("--only", choices=("train", "serve"), help="push just one of the two images")
    parser.add_argument("--tag", help="the tag to push (default: <version>-<commit>)")
    parser.add_argument("--image-version", help="version part of the default tag (default: the image's "
                        "org.opencontainers.image.version label, else 'dev')")
    parser.add_argument("--keep", type=positive, default=30,
                        help="ECR lifecycle policy: keep the last N images per repository (%(default)s)")
    parser.add_argument("--repos-only", action="store_true",
                        help="create/update the ECR repositories and their policies; log in and push nothing")
    parser.add_argument("--registry", metavar="HOST[:PORT]", help="push to this OCI registry instead of ECR")
    parser.add_argument("--registry-username", help="with --registry: log in as this user")
    parser.add_argument("--registry-password-stdin", action="store_true",
                        help="with --registry-username: read the password from stdin")


def docker_login(client: Any, auth: dict) -> None:
    from docker.errors import APIError
    try:
        client.login(username=auth["username"], password=auth["password"], registry=auth["serveraddress"],
                     reauth=True)
    except APIError as error:
        raise CliError(f"docker login to {auth['serveraddress']} failed: {error.explanation or error}") from None


def selected_images(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    names = Names(args.name)
    images = [("train", args.train_image, names.train_repository),
              ("serve", args.serve_image, names.serve_repository)]
    return [entry for entry in images if args.only in (None, entry[0])]


def run(args: argparse.Namespace) -> None:
    if args.registry_username and not args.registry:
        raise CliError("--registry-username needs --registry (ECR logs in with its own token)")
    if args.registry_username and not args.registry_password_stdin:
        raise CliError("--registry-username needs --registry-password-stdin (passwords never go on the command line)")
    if args.registry:
        push_to_registry(args)
    else:
        push_to_ecr(args)


def push_to_registry(args: argparse.Namespace) -> None:
    console = Console()
    registry = args.registry.removeprefix("https://").removeprefix("http://").rstrip("/")
    auth = None
    if args.registry_username:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--registry-password-stdin: no password on stdin")
        auth = {"username": args.registry_username, "password": password, "serveraddress": registry}
    client = docker_client()
    if auth and not args.dry_run:
        docker_login(client, auth)
    for role, local, repository in selected_images(args):
        image = local_image(client, local)
        tag = args.tag or image_tag(image, args.image_version, git_commit())
        target = f"{registry}/{repository}"
        if args.dry_run:
            print_docker_plan(console, local, target, tag)
            continue
        result = push(client, image, target, tag, auth, console)
        console.result(f"{role} {result.reference} {result.digest}")


def push_to_ecr(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    uris = {repository: ensure_repository(aws, repository, args.keep) for _, _, repository in selected_images(args)}
    if args.repos_only:
        for role, _, repository in selected_images(args):
            aws.console.result(f"{role} {uris[repository]}")
        return
    client = docker_client()
    auth = None
    if not args.dry_run:
        auth = auth_config(aws.client("ecr").get_authorization_token())
        docker_login(client, auth)
    for role, local, repository in selected_images(args):
        image = local_image(client, local)
        tag = args.tag or image_tag(image, args.image_version, git_commit())
        uri = uris[repository]
        if args.dry_run:
            print_docker_plan(aws.console, local, uri, tag)
            continue
        existing = describe_or_none(aws.client("ecr").describe_images, repositoryName=repository,
                                    imageIds=[{"imageTag": tag}])
        if existing:
            stored = existing["imageDetails"][0]["imageDigest"]
            ours = registry_digest(image, uri)
            if ours == stored:
                aws.console.note(f"{uri}:{tag} is already in ECR")
                aws.console.result(f"{role} {uri}:{tag} {stored}")
                continue
            if ours is not None:
                raise CliError(f"{uri}:{tag} already holds another image ({stored}) and ECR tags are immutable: "
                               "commit your changes or pass --tag")
        result = push(client, image, uri, tag, auth, aws.console)
        aws.console.result(f"{role} {result.reference} {result.digest}")


def print_docker_plan(console: Console, local: str, repository: str, tag: str) -> None:
    console.result(to_json({"service": "docker", "operation": "tag",
                            "params": {"image": local, "repository": repository, "tag": tag}}))
    console.result(to_json({"service": "docker", "operation": "push",
                            "params": {"repository": repository, "tag": tag}}))
