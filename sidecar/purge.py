"""A ready-made ``SYNC_HOOK_COMMAND``: purge what a sync changed from an HTTP cache, one ``PURGE`` per URL.

    SYNC_HOOK_COMMAND="python -m sidecar.purge http://edge:8081/wp-content/uploads/"

For every file the sync sent or deleted: ``PURGE <prefix><path>`` (the path percent-encoded); when the sync
says "everything" (``UPSYNC_ALL=1``): one ``PURGE <prefix>*``. ``PURGE`` is what nginx (ngx_cache_purge,
NGINX Plus, the demo edge in compose/edge), Varnish and Squid setups commonly take. 200/204: purged;
404: it was not cached; anything else fails the run (exit 1; the daemon logs and counts it, and never
retries it). Deleted directories (``dir/``) are skipped: rsync lists every file in them too. All requests
go over one kept-alive connection. Standard library only: the sidecar image has no curl.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import urllib.parse
from collections.abc import Sequence

__all__ = ["main", "urls"]

OK = (200, 202, 204, 404)


def urls(prefix: str, stdin: bytes, everything: bool) -> list[str]:
    """The request targets (path and query) for a hook's stdin.

    Example:
        >>> urls("/up/", b"sent 2026/caf\\xc3\\xa9 1.jpg\\0deleted old/\\0deleted 2026/x.jpg\\0", False)
        ['/up/2026/caf%C3%A9%201.jpg', '/up/2026/x.jpg']
        >>> urls("/up/", b"", True)
        ['/up/*']
    """
    if everything:
        return [prefix + "*"]
    out = []
    for record in stdin.split(b"\0"):
        what, _, path = record.partition(b" ")
        if what in (b"sent", b"deleted") and path and not path.endswith(b"/"):
            out.append(prefix + urllib.parse.quote(path, safe="/"))
    return out


def _connection(parts: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname or "", parts.port, timeout=timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.purge", description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="URL the synced paths are below, e.g. http://edge:8081/wp-content/uploads/")
    parser.add_argument("--method", default="PURGE", help="HTTP method (default PURGE)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    args = parser.parse_args(argv)
    parts = urllib.parse.urlsplit(args.prefix)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"{args.prefix!r} is not an http:// or https:// URL")
    base = parts.path if parts.path.endswith("/") else parts.path + "/"
    targets = urls(base, sys.stdin.buffer.read(), os.environ.get("UPSYNC_ALL") == "1")
    conn = _connection(parts, args.timeout)
    failed, missing = [], 0
    try:
        for target in targets:
            try:
                conn.request(args.method, target)
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                print(f"{args.method} {target}: {exc}", file=sys.stderr)
                return 1  # the cache is unreachable: the rest would fail alike
            if resp.status not in OK:
                failed.append(f"{target}: {resp.status}")
            missing += resp.status == 404
    finally:
        conn.close()
    print(f"purge: {len(targets) - len(failed)} of {len(targets)} done ({missing} were not cached)")
    for line in failed[:20]:
        print(f"{args.method} failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
