"""Benchmark of the upsync sidecar against lsyncd, a full-tree inotify+rsync loop and the rsync floor.

Run ``.venv/bin/python -m bench`` (or ``--quick``) as root from the repository root; see bench/README.md.
"""
