#define _GNU_SOURCE
#include "cvirtshim.h"
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <poll.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <sys/prctl.h>
#include <signal.h>
#include <string.h>

int vshim_memfd_create(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

int vshim_eventfd(int nonblock) { return eventfd(0, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0)); }

int vshim_eventfd_signal(int fd) {
    uint64_t one = 1;
    for (;;) {
        ssize_t n = write(fd, &one, sizeof one);
        if (n == sizeof one) return 0;
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : -EIO;
    }
}

uint64_t vshim_eventfd_drain(int fd) {
    uint64_t v = 0;
    for (;;) {
        ssize_t n = read(fd, &v, sizeof v);
        if (n == sizeof v) return v;
        if (n < 0 && errno == EINTR) continue;
        return 0;
    }
}

int vshim_wait_readable(int fd, int timeout_ms) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -errno;
        return r > 0 ? 1 : 0;
    }
}

int vshim_wait_either(int a, int b, int timeout_ms) {
    struct pollfd p[2] = { { .fd = a, .events = POLLIN }, { .fd = b, .events = POLLIN } };
    for (;;) {
        int r = poll(p, 2, timeout_ms);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -errno;
        return (p[0].revents ? 1 : 0) | (p[1].revents ? 2 : 0);
    }
}

int vshim_punch_hole(int fd, int64_t off, int64_t len) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) == 0 ? 0 : -errno;
}

int vshim_zero_range(int fd, int64_t off, int64_t len) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len) == 0 ? 0 : -errno;
}

int vshim_pwrite_zeroes(int fd, int64_t off, int64_t len) {
    static const char zeros[65536];
    while (len > 0) {
        size_t n = len < (int64_t)sizeof zeros ? (size_t)len : sizeof zeros;
        ssize_t w = pwrite(fd, zeros, n, off);
        if (w < 0) { if (errno == EINTR) continue; return -errno; }
        off += w; len -= w;
    }
    return 0;
}

static _Thread_local int vshim_lane;
int vshim_lane_get(void) { return vshim_lane; }
void vshim_lane_set(int lane) { vshim_lane = lane; }
int vshim_set_parent_death_signal(int sig) {
    return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0UL, 0UL, 0UL) == 0 ? 0 : -errno;
}

static int vshim_sigpipe_fds[2] = {-1, -1};

static void vshim_signal_to_pipe(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t r = write(vshim_sigpipe_fds[1], &b, 1);  /* async-signal-safe; a full pipe drops it */
    (void)r;
    errno = saved;
}

int vshim_signal_pipe(int sig) {
    if (vshim_sigpipe_fds[0] < 0 && pipe2(vshim_sigpipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) return -errno;
    /* The read end blocks (a thread waits on it); the write end never blocks a handler. */
    int fl = fcntl(vshim_sigpipe_fds[0], F_GETFL);
    if (fl >= 0) fcntl(vshim_sigpipe_fds[0], F_SETFL, fl & ~O_NONBLOCK);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = vshim_signal_to_pipe;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(sig, &sa, NULL) != 0) return -errno;
    return vshim_sigpipe_fds[0];
}

int vshim_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0) == 0 ? 0 : -errno;
}
