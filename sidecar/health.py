"""``/healthz``, ``/readyz`` and ``/metrics`` over HTTP (``SYNC_HTTP_ADDR``).

* ``/healthz``: 200 while the process, its watcher and its workers are alive; 503 otherwise.
* ``/readyz``: 200 once the first full sync reached every target and nothing is failing; 503 with a
  JSON document naming each target's state and reason otherwise (a failing target, the delete guard).
* ``/metrics``: Prometheus text format.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import logs

__all__ = ["HealthServer"]

log = logs.get("health")

StatusFn = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """Serve the three endpoints from a background thread.

    Args:
        addr: ``(host, port)`` to listen on (port 0 picks a free one).
        health: returns ``(alive, document)``.
        ready: returns ``(ready, document)``.
        registry: the metrics registry.
    """

    def __init__(self, addr: tuple[str, int], health: StatusFn, ready: StatusFn, registry: CollectorRegistry) -> None:
        class Handler(BaseHTTPRequestHandler):
            server_version = "upsync"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, doc = (health if path == "/healthz" else ready)()
                    body = json.dumps(doc, indent=1, default=str).encode() + b"\n"
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Cache-Control", "no-store")
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a scrape or probe timed out): nothing to answer, nothing to log

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the batch lines

        class Server(ThreadingHTTPServer):
            # The family of the address asked for: "[::]:9110" (dual-stack on Linux) or "[::1]:9110" need an
            # IPv6 socket, which ThreadingHTTPServer never makes on its own.
            address_family = socket.getaddrinfo(
                addr[0] or None, addr[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]

        self.server = Server(addr[:2], Handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("http listening", extra={"fields": {"addr": f"{self.address[0]}:{self.address[1]}"}})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
