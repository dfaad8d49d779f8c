#!/usr/bin/env bash
# Makes every key the stack needs, once, into one volume per consumer (each service mounts only its
# own, so no service can even see another's private key):
#   /keys/sidecar  id_ed25519(.pub), known_hosts "content ..."   owner SIDECAR_UID, dir 0700
#   /keys/fanout   id_ed25519(.pub), known_hosts "web ..."       owner FANOUT_UID, dir 0700
#   /keys/content  ssh_host_ed25519_key(.pub), authorized_keys (the sidecar's key, rrsync -wo)
#   /keys/web      ssh_host_ed25519_key(.pub), authorized_keys (the fanout's key, rrsync -wo);
#                  one host key shared by every web replica, pinned once under the name "web"
# Idempotent: existing keys are kept; the derived files (known_hosts, authorized_keys) are rewritten
# from them on every run, so a change of uid or directory applies at the next `up`.
# Rotate a key: delete its file (or its volume) and run `docker compose up` again.
set -Eeuo pipefail

log() { printf 'keys: %s\n' "$*" >&2; }

: "${SIDECAR_UID:=33}" "${SIDECAR_GID:=$SIDECAR_UID}"
: "${FANOUT_UID:=10001}" "${FANOUT_GID:=$FANOUT_UID}"
: "${CONTENT_HOST:=content}" "${WEB_HOST:=web}"
: "${RRSYNC_DIR:=/srv/uploads}"
for v in SIDECAR_UID SIDECAR_GID FANOUT_UID FANOUT_GID; do
	[[ ${!v} =~ ^[0-9]+$ ]] || { log "invalid $v=\"${!v}\": must be a numeric id"; exit 2; }
done
[[ $RRSYNC_DIR =~ ^/[A-Za-z0-9._/-]*$ ]] || { log "invalid RRSYNC_DIR=\"$RRSYNC_DIR\": must be an absolute path of [A-Za-z0-9._/-]"; exit 2; }

umask 077
root=/keys
for dir in sidecar fanout content web; do
	[ -d "$root/$dir" ] || { log "$root/$dir is not mounted"; exit 1; }
done

# keypair FILE COMMENT: a new ed25519 key unless FILE already holds one.
keypair() {
	if [ -s "$1" ] && [ -s "$1.pub" ]; then
		return 0
	fi
	rm -f "$1" "$1.pub"
	ssh-keygen -q -t ed25519 -N '' -C "$2" -f "$1"
	log "made $1 ($(ssh-keygen -l -f "$1.pub" | cut -d' ' -f2))"
}

# write FILE: stdin into FILE atomically (a reader never sees half a file).
write() {
	cat >"$1.tmp"
	mv -f "$1.tmp" "$1"
}

pubkey() { cut -d' ' -f1,2 "$1"; }

keypair "$root/sidecar/id_ed25519" "upsync-sidecar"
keypair "$root/fanout/id_ed25519" "upsync-fanout"
keypair "$root/content/ssh_host_ed25519_key" "$CONTENT_HOST"
keypair "$root/web/ssh_host_ed25519_key" "$WEB_HOST"

# Clients pin the host key by name; the fanout's dns+ssh:// target checks every replica as "web".
echo "$CONTENT_HOST $(pubkey "$root/content/ssh_host_ed25519_key.pub")" | write "$root/sidecar/known_hosts"
echo "$WEB_HOST $(pubkey "$root/web/ssh_host_ed25519_key.pub")" | write "$root/fanout/known_hosts"

# Each key may only run rrsync write-only in the uploads directory: no shell, no pty, no forwarding.
forced="command=\"/usr/bin/rrsync -wo $RRSYNC_DIR\",restrict"
echo "$forced $(pubkey "$root/sidecar/id_ed25519.pub") upsync-sidecar" | write "$root/content/authorized_keys"
echo "$forced $(pubkey "$root/fanout/id_ed25519.pub") upsync-fanout" | write "$root/web/authorized_keys"

# Ownership and modes. Client keys: their user's, 0600, in a 0700 directory of their own.
chown -R "$SIDECAR_UID:$SIDECAR_GID" "$root/sidecar"
chown -R "$FANOUT_UID:$FANOUT_GID" "$root/fanout"
chmod 0700 "$root/sidecar" "$root/fanout"
chmod 0600 "$root/sidecar/id_ed25519" "$root/fanout/id_ed25519"
chmod 0644 "$root/sidecar/id_ed25519.pub" "$root/sidecar/known_hosts" "$root/fanout/id_ed25519.pub" "$root/fanout/known_hosts"
# Server side: sshd (root) reads the host key; authorized_keys is read as the login user and must
# not be writable by it (StrictModes).
for node in content web; do
	chown -R 0:0 "$root/$node"
	chmod 0755 "$root/$node"
	chmod 0600 "$root/$node/ssh_host_ed25519_key"
	chmod 0644 "$root/$node/ssh_host_ed25519_key.pub" "$root/$node/authorized_keys"
done
log "ready: sidecar -> $CONTENT_HOST, fanout -> $WEB_HOST (rrsync -wo $RRSYNC_DIR)"
