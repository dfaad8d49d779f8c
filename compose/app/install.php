<?php
/*
 * First-start install, non-interactive (Debian has no wp-cli): waits for the database, then installs
 * WordPress with WordPress' own functions unless it is installed already. Run as www-data by
 * app-entrypoint. Settings (with the stack's defaults, see docs/compose.md):
 *   WORDPRESS_URL, WORDPRESS_TITLE, WORDPRESS_ADMIN_USER, WORDPRESS_ADMIN_PASSWORD, WORDPRESS_ADMIN_EMAIL,
 *   WORDPRESS_DB_WAIT_S (how long to wait for the database).
 */

function install_env(string $name, string $default): string
{
    $value = getenv($name);
    return ($value === false || $value === '') ? $default : $value;
}

function say(string $message): void
{
    fwrite(STDERR, "app-install: $message\n");
}

$url = rtrim(install_env('WORDPRESS_URL', 'http://localhost:8080'), '/');
$host = parse_url($url, PHP_URL_HOST);
if (!preg_match('#^https?://#', $url) || !$host) {
    say("invalid WORDPRESS_URL=\"$url\": must be http(s)://host[:port]");
    exit(2);
}
$_SERVER['HTTP_HOST'] = $host;
$_SERVER['REQUEST_URI'] = '/';
$_SERVER['SERVER_NAME'] = $host;

// Wait for the database (bounded), so the first start does not race MariaDB's own first start.
require_once '/etc/wordpress/config-default.php';
mysqli_report(MYSQLI_REPORT_OFF);
$deadline = microtime(true) + (int) install_env('WORDPRESS_DB_WAIT_S', '120');
[$dbHost, $dbPort] = array_pad(explode(':', DB_HOST, 2), 2, '3306');
while (true) {
    $link = @mysqli_connect($dbHost, DB_USER, DB_PASSWORD, DB_NAME, (int) $dbPort);
    if ($link) {
        mysqli_close($link);
        break;
    }
    if (microtime(true) > $deadline) {
        say('database ' . DB_HOST . ' not reachable: ' . mysqli_connect_error());
        exit(1);
    }
    usleep(500000);
}

define('WP_INSTALLING', true);
require '/usr/share/wordpress/wp-load.php';
// No mail on install (pluggable; the container has no MTA).
function wp_new_blog_notification($blog_title, $blog_url, $user_id, $password)
{
}
require_once ABSPATH . 'wp-admin/includes/upgrade.php';

if (is_blog_installed()) {
    say('WordPress is installed');
    exit(0);
}

$user = install_env('WORDPRESS_ADMIN_USER', 'admin');
$password = install_env('WORDPRESS_ADMIN_PASSWORD', '');
$email = install_env('WORDPRESS_ADMIN_EMAIL', 'admin@example.com');
if ($password === '') {
    say('WORDPRESS_ADMIN_PASSWORD must be set');
    exit(2);
}
$result = wp_install(install_env('WORDPRESS_TITLE', 'upsync'), $user, $email, true, '', wp_slash($password));
if (is_wp_error($result) || empty($result['user_id'])) {
    say('install failed: ' . (is_wp_error($result) ? $result->get_error_message() : 'no user made'));
    exit(1);
}
// The password exactly as given (wp_install takes it slashed).
wp_set_password($password, $result['user_id']);
update_option('siteurl', $url);
update_option('home', $url);
// Pretty permalinks, so the REST API lives at /wp-json/ (the rewrite rules are in Apache's config).
global $wp_rewrite;
$wp_rewrite->set_permalink_structure('/%postname%/');
flush_rewrite_rules(false);
say("installed $url (admin user \"$user\")");
