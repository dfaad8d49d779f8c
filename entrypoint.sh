#!/usr/bin/env bash
# upsync image entrypoint, after docker-library's conventions (postgres' docker-entrypoint.sh):
#   docker run IMAGE                      -> python -m sidecar run
#   docker run IMAGE once|check|config|health|keys|--flag ...  -> python -m sidecar ...
#   docker run IMAGE bash                 -> bash, with no setup at all
# Setup, only when the sidecar itself runs:
#   * SYNC_SSH_KEY / SYNC_SSH_KNOWN_HOSTS / SYNC_WEBHOOK_SECRET (inline text) are written to private 0600
#     files in the runtime tmpfs and SYNC_SSH_KEY_FILE / SYNC_SSH_KNOWN_HOSTS_FILE /
#     SYNC_WEBHOOK_SECRET_FILE point at them;
#   * a uid without a passwd entry (docker run --user 4242) gets one through libnss-wrapper,
#     because OpenSSH's client refuses to run without it ("No user exists for uid 4242").
set -Eeuo pipefail

# Exit 2 = invalid configuration, the daemon's own code; one line, the daemon's own format.
die() {
	printf 'upsync: %s\n' "$*" >&2
	exit 2
}
note() { printf 'upsync-entrypoint: %s\n' "$*" >&2; }

# Is "$@" the sidecar (and not, say, bash)?
is_sidecar() {
	case "${1:-}" in
	upsync) return 0 ;;
	python | python3 | */python | */python3) [ "${2:-}" = -m ] && [ "${3:-}" = sidecar ] ;;
	*) return 1 ;;
	esac
}

runtime_dir() { printf '%s' "${SYNC_RUNTIME_DIR:-/run/upsync}"; }

# A fresh private (0700) directory in the runtime tmpfs, made on first use (sets $private_dir).
private_dir=
make_private_dir() {
	[ -z "$private_dir" ] || return 0
	local base
	base=$(runtime_dir)
	[ -d "$base" ] && [ -w "$base" ] || return 1
	private_dir=$(umask 077 && mktemp -d "$base/entrypoint.XXXXXX")
}

# file_env VAR NAME: VAR's text -> a private 0600 file NAME, exported as VAR_FILE; VAR is unset so
# the text reaches neither the daemon's environment nor ssh's or rsync's.
file_env() {
	local var=$1 name=$2
	local file_var="${var}_FILE"
	local text="${!var:-}" file="${!file_var:-}"
	if [ -z "$text" ]; then
		unset "$var"
		return 0
	fi
	if [ -n "$file" ]; then
		# Never echo the secret itself, only the file setting.
		die "invalid $file_var=\"$file\": must be unset when $var is given (give the text or a file, not both)"
	fi
	make_private_dir || die "invalid SYNC_RUNTIME_DIR=\"$(runtime_dir)\": must be a writable directory to hold $var (mount a tmpfs there)"
	local dir=$private_dir
	# Text pasted with literal \n (a one-line .env value) becomes real lines.
	if [[ $text != *$'\n'* && $text == *'\n'* ]]; then
		text=${text//\\n/$'\n'}
	fi
	# Exactly one trailing newline: ssh rejects a key file without it.
	while [[ $text == *$'\n' ]]; do text=${text%$'\n'}; done
	(umask 077 && printf '%s\n' "$text" >"$dir/$name")
	export "$file_var=$dir/$name"
	unset "$var"
}

# OpenSSH's client needs a passwd entry for its uid; give an arbitrary --user one via nss_wrapper.
passwd_entry() {
	local uid gid dir
	uid=$(id -u)
	gid=$(id -g)
	if getent passwd "$uid" >/dev/null 2>&1; then
		return 0
	fi
	if ! make_private_dir; then
		note "uid $uid has no passwd entry and $(runtime_dir) is not writable: ssh will refuse to run (mount a tmpfs at SYNC_RUNTIME_DIR)"
		return 0
	fi
	dir=$private_dir
	{
		cat /etc/passwd
		printf 'upsync-%s:x:%s:%s:upsync sidecar:%s:/usr/sbin/nologin\n' "$uid" "$uid" "$gid" "$dir"
	} >"$dir/passwd"
	cat /etc/group >"$dir/group"
	if ! getent group "$gid" >/dev/null 2>&1; then
		printf 'upsync-%s:x:%s:\n' "$gid" "$gid" >>"$dir/group"
	fi
	export NSS_WRAPPER_PASSWD="$dir/passwd" NSS_WRAPPER_GROUP="$dir/group"
	export LD_PRELOAD="${LD_PRELOAD:+$LD_PRELOAD }libnss_wrapper.so"
	export HOME="$dir"
}

main() {
	# A sidecar command or a flag first: run the sidecar with it.
	if [ "$#" -eq 0 ]; then
		set -- run
	fi
	case "$1" in
	run | once | check | config | health | keys | -*) set -- python -m sidecar "$@" ;;
	esac

	if is_sidecar "$@"; then
		# The image points TMPDIR and the .pyc cache at /run/upsync; they follow a moved runtime dir.
		local rt
		rt=$(runtime_dir)
		if [ "$rt" != /run/upsync ]; then
			[ "${TMPDIR:-}" != /run/upsync ] || export TMPDIR="$rt"
			[ "${PYTHONPYCACHEPREFIX:-}" != /run/upsync/.pycache ] || export PYTHONPYCACHEPREFIX="$rt/.pycache"
		fi
		file_env SYNC_SSH_KEY id_key
		file_env SYNC_SSH_KNOWN_HOSTS known_hosts
		file_env SYNC_WEBHOOK_SECRET webhook_secret
		passwd_entry
	fi
	exec "$@"
}

main "$@"
