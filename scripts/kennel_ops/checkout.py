"""The repository checkout the operator tools work on.

The tools drive files of the checkout itself (compose.yaml, the Dockerfiles, lambda/,
containers/train's metric definitions, data/ and model/), so the package is installed
editable from it (`pip install -e .`, what `make venv` and `make ops-venv` do) and
finds the checkout from its own location: scripts/kennel_ops/ is two levels below.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
