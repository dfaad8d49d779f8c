"""Confine what the rsync sender (and the ssh mux client it starts) may read: the source, and what running
needs (programs, libraries, a few public files of /etc) — never the ssh key, the runtime directory, /proc or
anything else. Kernel-enforced with Landlock (Linux >= 5.13).

Why: the planner never follows a symlink on the way to a path (:mod:`sidecar.paths`), but rsync opens the
files again a few milliseconds later, by name. A directory swapped for a symlink in between would make rsync
read through it. In the sandbox that read fails (EACCES: reported as an unreadable file, nothing is sent).

The ruleset is built once in the daemon (building does not restrict the daemon); each rsync child applies it
to itself before rsync runs: through the small exec helper ``upsync-landlock`` (``sidecar/upsync-landlock.c``,
built into the image and by ``tests/run.sh``) when it is installed, else between fork and exec
(``preexec_fn``: only two system calls there, no Python-level locks). The helper is the fast way: with a
``preexec_fn`` Python cannot use vfork, and a full fork of the multi-threaded daemon cost ~11 ms of CPU per
rsync (measured with 16 targets: 543 against 356 ms of sending CPU per file); the confinement is the same.

No maintained Python binding exists (PyPI's ``landlock`` is an alpha development release), so the three
system calls are made with ctypes here; numbers and structures from ``linux/landlock.h``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import logs

__all__ = ["HELPER", "Confinement", "Sandbox", "SandboxError", "SourceSandbox", "abi_version", "find_helper"]

log = logs.get("sandbox")

# x86_64 and aarch64 (the generic table) share these numbers.
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_ACCESS_EXECUTE = 1 << 0
_ACCESS_READ_FILE = 1 << 2
_ACCESS_READ_DIR = 1 << 3
# Only reads (and exec) are confined: the sender writes nothing but to its pipes.
_HANDLED = _ACCESS_EXECUTE | _ACCESS_READ_FILE | _ACCESS_READ_DIR

# What rsync and ssh need to start and run: programs and libraries (public, from the distribution) ...
_SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# ... and a few files of /etc: the dynamic loader's cache, and the passwd/group entries ssh looks its user
# up in (or their libnss-wrapper copies, named by the environment).
_SYSTEM_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.preload",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/localtime",
    "/dev/null",
)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int


HELPER = "upsync-landlock"


def find_helper() -> str | None:
    """The exec helper: beside the interpreter (the image's venv, the tests' ``.venv``), else on ``PATH``."""
    beside = Path(sys.executable).parent / HELPER
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(HELPER)


@dataclass(frozen=True)
class Confinement:
    """How to start one child in the sandbox: through the helper (its argv prefix, the ruleset's descriptor
    kept open for it) or, without the helper, with a ``preexec_fn``."""

    prefix: tuple[str, ...] = ()
    pass_fds: tuple[int, ...] = ()
    preexec_fn: Callable[[], None] | None = None

    def argv(self, args: Sequence[str]) -> list[str]:
        return [*self.prefix, *args]


def _nss_files() -> list[str]:
    """libnss-wrapper's passwd and group files, when the image's entrypoint set them (an arbitrary uid)."""
    return [f for f in (os.environ.get("NSS_WRAPPER_PASSWD", ""), os.environ.get("NSS_WRAPPER_GROUP", "")) if f]


class SandboxError(Exception):
    """Landlock cannot be used here; the message says why."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in linux/landlock.h
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (too old, disabled, or blocked by seccomp)."""
    if platform.system() != "Linux":
        return 0
    version = _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(0, int(version))


def _why(errno_: int) -> str:
    return os.strerror(errno_) if errno_ else "unknown error"


class Sandbox:
    """A ruleset allowing reads (and exec) only beneath ``read_trees`` and of ``read_files``, plus the
    system's programs and libraries.

    Raises:
        SandboxError: the kernel offers no Landlock (see :func:`abi_version`) or a rule cannot be added.
    """

    def __init__(self, read_trees: Iterable[str | Path], read_files: Iterable[str | Path] = ()) -> None:
        if abi_version() < 1:
            raise SandboxError("the kernel offers no Landlock (Linux >= 5.13 with landlock in its LSM list)")
        attr = _RulesetAttr(_HANDLED)
        fd = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0)
        if fd < 0:
            raise SandboxError(f"landlock_create_ruleset: {_why(ctypes.get_errno())}")
        self.fd = int(fd)
        os.set_inheritable(self.fd, True)
        self.allowed: list[str] = []
        try:
            for tree in _SYSTEM_TREES:
                self._allow(tree, _HANDLED, optional=True)
            for tree in read_trees:
                self._allow(tree, _ACCESS_READ_FILE | _ACCESS_READ_DIR)
            for file in (*_SYSTEM_FILES, *_nss_files()):
                if file:
                    self._allow(file, _ACCESS_READ_FILE, optional=True)
            for file in read_files:
                self._allow(file, _ACCESS_READ_FILE)
        except BaseException:
            os.close(self.fd)
            raise

    def _allow(self, path: str | Path, access: int, optional: bool = False) -> None:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if optional:
                return
            raise SandboxError(f"cannot allow {path}: it does not exist") from None
        try:
            st = os.fstat(pfd)
            if not stat.S_ISDIR(st.st_mode):
                access &= ~_ACCESS_READ_DIR  # directory rights on a file are an error (EINVAL)
            rule = _PathBeneathAttr(access, pfd)
            if _syscall(_SYS_ADD_RULE, self.fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
                raise SandboxError(f"landlock_add_rule({path}): {_why(ctypes.get_errno())}")
            self.allowed.append(str(path))
        finally:
            os.close(pfd)

    def preexec(self) -> Callable[[], None]:
        """The function to run in the child between fork and exec (``subprocess.Popen(preexec_fn=...)``)."""
        fd = self.fd
        syscall, prctl = _syscall, _prctl

        def restrict() -> None:
            # Landlock requires no_new_privs (or CAP_SYS_ADMIN); the sender has no use for setuid anyway.
            if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or syscall(_SYS_RESTRICT_SELF, fd, 0) != 0:
                raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")

        return restrict

    def confinement(self, helper: str | None) -> Confinement:
        """How to start a child confined by this ruleset: through ``helper`` if given, else ``preexec_fn``."""
        if helper:
            return Confinement((helper, str(self.fd)), (self.fd,))
        return Confinement(preexec_fn=self.preexec())

    def close(self) -> None:
        os.close(self.fd)


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# How often (at most) the files a ruleset names are compared with those it was built for, in seconds.
RECHECK_S = 1.0


class SourceSandbox:
    """The sender's sandbox for one source, rebuilt when something it names is replaced.

    Landlock rules name inodes, not paths: a source deleted and made again (a volume recreated, remounted) is
    another directory, outside the old ruleset, and every read would be refused; so is an ``/etc/passwd``
    rewritten by ``usermod`` or a package update (written anew and renamed over the old one), after which ssh
    finds no user for its uid. Each run asks :meth:`confinement`, which compares the device and inode of every
    path the ruleset names with those it was built for (a ``stat`` each) and builds it again if one changed.
    The source is compared on every run, the other files at most every ``recheck_s`` seconds: ten ``stat``
    calls per rsync, each a GIL hand-off among 16 or 64 workers starting theirs at once, were a tenth of the
    daemon's CPU in W6. An ssh started with the old ruleset in that window fails and is retried.

    Raises:
        SandboxError: from the first build (the kernel offers no Landlock).
    """

    def __init__(
        self,
        root: str,
        read_files: Iterable[str | Path] = (),
        helper: str | None = None,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.root = root
        self.read_files = tuple(read_files)
        self.helper = helper
        self.recheck_s = recheck_s
        self._checked = -float("inf")  # monotonic time of the last comparison
        self._lock = threading.Lock()
        self._built: list[Sandbox] = []  # kept open until close(): a child may be starting with an old one
        self._identities: list[tuple[int, int] | None] = []
        self._current: Sandbox | None = None
        self._build()

    def _watched(self) -> list[str | Path]:
        return [self.root, *self.read_files, *_SYSTEM_FILES, *_nss_files()]

    def _build(self) -> None:
        identities = [_identity(p) for p in self._watched()]
        sandbox = Sandbox([self.root], self.read_files)
        self._built.append(sandbox)
        self._identities = identities
        self._current = sandbox

    def confinement(self) -> Confinement:
        """How to start a child confined to the files as they are now (through the helper if there is one)."""
        return self._sandbox().confinement(self.helper)

    def _sandbox(self) -> Sandbox:
        with self._lock:
            # The source itself on every run: read with an old ruleset, its files would look unreadable and be
            # skipped as such, not retried. Anything else replaced makes ssh fail, which is retried.
            recent = time.monotonic() - self._checked < self.recheck_s
            if recent and self._current is not None and _identity(self.root) == self._identities[0]:
                return self._current
            self._checked = time.monotonic()
            now = [_identity(p) for p in self._watched()]
            if now != self._identities and now[0] is not None:  # a missing source: the guard refuses the sync
                changed = [str(p) for p, a, b in zip(self._watched(), now, self._identities, strict=True) if a != b]
                log.info("sandbox rebuilt: replaced since it was built", extra={"fields": {"paths": ",".join(changed)}})
                self._build()
            assert self._current is not None
            return self._current

    def close(self) -> None:
        with self._lock:
            for sandbox in self._built:
                sandbox.close()
            self._built.clear()
