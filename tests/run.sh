#!/usr/bin/env bash
# The one test command (README "Testing"): installs what it needs, then lints and runs every suite.
#   bash tests/run.sh            everything: lint, unit, integration (real sshd + rsync), faults, compose stack,
#                                the Swarm stack on two engines, the Kubernetes manifests and Dockerfiles checks
#   bash tests/run.sh -m "not stack"   any extra arguments go to pytest
# Needs root for the integration suites (a dedicated ssh target user, sysctl knobs); Docker for the stack.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
log() { printf '[tests] %s\n' "$*" >&2; }
# apt_install WHAT APT-ARGS...: install Debian packages quietly (as root); on failure show apt's last lines, stop.
apt_install() {
  log "installing $1"
  shift
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq "$@"; } >/tmp/upsync-apt.log 2>&1 \
    || { tail -20 /tmp/upsync-apt.log >&2; exit 1; }
}

# System packages: rsync 3.5 (with rrsync), the OpenSSH server and client.
missing=()
for cmd in rsync rrsync sshd ssh ssh-keygen; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then log "missing ${missing[*]}: install rsync and openssh-server (needs root)"; exit 1; fi
  apt_install "rsync openssh-server openssh-client" rsync openssh-server openssh-client
fi

# Debian's chromium: the monitoring stack test screenshots Prometheus' graph page with it (headless).
# Not needed when the stack is skipped; without root the test says what is missing.
if [ "${UPSYNC_SKIP_STACK:-}" != 1 ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  apt_install "chromium (headless screenshots in the monitoring stack test)" --no-install-recommends chromium
fi

# Python: a project venv with the pinned tools and the package itself (editable).
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.lock 2>&1 | grep -v '^WARNING: Location' >&2 || true
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v '^WARNING: Location' >&2 || true
.venv/bin/python -c 'import sidecar, watchfiles, tenacity, dotenv, prometheus_client, pytest' \
  || { log "the venv is incomplete; see pip's output above"; exit 1; }

# The sandbox's exec helper (sidecar/upsync-landlock.c; sidecar/sandbox.py says why), beside the venv's python
# where the daemon looks for it, as the image has it. Rebuilt when the source changes.
if [ ! -x .venv/bin/upsync-landlock ] || [ sidecar/upsync-landlock.c -nt .venv/bin/upsync-landlock ]; then
  if ! command -v cc >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then log "no C compiler for the sandbox helper: install gcc and libc6-dev (needs root)"; exit 1; fi
    apt_install "gcc libc6-dev (the sandbox's exec helper)" --no-install-recommends gcc libc6-dev
  fi
  log "building .venv/bin/upsync-landlock"
  cc -O2 -Wall -Wextra -Werror -o .venv/bin/upsync-landlock sidecar/upsync-landlock.c
fi

# The manifest and Dockerfile checks (tests/test_manifests.py): kubernetes-validate and checkov, in a venv of
# their own (checkov pins many packages), remade only when requirements-checks.lock changes.
if ! cmp -s requirements-checks.lock .venv-checks/installed.lock 2>/dev/null; then
  log "installing the manifest checks into .venv-checks (about a minute)"
  rm -rf .venv-checks
  "$python" -m venv .venv-checks
  .venv-checks/bin/python -m pip install -q --no-compile --disable-pip-version-check -r requirements-checks.lock 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv-checks/bin/checkov --version >/dev/null && .venv-checks/bin/kubernetes-validate --version >/dev/null \
    || { log ".venv-checks is incomplete; see pip's output above"; exit 1; }
  cp requirements-checks.lock .venv-checks/installed.lock
fi

log "ruff"
.venv/bin/ruff check sidecar tests bench
.venv/bin/ruff format --check sidecar tests bench >/dev/null || { .venv/bin/ruff format --diff sidecar tests bench | head -40; exit 1; }

log "pytest"
exec .venv/bin/python -m pytest "$@"
