#!/usr/bin/env python3
"""kennel's AWS operator commands: `python scripts/aws.py --help`."""
import sys
from pathlib import Path

# The package lives next to this file; this makes it importable from any directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kennel_aws.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
