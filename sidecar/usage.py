"""An argparse parser whose errors are one line and exit 2, like every other bad input (``cli``, ``keys``)."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser", "UsageError"]


class UsageError(Exception):
    """A command line that cannot be parsed; ``str()`` is the line shown."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)
