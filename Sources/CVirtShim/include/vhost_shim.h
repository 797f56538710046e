// Unix-socket plumbing for the vhost-user front end: connect, and send/receive with file
// descriptors in SCM_RIGHTS ancillary data (the CMSG_* macros do not import into Swift).
#ifndef VHOST_SHIM_H
#define VHOST_SHIM_H
#include <stddef.h>
#include <sys/types.h>

/// Most descriptors one message carries (vhost-user: 8 memory regions).
#define VSHIM_MAX_FDS 8

/// socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC) + connect(path). Returns the fd or -errno
/// (-ENAMETOOLONG if the path does not fit sun_path).
int vshim_unix_connect(const char *path);

/// Sends all `len` bytes; `nfds` descriptors (0..VSHIM_MAX_FDS) ride on the first byte as SCM_RIGHTS.
/// Uses MSG_NOSIGNAL (a closed peer gives -EPIPE, never SIGPIPE). Returns 0 or -errno.
int vshim_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/// Receives exactly `len` bytes unless the peer closes first, waiting at most `timeout_ms` in total
/// (-1 = forever). Descriptors that arrive are stored in `fds` (up to `maxfds`, the rest are closed;
/// all are O_CLOEXEC) and counted in `*nfds`. Returns the bytes received (< len means the peer closed),
/// or -errno (-ETIMEDOUT when the time ran out).
ssize_t vshim_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int timeout_ms);

/// Waits until `sock` is hung up / half-closed by the peer (POLLRDHUP, POLLHUP, POLLERR) or `stopfd`
/// is readable. Does not wake for ordinary incoming data. Returns a bitmask (1 = hung up,
/// 2 = stop), 0 on timeout, or -errno.
int vshim_poll_hup(int sock, int stopfd, int timeout_ms);
#endif
