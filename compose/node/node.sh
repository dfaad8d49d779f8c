#!/usr/bin/env bash
# upsync target node (under tini): sshd accepting rsync for one account, `upsync`, jailed with
# `rrsync -wo NODE_UPLOADS_DIR`, and (NODE_NGINX=true) nginx serving that copy at /wp-content/uploads/.
# If either daemon exits, the other is stopped and the container exits with a failure, so the
# restart policy (or the operator) sees it. Every setting is a NODE_* variable: docs/targets.md.
#
# Two modes, chosen by the uid the container starts as:
#   root      sshd with privilege separation, nginx workers as www-data; ports 22 and 80 by default.
#   non-root  started as the account's uid (user: "10001:10001", Kubernetes runAsNonRoot): sshd runs
#             unprivileged (it can log in only its own uid, which is the account) and nginx without
#             a `user`; ports 2222 and 8080 by default. Needs no capability at all.
# Everything written at start goes to RUN_DIR (a tmpfs there, or on /run), so the root file system
# can be read-only. Exit 2: invalid configuration, one line naming the variable; 1: a daemon failed.
set -Eeuo pipefail

RUN_DIR=/run/upsync-node
TEMPLATES=/usr/local/share/upsync-node
ACCOUNT=upsync
# nginx's loopback health listener (upsync-node-health asks it).
HEALTH_PORT=8081

log() { printf 'node: %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 2
}
# invalid NAME VALUE WHAT: the one-line message for a bad setting (the sidecar's style).
invalid() { die "invalid $1=\"$2\": must be $3"; }

if [ "$#" -gt 0 ]; then
	exec "$@"
fi

# ----- settings ----------------------------------------------------------------------------------

euid=$(id -u)
egid=$(id -g)
if [ "$euid" = 0 ]; then root=1; else root=; fi
as=$([ -n "$root" ] && echo root || echo "non-root (uid $euid)")

# The account as the image made it (build args NODE_UID/NODE_GID, 10001 by default).
IFS=: read -r _ _ baked_uid baked_gid _ _ _ < <(getent passwd "$ACCOUNT") ||
	die "the image has no $ACCOUNT account: rebuild it from compose/node/Dockerfile"

