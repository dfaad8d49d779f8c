#!/usr/bin/env bash
# Makes a local debian:<suite>-slim base image with debootstrap (no registry can be reached here), the
# way ../shared/docker-env.sh makes debian:bookworm-slim: minbase, trimmed like the official -slim image,
# the machine's CA certificates added. Unlike that one, the image lists <suite>-updates and
# <suite>-security, as the official image does, so a target built on it gets the suite's current rsync.
# Idempotent: an existing image is kept (about 45 s to build here, once). Needs root and debootstrap.
# Usage: bash tests/compat/base-image.sh trixie      (prints the image name on stdout)
set -Eeuo pipefail
log() { printf '[base-image] %s\n' "$*" >&2; }
suite=${1:?usage: base-image.sh SUITE (e.g. trixie)}
image="debian:${suite}-slim"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || { log "debootstrap is missing: apt-get install debootstrap (../shared/docker-env.sh installs it)"; exit 1; }
[ "$(id -u)" -eq 0 ] || { log "debootstrap needs root"; exit 1; }
root=$(mktemp -d "/var/tmp/upsync-${suite}-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
logfile="/var/tmp/upsync-debootstrap-${suite}.log"
log "building $image with debootstrap (about 45 s; log: $logfile)"
debootstrap --variant=minbase "$suite" "$root" http://deb.debian.org/debian >"$logfile" 2>&1 \
  || { tail -20 "$logfile" >&2; exit 1; }
cat > "$root/etc/apt/sources.list" <<LIST
deb http://deb.debian.org/debian ${suite} main
deb http://deb.debian.org/debian ${suite}-updates main
deb http://deb.debian.org/debian-security ${suite}-security main
LIST
cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
       "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
mkdir -p "$root/usr/local/share/ca-certificates" "$root/etc/ssl/certs"
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
cat /etc/ssl/certs/ca-certificates.crt > "$root/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || true
tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$image" >/dev/null
log "built $image ($(docker image inspect "$image" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$image"
