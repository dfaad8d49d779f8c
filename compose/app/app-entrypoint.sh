#!/usr/bin/env bash
# WordPress app: install on first start (as www-data), then Apache in the foreground.
set -Eeuo pipefail

uploads=/var/lib/wordpress/wp-content/uploads
if [ "$#" -eq 0 ]; then
	# WordPress writes the uploads as www-data, whichever container first mounted the volume.
	chown www-data:www-data "$uploads"
	setpriv --reuid=www-data --regid=www-data --init-groups php /usr/local/lib/upsync/install.php
	# Debian's envvars reads variables it may not have: not under set -u.
	set +u
	# shellcheck disable=SC1091
	. /etc/apache2/envvars
	set -u
	mkdir -p "$APACHE_RUN_DIR" "$APACHE_LOCK_DIR" "$APACHE_LOG_DIR"
	rm -f "$APACHE_PID_FILE"
	exec apache2 -DFOREGROUND
fi
exec "$@"
