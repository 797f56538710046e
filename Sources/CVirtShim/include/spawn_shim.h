// Starting a helper process that must not outlive virtnbd (the qemu-storage-daemon of an rbd:
// export): posix_spawn cannot ask for PR_SET_PDEATHSIG, so this forks and execs by hand.
#ifndef SPAWN_SHIM_H
#define SPAWN_SHIM_H
#include <sys/types.h>

/// Forks; the child resets the signal mask and the dispositions of SIGINT, SIGTERM, SIGHUP,
/// SIGPIPE and SIGQUIT, asks for SIGTERM when the calling *thread* exits (PR_SET_PDEATHSIG; a
/// SIGKILL of virtnbd ends the thread too), puts stdin on /dev/null and stdout and stderr on
/// `logfd` (when >= 0), and execv()s `path` with `argv` (NULL-terminated). The child uses only
/// async-signal-safe calls. Returns the child's pid, or -errno if the fork failed. A failed exec
/// ends the child with status 127.
pid_t vshim_spawn_tied(const char *path, char *const argv[], int logfd);
#endif
