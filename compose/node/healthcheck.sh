#!/usr/bin/env bash
# Healthy: nginx answers on its loopback health listener and sshd is listening on port 22
# (read from /proc, so the check itself leaves no half-open ssh connections in the log).
set -Eeuo pipefail

exec 3<>/dev/tcp/127.0.0.1/8081
printf 'GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 3 status <&3
exec 3>&-
[[ $status == *" 200 "* ]] || {
	echo "nginx: ${status:-no answer}" >&2
	exit 1
}
# 0016 = port 22, state 0A = LISTEN
grep -qE '^ *[0-9]+: [0-9A-F]+:0016 [0-9A-F]+:0000 0A ' /proc/net/tcp /proc/net/tcp6 2>/dev/null || {
	echo "sshd: not listening on port 22" >&2
	exit 1
}
