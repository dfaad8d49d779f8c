"""upsync: a sidecar that replicates an uploads directory to content servers as it changes.

Data flow, one module each: :mod:`~sidecar.config` -> :mod:`~sidecar.watcher` ->
:mod:`~sidecar.batch` / :mod:`~sidecar.plan` -> :mod:`~sidecar.ssh` + :mod:`~sidecar.rsync` ->
:mod:`~sidecar.worker` (one per target, with retry) -> :mod:`~sidecar.health` / :mod:`~sidecar.metrics`.
:mod:`~sidecar.daemon` wires them; :mod:`~sidecar.cli` is the command line.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
