#!/usr/bin/env bash
# Content node supervisor (under tini): runs sshd and nginx; if either exits, the other is stopped
# and the container exits with a failure, so Docker's restart policy (or the operator) sees it.
#   NODE_UPSTREAM   host:port to proxy non-upload requests to (e.g. app:80); empty: they get 404.
set -Eeuo pipefail

log() { printf 'node: %s\n' "$*" >&2; }

if [ "$#" -gt 0 ]; then
	exec "$@"
fi

upstream=${NODE_UPSTREAM:-}
if [ -n "$upstream" ] && ! [[ $upstream =~ ^[A-Za-z0-9._-]+(:[0-9]+)?$ ]]; then
	log "invalid NODE_UPSTREAM=\"$upstream\": must be host[:port]"
	exit 2
fi
for f in /etc/upsync/node/ssh_host_ed25519_key /etc/upsync/node/authorized_keys; do
	[ -s "$f" ] || {
		log "$f is missing: mount the keys volume made by the keys service at /etc/upsync/node"
		exit 2
	}
done

install -d -m 0755 /run/sshd /run/nginx
# The copy belongs to the rsync account, whichever container first mounted the volume (mode first:
# the node runs without CAP_FOWNER, so root can change it only while it owns the directory).
if [ "$(stat -c %u /srv/uploads)" != 10001 ]; then
	chmod 0755 /srv/uploads
	chown upsync:upsync /srv/uploads
fi
if [ -n "$upstream" ]; then
	cat >/run/nginx/upstream.conf <<CONF
set \$upstream $upstream;
proxy_pass http://\$upstream;
proxy_set_header Host \$http_host;
proxy_set_header X-Real-IP \$remote_addr;
proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
proxy_set_header X-Forwarded-Proto \$scheme;
proxy_connect_timeout 5s;
proxy_read_timeout 120s;
CONF
else
	echo 'return 404;' >/run/nginx/upstream.conf
fi
nginx -t -q -e stderr

/usr/sbin/sshd -D -e -f /etc/ssh/sshd_config &
sshd=$!
nginx -e stderr -g 'daemon off;' &
nginx=$!
log "sshd (pid $sshd) and nginx (pid $nginx) started; upstream: ${upstream:-none}"

stopping=
stop() {
	stopping=1
	kill -TERM "$sshd" "$nginx" 2>/dev/null || true
}
trap stop TERM INT

# First child to exit (or a signal) ends the wait.
status=0
wait -n "$sshd" "$nginx" || status=$?
if [ -z "$stopping" ]; then
	log "a daemon exited (status $status); stopping the node"
	stop
	wait || true
	exit $((status == 0 ? 1 : status))
fi
wait || true
log "stopped"
