# upsync sidecar image: Debian's python3 + a venv with the pinned requirements, rsync, openssh-client, tini.
#   docker build -t upsync/sidecar:local .
# Runs as the unprivileged user "upsync" (uid 10001) unless told otherwise (compose: user: "33:33", the
# uid that owns WordPress' uploads). Works with a read-only root file system: only SYNC_RUNTIME_DIR
# (/run/upsync, mount a tmpfs there) is written.

# ---- build: the venv (pip and the build tools stay in this stage) -------------------------------
FROM debian:bookworm-slim AS build

# The official debian image lists bookworm-security/-updates; a debootstrapped base may not.
# rsync 3.5 (rrsync's per-directory lock) and current openssh come from there.
RUN set -eux; \
    if ! grep -rqs bookworm-security /etc/apt/sources.list /etc/apt/sources.list.d/; then \
        printf 'deb http://deb.debian.org/debian bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
            > /etc/apt/sources.list.d/bookworm-updates.list; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv gcc libc6-dev; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Dependencies first: this layer stays cached until requirements.lock changes.
COPY requirements.lock /src/requirements.lock
RUN set -eux; \
    python3 -m venv /opt/upsync; \
    /opt/upsync/bin/pip install --no-compile --only-binary=:all: -r /src/requirements.lock

COPY pyproject.toml README.md /src/
COPY sidecar /src/sidecar
RUN set -eux; \
    /opt/upsync/bin/pip install --no-compile --no-deps /src; \
    /opt/upsync/bin/pip uninstall -y pip setuptools; \
    rm -rf /opt/upsync/bin/activate* /opt/upsync/bin/Activate.ps1; \
    /opt/upsync/bin/python -c 'import sidecar, watchfiles, tenacity, dotenv, prometheus_client'; \
    find /opt/upsync -name __pycache__ -prune -exec rm -rf {} +
# The sandbox's exec helper (sidecar/sandbox.py says why), beside the venv's python where the daemon looks.
RUN set -eux; \
    gcc -O2 -Wall -Wextra -Werror -o /opt/upsync/bin/upsync-landlock /src/sidecar/upsync-landlock.c; \
    strip /opt/upsync/bin/upsync-landlock

# ---- runtime --------------------------------------------------------------------------------------
FROM debian:bookworm-slim

# python3: the venv's interpreter (the venv links to /usr/bin/python3).
# libnss-wrapper: a passwd entry for an arbitrary --user uid (ssh refuses to run without one).
# Kept small (goal <= 120 MB), in this one layer: what the sidecar never runs goes (scp, sftp, the
# agent, the setuid ssh-keysign, tini-static, pydoc data, the test package), and so do the stdlib's
# .pyc files (12 MB): Python writes the few it needs to PYTHONPYCACHEPREFIX in the runtime tmpfs.
# No setuid/setgid bits are left (no-new-privileges makes them inert anyway).
RUN set -eux; \
    if ! grep -rqs bookworm-security /etc/apt/sources.list /etc/apt/sources.list.d/; then \
        printf 'deb http://deb.debian.org/debian bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
            > /etc/apt/sources.list.d/bookworm-updates.list; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 rsync openssh-client tini libnss-wrapper; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log; \
    rm -rf /usr/bin/scp /usr/bin/sftp /usr/bin/ssh-add /usr/bin/ssh-agent /usr/bin/ssh-copy-id \
        /usr/lib/openssh/ssh-keysign /usr/lib/openssh/ssh-pkcs11-helper /usr/lib/openssh/ssh-sk-helper \
        /usr/bin/tini-static /usr/lib/python3.11/pydoc_data /usr/lib/python3.11/test; \
    find /usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +; \
    find / -xdev -type f -perm /6000 -exec chmod a-s {} +; \
    rsync --version | head -1; ssh -V

# A fixed uid, so file ownership is predictable across hosts (the fanout runs as this uid too).
RUN set -eux; \
    groupadd --system --gid 10001 upsync; \
    useradd --system --uid 10001 --gid 10001 --home-dir /run/upsync --no-create-home \
        --shell /usr/sbin/nologin upsync; \
    # No /srv/uploads here: the volume must be populated (and owned) by its writer's image, never
    # by this one; without a mount, the sidecar says so instead of syncing an empty directory.
    mkdir -p /etc/upsync/ssh /run/upsync; \
    chmod 1777 /run/upsync

COPY --from=build /opt/upsync /opt/upsync
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh

ENV PATH=/opt/upsync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONPYCACHEPREFIX=/run/upsync/.pycache \
    SYNC_SOURCE=/srv/uploads \
    SYNC_RUNTIME_DIR=/run/upsync \
    TMPDIR=/run/upsync
# SYNC_ENV_FILE defaults to .env in the working directory: /etc/upsync/.env. TMPDIR: with a read-only
# root, the runtime tmpfs is the only writable place (`check` makes its probe file in the temp dir).
WORKDIR /etc/upsync
USER 10001:10001

# /healthz: the process, its watcher and its workers are alive (no curl needed).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["python", "-m", "sidecar", "health"]

# tini as PID 1: forwards SIGTERM/SIGINT/SIGHUP to the daemon and reaps ssh/rsync children.
ENTRYPOINT ["tini", "--", "docker-entrypoint.sh"]
CMD ["run"]

# ---- image metadata (OCI labels); version and revision come from build args (compose passes them) ----
# licenses: this project's files (MIT).
ARG UPSYNC_VERSION=0.1.0
ARG UPSYNC_REVISION=unknown
ARG UPSYNC_SOURCE_URL=https://github.com/upsync/upsync
# The daemon reports it in /metrics: upsync_build_info{version,revision}.
ENV UPSYNC_REVISION=${UPSYNC_REVISION}
LABEL org.opencontainers.image.title="upsync-sidecar" \
      org.opencontainers.image.description="upsync: replicates an uploads directory to content servers as it changes (watchfiles + rsync over one ssh link per target)" \
      org.opencontainers.image.source="${UPSYNC_SOURCE_URL}" \
      org.opencontainers.image.version="${UPSYNC_VERSION}" \
      org.opencontainers.image.revision="${UPSYNC_REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
