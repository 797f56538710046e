// Reply buffers for READs: a size-class cache behind NIO's custom ByteBuffer allocator.
//
// A 1 MiB READ reply is allocated on an event loop and freed there once written. With malloc,
// each one is fresh address space or fragmented heap: the pages fault in again on every request
// (about 50 faults per MiB measured) and freed memory stays in glibc's arenas. A 4 KiB reply is
// cheap to malloc but not to free: the freed chunk merges with the heap's top, and glibc then
// consolidates its fast bins (malloc_consolidate), about 900 instructions per free measured by
// callgrind on 4k randread. Here blocks of 4 KiB and more come from power-of-two classes whose
// freed blocks are kept, up to a cap, and handed out again already faulted in; smaller requests
// go to malloc. Every block carries a 16-byte header with its class, so free() needs no size.
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cvirtshim.h"

#define VSHIM_POOL_MIN_SHIFT 12 /* 4 KiB */
#define VSHIM_POOL_MAX_SHIFT 26 /* 64 MiB */
#define VSHIM_POOL_HEADER 16

struct vshim_block {
    struct vshim_block *next;
    uint64_t shift; /* 0 = plain malloc */
};

static pthread_mutex_t vshim_pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct vshim_block *vshim_pool_free[VSHIM_POOL_MAX_SHIFT + 1];
static size_t vshim_pool_cached;
static const size_t vshim_pool_cap = 24u << 20;

static unsigned vshim_shift_for(size_t n) {
    unsigned s = VSHIM_POOL_MIN_SHIFT;
    while (((size_t)1 << s) < n) s++;
    return s;
}

void *vshim_pool_alloc(size_t n) {
    struct vshim_block *b = NULL;
    if (n >= ((size_t)1 << VSHIM_POOL_MIN_SHIFT) && n <= ((size_t)1 << VSHIM_POOL_MAX_SHIFT)) {
        unsigned s = vshim_shift_for(n);
        pthread_mutex_lock(&vshim_pool_lock);
        b = vshim_pool_free[s];
        if (b) {
            vshim_pool_free[s] = b->next;
            vshim_pool_cached -= (size_t)1 << s;
        }
        pthread_mutex_unlock(&vshim_pool_lock);
        if (!b) {
            b = malloc(VSHIM_POOL_HEADER + ((size_t)1 << s));
            if (!b) return NULL;
        }
        b->shift = s;
    } else {
        b = malloc(VSHIM_POOL_HEADER + (n ? n : 1));
        if (!b) return NULL;
        b->shift = 0;
    }
    return (char *)b + VSHIM_POOL_HEADER;
}

void vshim_pool_release(void *p) {
    if (!p) return;
    struct vshim_block *b = (struct vshim_block *)((char *)p - VSHIM_POOL_HEADER);
    if (b->shift) {
        size_t size = (size_t)1 << b->shift;
        pthread_mutex_lock(&vshim_pool_lock);
        if (vshim_pool_cached + size <= vshim_pool_cap) {
            b->next = vshim_pool_free[b->shift];
            vshim_pool_free[b->shift] = b;
            vshim_pool_cached += size;
            b = NULL;
        }
        pthread_mutex_unlock(&vshim_pool_lock);
    }
    free(b);
}

void *vshim_pool_realloc(void *p, size_t old_size, size_t new_size) {
    if (!p) return vshim_pool_alloc(new_size);
    struct vshim_block *b = (struct vshim_block *)((char *)p - VSHIM_POOL_HEADER);
    if (b->shift && new_size <= ((size_t)1 << b->shift)) return p;
    void *q = vshim_pool_alloc(new_size);
    if (!q) return NULL;
    memcpy(q, p, old_size < new_size ? old_size : new_size);
    vshim_pool_release(p);
    return q;
}

