// The C shim: the Linux calls Swift's Glibc module does not import, and fixed-width
// volatile accesses with explicit fences for shared ring memory and device registers.
#ifndef CVIRTSHIM_H
#define CVIRTSHIM_H
#include <stdint.h>
#include <stddef.h>

/// memfd_create(name, MFD_CLOEXEC). Returns fd or -1 with errno set.
int vshim_memfd_create(const char *name);
/// eventfd(0, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0)).
int vshim_eventfd(int nonblock);
/// Adds 1 to an eventfd counter. Returns 0 or -errno.
int vshim_eventfd_signal(int fd);
/// Reads and clears an eventfd counter (0 if nothing pending on a non-blocking fd).
uint64_t vshim_eventfd_drain(int fd);
/// Waits until fd is readable or timeout_ms passes (-1 = forever). Returns 1 readable, 0 timeout, -errno.
int vshim_wait_readable(int fd, int timeout_ms);
/// Waits on two fds; returns bitmask (1 = a readable, 2 = b readable), 0 on timeout, -errno.
int vshim_wait_either(int a, int b, int timeout_ms);

static inline uint16_t vshim_load16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline uint32_t vshim_load32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED); }
static inline uint64_t vshim_load64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED); }
static inline uint16_t vshim_load16_acquire(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static inline void vshim_store16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static inline void vshim_store32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED); }
static inline void vshim_store64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED); }
static inline void vshim_store16_release(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
static inline void vshim_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline void vshim_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void vshim_fence_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/// Volatile MMIO accessors of exactly the register's width (for mapped BARs).
static inline uint8_t  vshim_mmio_read8(const volatile void *p)  { return *(const volatile uint8_t *)p; }
static inline uint16_t vshim_mmio_read16(const volatile void *p) { return *(const volatile uint16_t *)p; }
static inline uint32_t vshim_mmio_read32(const volatile void *p) { return *(const volatile uint32_t *)p; }
static inline void vshim_mmio_write8(volatile void *p, uint8_t v)   { *(volatile uint8_t *)p = v; }
static inline void vshim_mmio_write16(volatile void *p, uint16_t v) { *(volatile uint16_t *)p = v; }
static inline void vshim_mmio_write32(volatile void *p, uint32_t v) { *(volatile uint32_t *)p = v; }

/// fallocate(fd, FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE, off, len). Returns 0 or -errno.
int vshim_punch_hole(int fd, int64_t off, int64_t len);
/// fallocate(fd, FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE, off, len). Returns 0 or -errno.
int vshim_zero_range(int fd, int64_t off, int64_t len);
/// Writes `len` zero bytes at `off` with pwrite (fallback when fallocate cannot zero). Returns 0 or -errno.
int vshim_pwrite_zeroes(int fd, int64_t off, int64_t len);
/// The calling thread's I/O lane: which virtqueue its requests go to (0 until set).
int vshim_lane_get(void);
void vshim_lane_set(int lane);

/// prctl(PR_SET_PDEATHSIG, sig): the kernel sends `sig` to this process when the thread that
/// created it exits (prctl is variadic, so Swift cannot call it). Returns 0 or -errno.
int vshim_set_parent_death_signal(int sig);
/// prctl(PR_SET_NAME): the calling thread's name as top, perf and /proc show it (15 bytes kept).
/// Returns 0 or -errno.
int vshim_set_thread_name(const char *name);

/// Installs a handler for `sig` that writes the signal number (one byte) to a close-on-exec
/// pipe and returns the pipe's read end (the same pipe for every signal), or -errno. The handler
/// runs on whichever thread the kernel picks, so no signal is lost to a thread that has it
/// unblocked (libdispatch's signal sources on Linux can lose one that way). SA_RESTART is set.
int vshim_signal_pipe(int sig);
/* bufpool.c: reply buffers for READs (NIO's custom ByteBuffer allocator). Blocks of 4 KiB
 * to 64 MiB come from power-of-two classes whose freed blocks are cached, 24 MiB at most;
 * everything else is malloc. */
void *vshim_pool_alloc(size_t n);
void *vshim_pool_realloc(void *p, size_t old_size, size_t new_size);
void vshim_pool_release(void *p);

// Starting a helper process that must not outlive virtnbd (the qemu-storage-daemon of an rbd:
// export, spawn_shim.c): posix_spawn cannot ask for PR_SET_PDEATHSIG, so this forks and execs by hand.
#include <sys/types.h>
/// Forks; the child resets the signal mask and the dispositions of SIGINT, SIGTERM, SIGHUP,
/// SIGPIPE and SIGQUIT, asks for SIGTERM when the calling *thread* exits (PR_SET_PDEATHSIG; a
/// SIGKILL of virtnbd ends the thread too), puts stdin on /dev/null and stdout and stderr on
/// `logfd` (when >= 0), and execv()s `path` with `argv` (NULL-terminated). The child uses only
/// async-signal-safe calls. Returns the child's pid, or -errno if the fork failed. A failed exec
/// ends the child with status 127.
pid_t vshim_spawn_tied(const char *path, char *const argv[], int logfd);

#endif
