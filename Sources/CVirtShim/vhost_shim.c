#define _GNU_SOURCE
#include "vhost_shim.h"
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

int vshim_unix_connect(const char *path) {
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof sa.sun_path) return -ENAMETOOLONG;
    memcpy(sa.sun_path, path, n);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    for (;;) {
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) return fd;
        if (errno == EINTR) continue;
        int e = errno;
        close(fd);
        return -e;
    }
}

int vshim_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > VSHIM_MAX_FDS || (nfds > 0 && len == 0)) return -EINVAL;
    size_t done = 0;
    while (done < len) {
        struct iovec iov = { (char *)buf + done, len - done };
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        union { char b[CMSG_SPACE(sizeof(int) * VSHIM_MAX_FDS)]; struct cmsghdr align; } u;
        if (done == 0 && nfds > 0) {
            memset(&u, 0, sizeof u);
            m.msg_control = u.b;
            m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
            struct cmsghdr *c = CMSG_FIRSTHDR(&m);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
            memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
        }
        ssize_t n = sendmsg(sock, &m, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        done += (size_t)n;
    }
    return 0;
}

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

ssize_t vshim_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int timeout_ms) {
    if (nfds) *nfds = 0;
    long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    size_t done = 0;
    while (done < len) {
        int wait = -1;
        if (deadline >= 0) {
            long long left = deadline - now_ms();
            if (left <= 0) return -ETIMEDOUT;
            wait = left > 0x7fffffff ? 0x7fffffff : (int)left;
        }
        struct pollfd p = { sock, POLLIN, 0 };
        int r = poll(&p, 1, wait);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) return -ETIMEDOUT;
        struct iovec iov = { (char *)buf + done, len - done };
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        union { char b[CMSG_SPACE(sizeof(int) * VSHIM_MAX_FDS)]; struct cmsghdr align; } u;
        memset(&u, 0, sizeof u);
        m.msg_control = u.b;
        m.msg_controllen = sizeof u.b;
        ssize_t n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            return -errno;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int *in = (int *)CMSG_DATA(c);
            for (int i = 0; i < count; i++) {
                if (fds && nfds && *nfds < maxfds) fds[(*nfds)++] = in[i];
                else close(in[i]);
            }
        }
        if (n == 0) return (ssize_t)done;
        done += (size_t)n;
    }
    return (ssize_t)done;
}

int vshim_poll_hup(int sock, int stopfd, int timeout_ms) {
    struct pollfd p[2] = { { sock, POLLRDHUP, 0 }, { stopfd, POLLIN, 0 } };
    for (;;) {
        int r = poll(p, 2, timeout_ms);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) return 0;
        int m = 0;
        if (p[0].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) m |= 1;
        if (p[1].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) m |= 2;
        if (m) return m;
    }
}
