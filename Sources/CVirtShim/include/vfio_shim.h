// VFIO plumbing for the VFIO virtio-pci transport: the ioctls of <linux/vfio.h> with their
// structs built here, so Swift never lays out a kernel struct by hand (ioctl is variadic and does
// not import into Swift anyway). Every function returns 0 (or a non-negative result) or -errno.
#ifndef VFIO_SHIM_H
#define VFIO_SHIM_H
#include <stddef.h>
#include <stdint.h>

/// VFIO_GET_API_VERSION on the container. Returns the version (0 for every kernel so far) or -errno.
int vshim_vfio_get_api_version(int container);
/// VFIO_CHECK_EXTENSION(ext). Returns >0 if supported, 0 if not, or -errno.
int vshim_vfio_check_extension(int container, int ext);
/// VFIO_SET_IOMMU(type), e.g. 3 = VFIO_TYPE1v2_IOMMU.
int vshim_vfio_set_iommu(int container, int type);
/// VFIO_GROUP_GET_STATUS: *flags gets VIABLE (1) | CONTAINER_SET (2).
int vshim_vfio_group_status(int group, uint32_t *flags);
/// VFIO_GROUP_SET_CONTAINER.
int vshim_vfio_group_set_container(int group, int container);
/// VFIO_GROUP_GET_DEVICE_FD(name), e.g. "0000:00:05.0". Returns the device fd or -errno.
int vshim_vfio_group_get_device_fd(int group, const char *name);
/// VFIO_DEVICE_GET_INFO.
int vshim_vfio_device_info(int device, uint32_t *flags, uint32_t *num_regions, uint32_t *num_irqs);
/// VFIO_DEVICE_GET_REGION_INFO for region `index` (PCI: BARs 0-5, ROM 6, config 7).
/// flags: READ 1, WRITE 2, MMAP 4.
int vshim_vfio_region_info(int device, uint32_t index, uint32_t *flags, uint64_t *size, uint64_t *offset);
/// VFIO_DEVICE_GET_IRQ_INFO for IRQ index `index` (PCI: INTx 0, MSI 1, MSI-X 2).
int vshim_vfio_irq_info(int device, uint32_t index, uint32_t *flags, uint32_t *count);
/// VFIO_DEVICE_SET_IRQS, DATA_EVENTFD | ACTION_TRIGGER: vectors start..start+count-1 signal fds[0..count-1].
int vshim_vfio_set_irq_eventfds(int device, uint32_t index, uint32_t start, uint32_t count, const int32_t *fds);
/// VFIO_DEVICE_SET_IRQS, DATA_NONE | ACTION_TRIGGER, count 0: disables every vector of `index`.
int vshim_vfio_disable_irqs(int device, uint32_t index);
/// VFIO_IOMMU_MAP_DMA, READ | WRITE: the device sees [vaddr, vaddr+size) at iova.
int vshim_vfio_map_dma(int container, uint64_t vaddr, uint64_t iova, uint64_t size);
/// VFIO_IOMMU_UNMAP_DMA.
int vshim_vfio_unmap_dma(int container, uint64_t iova, uint64_t size);
/// pread/pwrite of exactly `len` bytes at `off` (retries EINTR and short transfers).
/// Returns 0, -EIO on a short transfer at end of region, or -errno.
int vshim_pread_exact(int fd, void *buf, size_t len, int64_t off);
int vshim_pwrite_exact(int fd, const void *buf, size_t len, int64_t off);
#endif
