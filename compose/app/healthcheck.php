<?php
// Healthy when WordPress answers its login page through Apache: PHP, the database and the install.
$context = stream_context_create(['http' => ['timeout' => 4, 'ignore_errors' => true, 'follow_location' => 0]]);
$body = @file_get_contents('http://127.0.0.1/wp-login.php', false, $context);
$status = isset($http_response_header[0]) ? $http_response_header[0] : 'no answer';
if ($body === false || strpos($status, ' 200 ') === false) {
    fwrite(STDERR, "wp-login.php: $status\n");
    exit(1);
}
exit(0);
