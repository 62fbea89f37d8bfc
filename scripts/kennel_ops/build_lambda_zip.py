"""Build the Lambda deployment package: the same bytes from the same sources, every time.

    kennel-lambda-zip [build/lambda.zip]             (make lambda-zip)

The zip holds the function's modules (lambda/*.py) at its root, so the handler
is ``kennel_lambda.handler``. It is reproducible: entries sorted by name, every
timestamp 1980-01-01 00:00, every file mode 0644, no extra fields, and entries
stored uncompressed (deflate output may change with the zlib version; the
modules are a few tens of kilobytes). Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from kennel_ops.checkout import REPO

SOURCE_DIR = REPO / "lambda"
DEFAULT_OUTPUT = REPO / "build" / "lambda.zip"
HANDLER = "kennel_lambda.handler"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
FILE_MODE = 0o100644  # regular file, rw-r--r--


def package_files(source_dir: Path = SOURCE_DIR) -> list[Path]:
    """The modules that go into the zip, sorted: every .py directly in lambda/."""
    files = sorted(path for path in source_dir.glob("*.py") if path.is_file())
    if not any(path.name == HANDLER.split(".")[0] + ".py" for path in files):
        raise FileNotFoundError(f"{source_dir} has no {HANDLER.split('.')[0]}.py")
    return files


def build(output: Path = DEFAULT_OUTPUT, source_dir: Path = SOURCE_DIR) -> Path:
    """Write the zip atomically (a reader never sees half of it) and return its path."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".lambda.", suffix=".zip", delete=False) as tmp:
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
                for path in package_files(source_dir):
                    entry = zipfile.ZipInfo(path.name, date_time=FIXED_TIME)
                    entry.create_system = 3  # Unix, so that external_attr holds the mode
                    entry.external_attr = FILE_MODE << 16
                    entry.compress_type = zipfile.ZIP_STORED
                    archive.writestr(entry, path.read_bytes())
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-lambda-zip", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    try:
        path = build(args.output)
    except OSError as exc:
        print(f"build_lambda_zip: {exc}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path} sha256 {digest} handler {HANDLER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
