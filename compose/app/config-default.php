<?php
/*
 * WordPress settings for the stack, from the container's environment (compose/docker-compose.yml).
 * Debian's /usr/share/wordpress/wp-config.php loads this file for any host name.
 */

function upsync_env(string $name, string $default): string
{
    $value = getenv($name);
    return ($value === false || $value === '') ? $default : $value;
}

define('DB_NAME', upsync_env('WORDPRESS_DB_NAME', 'wordpress'));
define('DB_USER', upsync_env('WORDPRESS_DB_USER', 'wordpress'));
define('DB_PASSWORD', upsync_env('WORDPRESS_DB_PASSWORD', ''));
define('DB_HOST', upsync_env('WORDPRESS_DB_HOST', 'db'));
define('DB_CHARSET', 'utf8mb4');
define('DB_COLLATE', '');

// "local": application passwords work over plain HTTP (the stack has no TLS; put TLS in front
// and set "production" for a real site).
define('WP_ENVIRONMENT_TYPE', upsync_env('WP_ENVIRONMENT_TYPE', 'local'));

// No calls home (update checks, plugin directory): the stack needs none, and it may have no
// network but its own.
define('WP_HTTP_BLOCK_EXTERNAL', upsync_env('WORDPRESS_BLOCK_EXTERNAL_HTTP', 'true') === 'true');
// Code comes from the Debian package, not from the admin screens.
define('DISALLOW_FILE_MODS', true);
define('AUTOMATIC_UPDATER_DISABLED', true);

// Behind the content nginx: honour the scheme it saw.
if (($_SERVER['HTTP_X_FORWARDED_PROTO'] ?? '') === 'https') {
    $_SERVER['HTTPS'] = 'on';
}
// AUTH_KEY etc. are left undefined on purpose: WordPress then generates random salts once and
// keeps them in its database.
