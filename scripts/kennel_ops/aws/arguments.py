"""argparse types made from the checks the commands share.

Standard library only: kennel-loadtest imports the names' checks before Locust
patches the standard library, so nothing here may pull in boto3 (and ssl).
"""
from __future__ import annotations

import argparse
from typing import Callable, TypeVar

T = TypeVar("T")


def argument_type(check: Callable[[str], T], errors: tuple[type[Exception], ...] = (ValueError,)) -> Callable[[str], T]:
    """An argparse ``type=`` from a check that raises: its message becomes argparse's one-line error."""
    def convert(text: str) -> T:
        try:
            return check(text)
        except errors as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert
