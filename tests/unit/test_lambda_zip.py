"""The deployment package: reproducible bytes, the handler at the root, nothing but the function."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from kennel_ops import build_lambda_zip

REPO = Path(__file__).resolve().parents[2]


def test_two_builds_give_the_same_bytes(tmp_path):
    first = build_lambda_zip.build(tmp_path / "a" / "lambda.zip")
    # Touch the sources: a later mtime must not change the package.
    for path in build_lambda_zip.package_files():
        os.utime(path, (time.time() + 5, time.time() + 5))
    second = build_lambda_zip.build(tmp_path / "b" / "lambda.zip")
    assert first.read_bytes() == second.read_bytes()


def test_entries_are_sorted_with_fixed_time_and_mode(tmp_path):
    with zipfile.ZipFile(build_lambda_zip.build(tmp_path / "lambda.zip")) as archive:
        entries = archive.infolist()
        names = [entry.filename for entry in entries]
        assert names == sorted(names) == ["kennel_lambda.py", "kennel_lambda_events.py"]
        for entry in entries:
            assert entry.date_time == (1980, 1, 1, 0, 0, 0)
            assert entry.external_attr >> 16 == 0o100644
            assert entry.extra == b""
            assert archive.read(entry) == (REPO / "lambda" / entry.filename).read_bytes()


def test_the_packaged_handler_imports_and_answers_from_the_zip_alone(tmp_path):
    """What Lambda does: put the zip on the path, import kennel_lambda, call handler."""
    package = build_lambda_zip.build(tmp_path / "lambda.zip")
    code = ("import json, kennel_lambda; r = kennel_lambda.handler({}, None); "
            "print(r['statusCode'], json.loads(r['body'])['error'])")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(package), "AWS_DEFAULT_REGION": "us-east-1",
           "ENDPOINT_NAME": "kennel-test"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("400 give exactly one of")


def test_make_lambda_zip_writes_build_lambda_zip(tmp_path):
    result = subprocess.run(["make", "--no-print-directory", "lambda-zip", f"LAMBDA_ZIP={tmp_path}/out.zip"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256((tmp_path / "out.zip").read_bytes()).hexdigest()
    assert f"sha256 {digest}" in result.stdout
