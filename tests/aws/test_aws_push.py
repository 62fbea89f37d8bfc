"""push: ECR repositories against moto, image pushes against a real local registry.

A docker login and push to a moto ECR URI cannot work (moto's ECR has no
registry API behind its repository URIs, and the URI is an amazonaws.com host
that must not be contacted). So the ECR calls (repositories, scan on push,
immutable tags, lifecycle policy, the authorization token) are tested against
moto with --repos-only, and the Docker mechanics (tag, login, streamed push,
digest) against Debian's docker-registry on 127.0.0.1, with and without basic
auth; the ECR path hands the same push code an ECR token's credentials.
The tests that drive the Docker engine are also marked `container`.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from kennel_ops.aws.ecr import auth_config
from kennel_ops.aws.images import image_tag

pytestmark = pytest.mark.aws

TAG = "9.8.7-0123456789ab"  # <image version label>-<first 12 of the revision label>


@pytest.mark.container  # the real Docker engine
def test_the_tag_names_the_build():
    class Image:
        def __init__(self, labels):
            self.labels = labels
    built = Image({"org.opencontainers.image.revision": "0123456789abcdef0123456789abcdef01234567",
                   "org.opencontainers.image.version": "1.2.0"})
    assert image_tag(built, None, "fedcba987654") == "1.2.0-0123456789ab"  # the label, not the checkout
    assert image_tag(built, "2.0.0", None) == "2.0.0-0123456789ab"
    # A build with uncommitted changes must not take its commit's tag (ECR tags are immutable).
    assert image_tag(Image({"org.opencontainers.image.revision": "0123456789ab-dirty"}), None, None) == \
        "dev-0123456789ab-dirty"
    assert image_tag(Image({"org.opencontainers.image.revision": ""}), None, "fedcba987654") == "dev-fedcba987654"


def test_loopback_registries_are_insecure_by_default(docker_client):
    insecure = docker_client.info()["RegistryConfig"]["InsecureRegistryCIDRs"]
    assert "127.0.0.0/8" in insecure


@pytest.mark.container  # the real Docker engine
def test_push_to_a_plain_registry_twice(cli, registry, tiny_images, docker_client):
    argv = ["push", "--registry", registry.host, "--train-image", tiny_images["train"],
            "--serve-image", tiny_images["serve"]]
    status, out, err = cli(*argv)
    assert status == 0, err
    lines = dict((line.split()[0], line.split()[1:]) for line in out.splitlines())
    assert set(lines) == {"train", "serve"}
    for role in ("train", "serve"):
        reference, digest = lines[role]
        assert reference == f"{registry.host}/kennel-{role}:{TAG}"
        assert registry.tags(f"kennel-{role}") == [TAG]
        assert registry.manifest_digest(f"kennel-{role}", TAG) == digest
    assert lines["train"][1] != lines["serve"][1]

    status, again, err = cli(*argv)
    assert status == 0, err
    assert again == out  # same references, same digests
    assert registry.catalog() == ["kennel-serve", "kennel-train"]


@pytest.mark.container  # the real Docker engine
def test_push_logs_in_to_a_registry_with_basic_auth(cli, auth_registry, tiny_images, monkeypatch):
    import io
    user, password = auth_registry.auth
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    status, out, err = cli("push", "--registry", auth_registry.host, "--registry-username", user,
                           "--registry-password-stdin", "--only", "train", "--train-image", tiny_images["train"],
                           "--name", "authdemo")
    assert status == 0, err
    assert auth_registry.tags("authdemo-train") == [TAG]
    assert out.split()[2] == auth_registry.manifest_digest("authdemo-train", TAG)


@pytest.mark.container  # the real Docker engine
def test_wrong_registry_password_is_one_line(cli, auth_registry, tiny_images, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("not-the-password\n"))
    status, out, err = cli("push", "--registry", auth_registry.host, "--registry-username", "kennel",
                           "--registry-password-stdin", "--only", "train", "--train-image", tiny_images["train"])
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("error: docker login to 127.0.0.1:")
    assert auth_registry.catalog() == []


@pytest.mark.container  # the real Docker engine
def test_registry_dry_run_pushes_nothing(cli, registry, tiny_images, planned):
    status, out, err = cli("push", "--dry-run", "--registry", registry.host, "--train-image", tiny_images["train"],
                           "--serve-image", tiny_images["serve"])
    assert status == 0, err
    requests = planned(out)
    assert [(r["operation"], r["params"]["repository"]) for r in requests] == [
        ("tag", f"{registry.host}/kennel-train"), ("push", f"{registry.host}/kennel-train"),
        ("tag", f"{registry.host}/kennel-serve"), ("push", f"{registry.host}/kennel-serve")]
    assert registry.catalog() == []


@pytest.mark.container  # the real Docker engine
def test_missing_local_image_is_one_line(cli, registry):
    status, out, err = cli("push", "--registry", registry.host, "--train-image", "kennel-no-such-image:0")
    assert status == 1
    assert err == "error: no local image kennel-no-such-image:0: build it first (make images)\n"


def test_ecr_repositories_created_with_policies_then_unchanged(cli, moto, aws):
    status, out, err = cli("push", "--repos-only", "--keep", "7", "--tags", "team=ml,env=test")
    assert status == 0, err
    ecr = aws("ecr")
    for role in ("train", "serve"):
        name = f"kennel-{role}"
        repository = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
        assert repository["imageTagMutability"] == "IMMUTABLE"
        assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
        assert repository["encryptionConfiguration"]["encryptionType"] == "AES256"
        assert f"{role} {repository['repositoryUri']}" in out.splitlines()
        policy = json.loads(ecr.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"])
        assert policy["rules"][0]["selection"] == {"tagStatus": "any", "countType": "imageCountMoreThan",
                                                   "countNumber": 7}
        assert policy["rules"][0]["action"] == {"type": "expire"}
        listed = ecr.list_tags_for_resource(resourceArn=repository["repositoryArn"])["tags"]
        tags = {t["Key"]: t["Value"] for t in listed}
        assert tags == {"team": "ml", "env": "test", "kennel:deployment": "kennel"}

    moto.reset_recording()
    status, again, err = cli("push", "--repos-only", "--keep", "7")
    assert status == 0, err
    assert again == out
    assert moto.mutating() == []  # the second run only looked

    status, _, err = cli("push", "--repos-only", "--keep", "3")
    assert status == 0, err
    assert moto.mutating() == ["AmazonEC2ContainerRegistry_V20150921.PutLifecyclePolicy"] * 2
    policy = json.loads(ecr.get_lifecycle_policy(repositoryName="kennel-train")["lifecyclePolicyText"])
    assert policy["rules"][0]["selection"]["countNumber"] == 3


def test_existing_mutable_repository_is_made_immutable(cli, moto, aws):
    aws("ecr").create_repository(repositoryName="kennel-train", imageTagMutability="MUTABLE")
    status, _, err = cli("push", "--repos-only", "--only", "train")
    assert status == 0, err
    repository = aws("ecr").describe_repositories(repositoryNames=["kennel-train"])["repositories"][0]
    assert repository["imageTagMutability"] == "IMMUTABLE"
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}


def test_ecr_dry_run_sends_nothing(cli, moto, aws, planned):
    status, out, err = cli("push", "--repos-only", "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    assert aws("ecr").describe_repositories()["repositories"] == []
    requests = planned(out)
    assert [r["operation"] for r in requests] == ["CreateRepository", "PutLifecyclePolicy"] * 2
    assert requests[0]["params"]["imageTagMutability"] == "IMMUTABLE"
    assert "train 123456789012.dkr.ecr.us-east-1.amazonaws.com/kennel-train" in out


def test_ecr_token_becomes_docker_credentials(moto, aws):
    token = aws("ecr").get_authorization_token()
    credentials = auth_config(token)
    encoded = token["authorizationData"][0]["authorizationToken"]
    assert f"{credentials['username']}:{credentials['password']}" == base64.b64decode(encoded).decode()
    assert credentials["username"] == "AWS"
    assert credentials["serveraddress"] == token["authorizationData"][0]["proxyEndpoint"]
    assert credentials["serveraddress"].startswith("https://123456789012.dkr.ecr.us-east-1.amazonaws.com")


def test_cli_failures_are_one_line_from_a_real_process(tmp_path):
    """Bad flags (exit 2) and a missing region (exit 1): one line each, no traceback."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    script = [sys.executable, "-m", "kennel_ops.aws"]
    bad = subprocess.run([*script, "push", "--keep", "0"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "--keep" in bad.stderr and "Traceback" not in bad.stderr
    no_region = subprocess.run([*script, "push", "--repos-only"], capture_output=True, text=True, env=env,
                               cwd=tmp_path)
    assert no_region.returncode == 1
    assert no_region.stderr == ("error: no AWS region: pass --region, set AWS_DEFAULT_REGION or give the profile "
                                "a region\n")
