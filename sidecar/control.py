"""The operator's line to a running daemon: ``status``, ``approve`` and ``retry`` over a Unix socket.

The socket lives in the daemon's private runtime directory (mode 0700, in ``SYNC_RUNTIME_DIR``, a tmpfs in
the image), so only the daemon's own uid can use it — ``docker compose exec sidecar python -m sidecar
status`` runs as that uid — and it works with a read-only root and with ``SYNC_HTTP_ADDR`` disabled. It is
deliberately not on the HTTP port: that one may be opened to a monitoring network, and approving a mass
delete must stay a local operator action.

One JSON request per connection, one JSON answer: ``{"cmd": "status"}``, ``{"cmd": "approve", "deletes": N,
"target": name-or-null}``, ``{"cmd": "retry"}``.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import logs

__all__ = ["ControlError", "ControlServer", "find_daemon", "request"]

log = logs.get("control")

SOCKET = "control.sock"
INFO = "daemon.json"
_MAX_REQUEST = 64 * 1024
_TIMEOUT_S = 10.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """No running daemon could be asked; the message says why and what to do."""


class ControlServer:
    """Serve requests on ``directory/control.sock`` from a background thread.

    Args:
        directory: the daemon's private runtime directory.
        handler: answers a request document.
        info: written next to the socket, so a command finds the daemon of its own source.
    """

    def __init__(self, directory: Path, handler: Handler, info: dict[str, Any]) -> None:
        self.path = directory / SOCKET

        class _Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.connection.settimeout(_TIMEOUT_S)
                try:
                    line = self.rfile.readline(_MAX_REQUEST)
                    doc = json.loads(line)
                    if not isinstance(doc, dict):
                        raise ValueError("not an object")
                    answer = handler(doc)
                except (ValueError, OSError) as exc:
                    answer = {"ok": False, "error": f"bad request: {exc}"}
                self.wfile.write(json.dumps(answer, default=str).encode() + b"\n")

        self.server = socketserver.ThreadingUnixStreamServer(str(self.path), _Handler)
        self.server.daemon_threads = True
        os.chmod(self.path, 0o600)
        (directory / INFO).write_text(json.dumps(info) + "\n", encoding="utf-8")
        self._thread = threading.Thread(target=self.server.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)


def find_daemon(base: Path, source: str) -> Path:
    """The control socket of the running daemon (of this uid) replicating ``source``.

    Raises:
        ControlError: none is running, or several are.
    """
    found = []
    for info_file in sorted(base.glob(f"upsync-*/{INFO}")):
        try:
            if info_file.stat().st_uid != os.getuid():
                continue
            info = json.loads(info_file.read_text(encoding="utf-8"))
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        sock = info_file.parent / SOCKET
        if info.get("source") == source and Path(f"/proc/{pid}").exists() and sock.exists():
            found.append(sock)
    if not found:
        raise ControlError(
            f"no running upsync daemon of uid {os.getuid()} replicates {source} (looked in {base}/upsync-*/; "
            "run this inside the sidecar's container, as its user, with the same SYNC_SOURCE and SYNC_RUNTIME_DIR)"
        )
    if len(found) > 1:
        raise ControlError(f"{len(found)} running daemons replicate {source}; stop the extra ones")
    return found[0]


def request(sock: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """Send one request, return the answer.

    Raises:
        ControlError: the daemon did not answer.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(_TIMEOUT_S)
            s.connect(str(sock))
            s.sendall(json.dumps(doc).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
    except (OSError, ValueError) as exc:
        raise ControlError(f"the daemon at {sock} did not answer ({exc})") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the daemon at {sock} answered something else than a JSON object")
    return answer
