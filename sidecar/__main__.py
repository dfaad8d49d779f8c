"""``python -m sidecar``."""

from .cli import main

main()
