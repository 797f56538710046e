#define _GNU_SOURCE
#include "vfio_shim.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/vfio.h>

static int ret(int r) { return r < 0 ? -errno : r; }

int vshim_vfio_get_api_version(int c) { return ret(ioctl(c, VFIO_GET_API_VERSION)); }
int vshim_vfio_check_extension(int c, int ext) { return ret(ioctl(c, VFIO_CHECK_EXTENSION, (unsigned long)ext)); }
int vshim_vfio_set_iommu(int c, int type) { return ret(ioctl(c, VFIO_SET_IOMMU, (unsigned long)type)); }

int vshim_vfio_group_status(int g, uint32_t *flags) {
    struct vfio_group_status st = { .argsz = sizeof st };
    if (ioctl(g, VFIO_GROUP_GET_STATUS, &st) < 0) return -errno;
    *flags = st.flags;
    return 0;
}

int vshim_vfio_group_set_container(int g, int c) { return ret(ioctl(g, VFIO_GROUP_SET_CONTAINER, &c)); }
int vshim_vfio_group_get_device_fd(int g, const char *name) { return ret(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, name)); }

int vshim_vfio_device_info(int d, uint32_t *flags, uint32_t *num_regions, uint32_t *num_irqs) {
    struct vfio_device_info info = { .argsz = sizeof info };
    if (ioctl(d, VFIO_DEVICE_GET_INFO, &info) < 0) return -errno;
    *flags = info.flags; *num_regions = info.num_regions; *num_irqs = info.num_irqs;
    return 0;
}

int vshim_vfio_region_info(int d, uint32_t index, uint32_t *flags, uint64_t *size, uint64_t *offset) {
    struct vfio_region_info info = { .argsz = sizeof info, .index = index };
    if (ioctl(d, VFIO_DEVICE_GET_REGION_INFO, &info) < 0) return -errno;
    *flags = info.flags; *size = info.size; *offset = info.offset;
    return 0;
}

int vshim_vfio_irq_info(int d, uint32_t index, uint32_t *flags, uint32_t *count) {
    struct vfio_irq_info info = { .argsz = sizeof info, .index = index };
    if (ioctl(d, VFIO_DEVICE_GET_IRQ_INFO, &info) < 0) return -errno;
    *flags = info.flags; *count = info.count;
    return 0;
}

int vshim_vfio_set_irq_eventfds(int d, uint32_t index, uint32_t start, uint32_t count, const int32_t *fds) {
    size_t sz = sizeof(struct vfio_irq_set) + sizeof(int32_t) * count;
    struct vfio_irq_set *set = calloc(1, sz);
    if (!set) return -ENOMEM;
    set->argsz = (uint32_t)sz;
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = index; set->start = start; set->count = count;
    memcpy(set->data, fds, sizeof(int32_t) * count);
    int r = ret(ioctl(d, VFIO_DEVICE_SET_IRQS, set));
    free(set);
    return r;
}

int vshim_vfio_disable_irqs(int d, uint32_t index) {
    struct vfio_irq_set set = { .argsz = sizeof set, .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                .index = index, .start = 0, .count = 0 };
    return ret(ioctl(d, VFIO_DEVICE_SET_IRQS, &set));
}

int vshim_vfio_map_dma(int c, uint64_t vaddr, uint64_t iova, uint64_t size) {
    struct vfio_iommu_type1_dma_map m = { .argsz = sizeof m, .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                          .vaddr = vaddr, .iova = iova, .size = size };
    return ret(ioctl(c, VFIO_IOMMU_MAP_DMA, &m));
}

int vshim_vfio_unmap_dma(int c, uint64_t iova, uint64_t size) {
    struct vfio_iommu_type1_dma_unmap u = { .argsz = sizeof u, .iova = iova, .size = size };
    return ret(ioctl(c, VFIO_IOMMU_UNMAP_DMA, &u));
}

int vshim_pread_exact(int fd, void *buf, size_t len, int64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + (int64_t)done));
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        if (n == 0) return -EIO;
        done += (size_t)n;
    }
    return 0;
}

int vshim_pwrite_exact(int fd, const void *buf, size_t len, int64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + (int64_t)done));
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        if (n == 0) return -EIO;
        done += (size_t)n;
    }
    return 0;
}
