/* upsync-landlock FD PROGRAM [ARG...]: confine this process with the Landlock ruleset FD, close FD, exec
 * PROGRAM. The sidecar builds the ruleset once (sidecar/sandbox.py) and starts each rsync sender through
 * this helper, so Python can start it with vfork: a preexec_fn forces a full fork of the multi-threaded
 * daemon, which cost ~11 ms of CPU per rsync (copy-on-write faults in parent and child), ~35 % of the
 * sending CPU with 16 targets. Same confinement either way: the restriction is applied before PROGRAM runs.
 * Exit 126: the restriction failed (nothing is run); 127: PROGRAM could not be run. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_landlock_restrict_self
#define SYS_landlock_restrict_self 446 /* the same on every architecture (the generic table) */
#endif

int main(int argc, char **argv) {
    char *end = NULL;
    long fd;

    if (argc < 3) {
        fprintf(stderr, "usage: upsync-landlock FD PROGRAM [ARG...]\n");
        return 126;
    }
    errno = 0;
    fd = strtol(argv[1], &end, 10);
    if (errno != 0 || end == argv[1] || *end != '\0' || fd < 0 || fd > 1048576) {
        fprintf(stderr, "upsync-landlock: not a file descriptor: %s\n", argv[1]);
        return 126;
    }
    /* Landlock requires no_new_privs (or CAP_SYS_ADMIN); the sender has no use for setuid anyway. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        fprintf(stderr, "upsync-landlock: prctl(PR_SET_NO_NEW_PRIVS): %s\n", strerror(errno));
        return 126;
    }
    if (syscall(SYS_landlock_restrict_self, (int)fd, 0) != 0) {
        fprintf(stderr, "upsync-landlock: landlock_restrict_self: %s\n", strerror(errno));
        return 126;
    }
    close((int)fd);
    execvp(argv[2], argv + 2);
    fprintf(stderr, "upsync-landlock: cannot run %s: %s\n", argv[2], strerror(errno));
    return 127;
}
