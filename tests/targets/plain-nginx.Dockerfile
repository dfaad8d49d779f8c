# Stand-in for "an existing nginx image" (no registry here, so not the official nginx image): the
# same shape as it — Debian, nginx serving /usr/share/nginx/html on port 80, ENTRYPOINT
# /docker-entrypoint.sh, CMD nginx -g 'daemon off;' — built from Debian's own nginx package.
#   SECURITY=yes adds bookworm-security to the sources, as the official Debian images have them
#   (rsync 3.5.0); SECURITY=no keeps the local base's bookworm main only (rsync 3.2.7).
FROM debian:bookworm-slim
ARG SECURITY=yes
RUN set -eux; \
    if [ "$SECURITY" = yes ] && ! grep -rqs bookworm-security /etc/apt/sources.list /etc/apt/sources.list.d/; then \
        echo 'deb http://deb.debian.org/debian-security bookworm-security main' > /etc/apt/sources.list.d/security.list; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends nginx; \
    rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/*; \
    mkdir -p /usr/share/nginx/html; \
    echo '<h1>plain nginx</h1>' > /usr/share/nginx/html/index.html; \
    printf '%s\n' \
        'server {' \
        '    listen 80 default_server;' \
        '    root /usr/share/nginx/html;' \
        '}' > /etc/nginx/conf.d/default.conf; \
    ln -sf /dev/stdout /var/log/nginx/access.log; \
    ln -sf /dev/stderr /var/log/nginx/error.log; \
    printf '#!/bin/sh\nexec "$@"\n' > /docker-entrypoint.sh; \
    chmod 0755 /docker-entrypoint.sh
EXPOSE 80
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/docker-entrypoint.sh"]
CMD ["nginx", "-g", "daemon off;"]