# id NAME DEFAULT CONTAINER_ID: a numeric id; as non-root it must be the container's own.
id_setting() {
	local name=$1 default=$2 own=$3 value=${!1:-}
	if [ -z "$value" ]; then
		printf '%s' "$default"
		return 0
	fi
	[[ $value =~ ^[0-9]{1,10}$ ]] && ((10#$value >= 1 && 10#$value <= 2147483647)) ||
		invalid "$name" "$value" "a number from 1 to 2147483647"
	value=$((10#$value))
	if [ -z "$root" ] && [ "$value" != "$own" ]; then
		invalid "$name" "$value" "the container's own id ($own) when the node runs as non-root, or unset"
	fi
	printf '%s' "$value"
}
if [ -n "$root" ]; then
	uid=$(id_setting NODE_UID "$baked_uid" "")
	# A chosen uid brings its own group by default (as useradd does); the image's otherwise.
	gid=$(id_setting NODE_GID "$([ -n "${NODE_UID:-}" ] && echo "$uid" || echo "$baked_gid")" "")
	# The rsync account must not share a uid with nginx's workers or a system account.
	other=$(getent passwd "$uid" | cut -d: -f1 || true)
	if [ -n "$other" ] && [ "$other" != "$ACCOUNT" ]; then
		invalid NODE_UID "$uid" "a uid that is not another account's ($uid is $other in the image)"
	fi
else
	uid=$(id_setting NODE_UID "$euid" "$euid")
	gid=$(id_setting NODE_GID "$egid" "$egid")
fi

# The lowest port an unprivileged process may bind (1024 unless the kernel was told otherwise).
unprivileged_from=1024
if [ -z "$root" ] && [ -r /proc/sys/net/ipv4/ip_unprivileged_port_start ]; then
	read -r unprivileged_from </proc/sys/net/ipv4/ip_unprivileged_port_start || unprivileged_from=1024
fi
# port NAME ROOT_DEFAULT NONROOT_DEFAULT
port_setting() {
	local name=$1 value=${!1:-}
	[ -n "$value" ] || value=$([ -n "$root" ] && echo "$2" || echo "$3")
	[[ $value =~ ^[0-9]{1,5}$ ]] && ((10#$value >= 1 && 10#$value <= 65535)) ||
		invalid "$name" "$value" "a port number from 1 to 65535"
	value=$((10#$value))
	if [ -z "$root" ] && ((value < unprivileged_from)); then
		invalid "$name" "$value" "a port from $unprivileged_from to 65535 when the node runs as non-root (uid $euid)"
	fi
	printf '%s' "$value"
}
sshd_port=$(port_setting NODE_SSHD_PORT 22 2222)

case "${NODE_NGINX:-true}" in
[Tt][Rr][Uu][Ee] | 1 | [Yy][Ee][Ss] | [Oo][Nn]) nginx=true ;;
[Ff][Aa][Ll][Ss][Ee] | 0 | [Nn][Oo] | [Oo][Ff][Ff]) nginx=false ;;
*) invalid NODE_NGINX "$NODE_NGINX" "true or false" ;;
esac

upstream=${NODE_UPSTREAM:-}
if [ "$nginx" = true ]; then
	http_port=$(port_setting NODE_HTTP_PORT 80 8080)
	[ "$http_port" != "$sshd_port" ] || invalid NODE_HTTP_PORT "$http_port" "another port than NODE_SSHD_PORT"
	[ "$http_port" != "$HEALTH_PORT" ] ||
		invalid NODE_HTTP_PORT "$http_port" "another port than $HEALTH_PORT (nginx's loopback health listener)"
	[ "$sshd_port" != "$HEALTH_PORT" ] ||
		invalid NODE_SSHD_PORT "$sshd_port" "another port than $HEALTH_PORT (nginx's loopback health listener)"
	if [ -n "$upstream" ] && ! [[ $upstream =~ ^[A-Za-z0-9._-]+(:[0-9]+)?$ ]]; then
		invalid NODE_UPSTREAM "$upstream" "host[:port]"
	fi
elif [ -n "$upstream" ]; then
	log "NODE_UPSTREAM is ignored: NODE_NGINX=false"
fi

uploads=${NODE_UPLOADS_DIR:-/srv/uploads}
while [[ $uploads == */ && $uploads != / ]]; do uploads=${uploads%/}; done
# It is written unquoted into sshd_config and nginx.conf: a plain absolute path only.
if ! [[ $uploads =~ ^(/[A-Za-z0-9._-]+)+$ ]] || [[ $uploads/ =~ /\.\.?/ ]]; then
	invalid NODE_UPLOADS_DIR "${NODE_UPLOADS_DIR:-}" "an absolute path of letters, digits and ._- (not / itself, no . or .. parts)"
fi

host_key_src=${NODE_HOST_KEY_FILE:-/etc/upsync/node/ssh_host_ed25519_key}
auth_keys_src=${NODE_AUTHORIZED_KEYS_FILE:-/etc/upsync/node/authorized_keys}
# readable NAME PATH WHAT: a file we can read (a symlink is followed: Kubernetes Secret volumes).
readable() {
	local hint="mount it: a volume, a Docker secret or a Kubernetes Secret; compose: the keys volume at /etc/upsync/node"
	[ -e "$2" ] || invalid "$1" "$2" "an existing file holding $3 ($hint)"
	[ -f "$2" ] && [ -s "$2" ] || invalid "$1" "$2" "a non-empty file holding $3"
	# Read, not `test -r`: root without CAP_DAC_OVERRIDE passes the test yet cannot read another uid's 0600 file.
	head -c 1 "$2" >/dev/null 2>&1 ||
		invalid "$1" "$2" "readable by uid $euid (give the file a mode or group that lets it read: 0444, or 0440 and its group)"
}
readable NODE_HOST_KEY_FILE "$host_key_src" "the node's ssh host private key"
readable NODE_AUTHORIZED_KEYS_FILE "$auth_keys_src" "the sidecar's public key(s)"

# ----- private runtime directory -----------------------------------------------------------------
# RUN_DIR only needs to be writable (a tmpfs of any mode: Docker gives it the image's 1777). Inside
# it, home/ is the account's home and holds the copy of authorized_keys: sshd's StrictModes checks
# every directory above that file up to the home (or up to / when it is elsewhere), each owned by
# root or the account and writable by no one else; stopping at home/ makes RUN_DIR's mode irrelevant.

mkdir -p "$RUN_DIR" 2>/dev/null || true
[ -d "$RUN_DIR" ] && [ -w "$RUN_DIR" ] ||
	die "cannot write to $RUN_DIR as uid $euid: mount a tmpfs there (docker run --tmpfs $RUN_DIR, compose tmpfs: [$RUN_DIR], a Kubernetes emptyDir)"
if [ -n "$root" ]; then
	# sshd's privilege separation directory (in the image; made again when /run is a tmpfs).
	mkdir -p /run/sshd
fi
# Private until chmod'ed; the daemons get the original umask back (it is their sessions' too: rsync
# creates files with it).
umask_daemons=$(umask)
umask 077
for dir in home:0755 sshd:0700 nginx:0755; do
	path=$RUN_DIR/${dir%%:*}
	# Made by this uid now, or left by an earlier start of this container (a root file system
	# that is not read-only): it must be this uid's, as StrictModes and sshd's key check require.
	{ mkdir -p "$path" && [ "$(stat -c %u "$path")" = "$euid" ] && chmod "${dir#*:}" "$path"; } 2>/dev/null ||
		die "cannot make $path owned by uid $euid: mount a fresh tmpfs at $RUN_DIR"
done

# put FILE MODE: stdin into FILE, whole or not at all.
put() {
	cat >"$1.tmp"
	chmod "$2" "$1.tmp"
	mv -f "$1.tmp" "$1"
}

# The account's passwd entry. The image has one (uid/gid 10001 unless built otherwise); another
# NODE_UID/NODE_GID cannot be written to a read-only /etc/passwd, so sshd alone gets a passwd and
# group file from RUN_DIR through libnss-wrapper (LD_PRELOAD). Its sessions (rrsync, rsync) start
# with sshd's clean environment and need no names. ssh-keygen needs the entry too (as non-root).
wrap=()
if [ "$uid" != "$baked_uid" ] || [ "$gid" != "$baked_gid" ]; then
	{
		grep -v "^$ACCOUNT:" /etc/passwd
		printf '%s:x:%s:%s:upsync target:%s:/bin/sh\n' "$ACCOUNT" "$uid" "$gid" "$RUN_DIR/home"
	} | put "$RUN_DIR/passwd" 0644
	{
		grep -v "^$ACCOUNT:" /etc/group
		printf '%s:x:%s:\n' "$ACCOUNT" "$gid"
	} | put "$RUN_DIR/group" 0644
	wrap=(env LD_PRELOAD=libnss_wrapper.so NSS_WRAPPER_PASSWD="$RUN_DIR/passwd" NSS_WRAPPER_GROUP="$RUN_DIR/group")
fi

# The keys: private copies with the owner and modes sshd insists on, whatever the mounted files
# have (Docker secrets are 0444, Kubernetes Secret files are symlinks into ..data/).
put "$RUN_DIR/sshd/host_key" 0600 <"$host_key_src"
"${wrap[@]}" ssh-keygen -y -P '' -f "$RUN_DIR/sshd/host_key" 2>/dev/null | put "$RUN_DIR/sshd/host_key.pub" 0644 &&
	[ -s "$RUN_DIR/sshd/host_key.pub" ] ||
	invalid NODE_HOST_KEY_FILE "$host_key_src" "an OpenSSH private key without a passphrase (make one: ssh-keygen -t ed25519 -N '' -f FILE)"
# (Its copy is world-readable: a private key named here by mistake must never get that far.)
if grep -q 'PRIVATE KEY' "$auth_keys_src"; then
	invalid NODE_AUTHORIZED_KEYS_FILE "$auth_keys_src" "an authorized_keys file of public keys, not a private key"
fi
put "$RUN_DIR/home/authorized_keys" 0644 <"$auth_keys_src"
fingerprints=$("${wrap[@]}" ssh-keygen -l -f "$RUN_DIR/home/authorized_keys" 2>/dev/null | cut -d' ' -f2 | paste -sd' ') || fingerprints=
[ -n "$fingerprints" ] ||
	invalid NODE_AUTHORIZED_KEYS_FILE "$auth_keys_src" "an authorized_keys file with at least one public key line"

# ----- the copy -----------------------------------------------------------------------------------

# (Made with the daemons' umask: nginx's workers must be able to walk through any parent it makes.)
if [ ! -d "$uploads" ] && ! (umask "$umask_daemons" && mkdir -p "$uploads") 2>/dev/null; then
	invalid NODE_UPLOADS_DIR "$uploads" "a directory (mount a volume there; the root file system is read-only)"
fi
if [ -n "$root" ]; then
	# The copy belongs to the account, whichever container first mounted the volume (mode first:
	# without CAP_FOWNER root can change it only while it owns the directory).
	if [ "$(stat -c %u:%g "$uploads")" != "$uid:$gid" ]; then
		chmod 0755 "$uploads" 2>/dev/null || true
		chown "$uid:$gid" "$uploads" ||
			invalid NODE_UPLOADS_DIR "$uploads" "a directory the node can give to uid $uid (it needs CAP_CHOWN)"
	fi
elif ! [ -w "$uploads" ] || ! [ -x "$uploads" ]; then
	invalid NODE_UPLOADS_DIR "$uploads" "writable by uid $euid: as non-root the node cannot chown it (mount a volume that uid owns, e.g. Kubernetes fsGroup)"
fi

# ----- configuration files ------------------------------------------------------------------------

render() {
	sed -e "s|@RUN_DIR@|$RUN_DIR|g" -e "s|@UPLOADS_DIR@|$uploads|g" -e "s|@SSHD_PORT@|$sshd_port|g" \
		-e "s|@HTTP_PORT@|${http_port:-}|g" -e "s|@NGINX_USER@|$nginx_user|g" "$TEMPLATES/$1"
}
nginx_user=
render sshd_config.in | put "$RUN_DIR/sshd/sshd_config" 0600
"${wrap[@]}" /usr/sbin/sshd -t -f "$RUN_DIR/sshd/sshd_config" || {
	log "sshd refuses its configuration (see above)"
	exit 1
}

if [ "$nginx" = true ]; then
	if [ -n "$root" ]; then
		nginx_user="user www-data;"
	else
		nginx_user="# non-root: master and workers run as uid $euid (no \`user\` directive)"
	fi
	render nginx.conf.in | put "$RUN_DIR/nginx/nginx.conf" 0644
	if [ -n "$upstream" ]; then
		# nginx resolves the upstream per request (it may restart elsewhere), with the container's
		# own DNS server: Docker's 127.0.0.11, a Kubernetes cluster's, the host's.
		resolver=$(awk '$1 == "nameserver" && $2 ~ /^[0-9A-Fa-f.:]+$/ { print $2; exit }' /etc/resolv.conf 2>/dev/null || true)
		[[ $resolver != *:* ]] || resolver="[$resolver]"
		{
			if [ -n "$resolver" ]; then
				printf 'resolver %s valid=10s ipv6=off;\nresolver_timeout 5s;\n' "$resolver"
			else
				log "no nameserver in /etc/resolv.conf: NODE_UPSTREAM must then be an address"
			fi
			cat <<CONF
set \$upstream $upstream;
proxy_pass http://\$upstream;
proxy_set_header Host \$http_host;
proxy_set_header X-Real-IP \$remote_addr;
proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
proxy_set_header X-Forwarded-Proto \$scheme;
proxy_connect_timeout 5s;
proxy_read_timeout 120s;
CONF
		} | put "$RUN_DIR/nginx/upstream.conf" 0644
	else
		echo 'return 404;' | put "$RUN_DIR/nginx/upstream.conf" 0644
	fi
	nginx -t -q -e stderr -c "$RUN_DIR/nginx/nginx.conf" || {
		log "nginx refuses its configuration (see above)"
		exit 1
	}
fi
# What upsync-node-health checks.
echo "$sshd_port $nginx" | put "$RUN_DIR/health" 0644

# ----- run ----------------------------------------------------------------------------------------

host_pub=$(cut -d' ' -f1,2 "$RUN_DIR/sshd/host_key.pub")
host_fp=$("${wrap[@]}" ssh-keygen -l -f "$RUN_DIR/sshd/host_key.pub" | cut -d' ' -f2)
pin=$([ "$sshd_port" = 22 ] && echo "HOST $host_pub" || echo "[HOST]:$sshd_port $host_pub")
log "host key $host_fp; the sidecar's known_hosts line: $pin"
log "authorized keys: $fingerprints"

umask "$umask_daemons"
"${wrap[@]}" /usr/sbin/sshd -D -e -f "$RUN_DIR/sshd/sshd_config" &
pids=($!)
started="sshd (pid $!, port $sshd_port)"
if [ "$nginx" = true ]; then
	nginx -e stderr -c "$RUN_DIR/nginx/nginx.conf" -g 'daemon off;' &
	pids+=($!)
	started+=" and nginx (pid $!, port $http_port, upstream: ${upstream:-none})"
fi
log "$started started as $as; rrsync -wo $uploads as $ACCOUNT ($uid:$gid)"

stopping=
stop() {
	stopping=1
	kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap stop TERM INT

# First child to exit (or a signal) ends the wait.
status=0
wait -n "${pids[@]}" || status=$?
if [ -z "$stopping" ]; then
	log "a daemon exited (status $status); stopping the node"
	stop
	wait || true
	exit $((status == 0 ? 1 : status))
fi
wait || true
log "stopped"
