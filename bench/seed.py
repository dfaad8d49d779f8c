"""Seeding an existing library: the first full sync, measured. ``.venv/bin/python -m bench.seed``
(as root, from the repository root; ``--files 20000 --size-gb 2`` by default, ``--quick`` for a smoke run).

Builds a WordPress-like uploads library: YYYY/MM directories, each upload an original and five generated
sizes (WordPress' 150, 300, 768, 1024 and 1536 widths), random bytes (incompressible, like JPEG), sized so
the total is what was asked. Then copies it into an empty ``rrsync -wo`` target on a loopback sshd
(tests/sshd.py), one run at a time, each into an emptied target, ``--rounds`` times (default 2) with the
order alternating (a shared machine's load drifts):

1. ``rsync -a`` over one ssh connection: the reference;
2. ``python -m sidecar once``: its pre-scan, the dry run that counts what a delete would remove (and gives
   the progress its totals), then the transfer, streamed, with a progress line every ``--interval`` s.

Each target is then compared with the source (sizes and SHA-256 of every file). Prints a table and the
sidecar's progress lines; writes ``bench/results/seed-<stamp>.json``. How busy the machine was with other
work is recorded (it is shared): sampled for 5 s before the runs, and as load averages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.proc import system_busy
from bench.report import machine_info
from tests.helpers import Sidecar
from tests.sshd import KeyPair, SshServer

RESULTS = Path(__file__).resolve().parent / "results"
# Share of an upload's bytes per file: the original, then 1536, 1024, 768, 300 and 150 wide.
SIZES = (0.40, 0.25, 0.15, 0.10, 0.07, 0.03)
SUFFIXES = ("", "-1536x1152", "-1024x768", "-768x576", "-300x225", "-150x150")


def say(msg: str) -> None:
    print(f"[seed] {msg}", file=sys.stderr, flush=True)


def build_library(root: Path, files: int, total: int, seed: int = 11) -> tuple[int, int]:
    """Write the library; returns (files, bytes)."""
    rng = random.Random(seed)
    pool = os.urandom(8 << 20)  # slices of one random pool: fast to write, still incompressible
    uploads = max(1, files // len(SIZES))
    per_upload = total / uploads
    months = [f"{y}/{m:02d}" for y in range(2019, 2027) for m in range(1, 13)]
    written = count = 0
    for n in range(uploads):
        folder = root / months[n * len(months) // uploads]
        folder.mkdir(parents=True, exist_ok=True)
        share = per_upload * rng.uniform(0.5, 1.5)
        for part, suffix in zip(SIZES, SUFFIXES, strict=True):
            size = max(1, int(share * part))
            start = rng.randrange(0, len(pool) - min(size, len(pool)) + 1)
            data = pool[start : start + size]
            while len(data) < size:
                data += pool[: size - len(data)]
            (folder / f"img-{n:06d}{suffix}.jpg").write_bytes(data)
            written += size
            count += 1
    return count, written


def digest(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            out[str(path.relative_to(root))] = (path.stat().st_size, h.hexdigest())
    return out


def empty(root: Path) -> None:
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--interval", type=int, default=5, help="SYNC_PROGRESS_INTERVAL_S (default 5)")
    parser.add_argument("--tmpdir", default="/dev/shm", help="where the trees live (default /dev/shm)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, order alternating (default 2)")
    parser.add_argument("--quick", action="store_true", help="2,000 files, 100 MB, 1 s progress, 1 round")
    parser.add_argument("--sidecar-env", action="append", default=[], metavar="SYNC_X=value")
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.size_gb, args.interval, args.rounds = 2000, 0.1, 1, 1
    if os.geteuid() != 0:
        parser.error("run as root (it makes the ssh target account)")
    base = Path(tempfile.mkdtemp(prefix="upsync-seed-", dir=args.tmpdir))
    base.chmod(0o755)
    sshd: SshServer | None = None
    try:
        source = base / "library"
        source.mkdir()
        say(f"building {args.files} files / {args.size_gb} GB in {source}")
        t = time.monotonic()
        files, size = build_library(source, args.files, int(args.size_gb * 1e9))
        built = time.monotonic() - t
        say(f"built {files} files, {size / 1e9:.2f} GB in {built:.1f} s; hashing the source")
        expected = digest(source)
        key, host = KeyPair(base, "client"), KeyPair(base, "host")
        sshd = SshServer(base / "sshd", key, host).start()
        known = base / "known_hosts"
        known.write_text(sshd.known_hosts_line() + "\n")
        busy = system_busy(5)
        say(f"machine busy with other work: {busy['busy_pct']} % of both cores over 5 s; load {loadavg()}")
        runs: list[dict[str, Any]] = []
        shell = f"ssh -p {sshd.port} -i {key.private} -o UserKnownHostsFile={known} -o BatchMode=yes"
        env = {"SYNC_PROGRESS_INTERVAL_S": str(args.interval), "SYNC_LOG_FORMAT": "text", "SYNC_HTTP_ADDR": ""}
        env.update(dict(item.split("=", 1) for item in args.sidecar_env))

        def reference() -> dict[str, Any]:
            cmd = ["rsync", "-a", "--stats", "-e", shell, f"{source}/", f"{sshd.user}@127.0.0.1:/"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            return {"ok": proc.returncode == 0, "log": proc.stderr[-2000:]}

        def sidecar() -> dict[str, Any]:
            proc = Sidecar(source, [sshd], key, base, **env).run("once", timeout=6 * 3600)
            lines = proc.stderr.splitlines()
            return {
                "ok": proc.returncode == 0,
                "settings": env,
                "progress_lines": [ln for ln in lines if "full sync progress" in ln],
                "synced": [ln for ln in lines if " synced " in ln],
                "log": "" if proc.returncode == 0 else proc.stderr[-3000:],
            }

        tools = {"rsync -a": reference, "sidecar once": sidecar}
        for n in range(args.rounds):
            # Alternate the order: on a shared machine the second run of a round is not the first's twin.
            for name in list(tools) if n % 2 == 0 else list(tools)[::-1]:
                assert sshd is not None
                empty(sshd.root)
                load = loadavg()
                t = time.monotonic()
                run = tools[name]()
                seconds = time.monotonic() - t
                identical = run.pop("ok") and digest(sshd.root) == expected
                runs.append(
                    {
                        "tool": name,
                        "round": n + 1,
                        "seconds": round(seconds, 2),
                        "identical": identical,
                        "load_before": load,
                        "load_after": loadavg(),
                        **run,
                    }
                )
                say(f"round {n + 1}: {name}: {seconds:.1f} s, identical: {identical}")
    finally:
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(base, ignore_errors=True)

    result = {
        "machine": machine_info(),
        "library": {"files": files, "bytes": size, "build_s": round(built, 1), "tmpdir": args.tmpdir},
        "machine_busy_before": busy,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"seed-{'quick-' if args.quick else ''}{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    best = {name: min(r["seconds"] for r in runs if r["tool"] == name) for name in ("rsync -a", "sidecar once")}
    print(f"| first sync of {files:,} files / {size / 1e9:.2f} GB | round | seconds | load before | identical |")
    print("|---|---|---|---|---|")
    for run in runs:
        load = run["load_before"][0]
        print(f"| {run['tool']} | {run['round']} | {run['seconds']:.1f} | {load:.1f} | {run['identical']} |")
    print(
        f"\nbest of each: sidecar {best['sidecar once']:.1f} s, rsync -a {best['rsync -a']:.1f} s "
        f"({best['sidecar once'] / best['rsync -a']:.2f}x)"
    )
    last = [r for r in runs if r["tool"] == "sidecar once"][-1]
    print("\nprogress lines (last sidecar run):\n" + "\n".join(last["progress_lines"] + last["synced"]))
    print(f"\n(results: {out})")
    return 0 if all(r["identical"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
