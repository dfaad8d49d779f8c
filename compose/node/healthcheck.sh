#!/usr/bin/env bash
# Healthy: sshd is listening on its port (read from /proc, so the check itself leaves no half-open
# ssh connections in the log) and, unless NODE_NGINX=false, nginx answers on its loopback health
# listener. The ports and the nginx flag are the ones upsync-node started with.
set -Eeuo pipefail

read -r sshd_port nginx </run/upsync-node/health 2>/dev/null || {
	echo "node: not started yet (no /run/upsync-node/health)" >&2
	exit 1
}
if [ "$nginx" = true ]; then
	exec 3<>/dev/tcp/127.0.0.1/8081
	printf 'GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
	read -r -t 3 status <&3
	exec 3>&-
	[[ $status == *" 200 "* ]] || {
		echo "nginx: ${status:-no answer}" >&2
		exit 1
	}
fi
# local_address :PORT in hex, state 0A = LISTEN
hex=$(printf '%04X' "$sshd_port")
grep -qE "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:0000 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null || {
	echo "sshd: not listening on port $sshd_port" >&2
	exit 1
}
