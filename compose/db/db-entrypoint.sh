#!/usr/bin/env bash
# MariaDB for the stack: initialises the data directory on first start, then (every start) makes
# sure the application database and user exist with the configured password, and runs the server.
#   MARIADB_DATABASE (wordpress), MARIADB_USER (wordpress), MARIADB_PASSWORD (required)
set -Eeuo pipefail

log() { printf 'db: %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 2
}

: "${MARIADB_DATABASE:=wordpress}" "${MARIADB_USER:=wordpress}"
[ -n "${MARIADB_PASSWORD:-}" ] || die "MARIADB_PASSWORD must be set"
[[ $MARIADB_DATABASE =~ ^[A-Za-z0-9_]+$ ]] || die "invalid MARIADB_DATABASE=\"$MARIADB_DATABASE\": must be [A-Za-z0-9_]+"
[[ $MARIADB_USER =~ ^[A-Za-z0-9_]+$ ]] || die "invalid MARIADB_USER=\"$MARIADB_USER\": must be [A-Za-z0-9_]+"

datadir=/var/lib/mysql
install -d -o mysql -g mysql -m 0755 /run/mysqld
if [ ! -d "$datadir/mysql" ]; then
	log "initialising $datadir"
	chown mysql:mysql "$datadir"
	# root may log in only through the unix socket as the system root (the healthcheck does).
	mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db \
		--auth-root-authentication-method=socket >/dev/null
fi

# SQL string literal: backslashes and quotes escaped.
quote() {
	local s=${1//\\/\\\\}
	printf "'%s'" "${s//\'/\\\'}"
}
password=$(quote "$MARIADB_PASSWORD")
# Run by the server itself at every start, before it accepts connections; idempotent.
init=/run/mysqld/init.sql
(
	umask 077
	cat >"$init" <<SQL
CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER IF NOT EXISTS '$MARIADB_USER'@'%' IDENTIFIED BY $password;
ALTER USER '$MARIADB_USER'@'%' IDENTIFIED BY $password;
GRANT ALL PRIVILEGES ON \`$MARIADB_DATABASE\`.* TO '$MARIADB_USER'@'%';
SQL
)
chown mysql:mysql "$init"
unset MARIADB_PASSWORD password

exec mariadbd --user=mysql --datadir="$datadir" --init-file="$init" "$@"
