/* A polling virtio-pci (modern) driver for one split queue, enough for the
 * block tests. Interrupts stay off: the queue gets no MSI-X vector. */
#ifndef ATOLL_VIRTIO_H
#define ATOLL_VIRTIO_H
#include "guest.h"

struct vdev {
    int slot;
    u64 common, notify, isr, device;
    u32 notify_mult;
};

#define C_DFSEL 0x00
#define C_DF 0x04
#define C_GFSEL 0x08
#define C_GF 0x0c
#define C_NUMQ 0x12
#define C_STATUS 0x14
#define C_QSEL 0x16
#define C_QSIZE 0x18
#define C_QMSIX 0x1a
#define C_QENABLE 0x1c
#define C_QNOFF 0x1e
#define C_QDESC 0x20
#define C_QAVAIL 0x28
#define C_QUSED 0x30

/* Finds the first function with `id` (device << 16 | vendor) and maps its
 * virtio structures; 0 when found. */
static int vdev_find(struct vdev *d, u32 id) {
    for (int slot = 0; slot < 32; slot++) {
        if (pci_r32(slot, 0) != id)
            continue;
        d->slot = slot;
        pci_w32(slot, 4, pci_r32(slot, 4) | 0x6); /* memory + bus master */
        for (u8 p = pci_r8(slot, 0x34); p; p = pci_r8(slot, p + 1)) {
            if (pci_r8(slot, p) != 0x09)
                continue;
            int bar = pci_r8(slot, p + 4);
            u64 base = ((u64)pci_r32(slot, 0x14 + 4 * bar) << 32) |
                       (pci_r32(slot, 0x10 + 4 * bar) & ~0xfu);
            u64 at = base + pci_r32(slot, p + 8);
            switch (pci_r8(slot, p + 3)) {
            case 1: d->common = at; break;
            case 2: d->notify = at; d->notify_mult = pci_r32(slot, p + 16); break;
            case 3: d->isr = at; break;
            case 4: d->device = at; break;
            }
        }
        return 0;
    }
    return -1;
}

/* Reset, acknowledge, accept VERSION_1 only; returns the status read back. */
static u8 vdev_negotiate(struct vdev *d) {
    mmio_w8(d->common + C_STATUS, 0);
    mmio_w8(d->common + C_STATUS, 1 | 2);
    mmio_w32(d->common + C_GFSEL, 1);
    mmio_w32(d->common + C_GF, 1); /* VIRTIO_F_VERSION_1 */
    mmio_w32(d->common + C_GFSEL, 0);
    mmio_w32(d->common + C_GF, 0);
    mmio_w8(d->common + C_STATUS, 1 | 2 | 8);
    return mmio_r8(d->common + C_STATUS);
}

static void vdev_queue(struct vdev *d, u16 q, u16 size, u64 desc, u64 avail, u64 used) {
    mmio_w16(d->common + C_QSEL, q);
    mmio_w16(d->common + C_QSIZE, size);
    mmio_w16(d->common + C_QMSIX, 0xffff);
    mmio_w32(d->common + C_QDESC, (u32)desc);
    mmio_w32(d->common + C_QDESC + 4, (u32)(desc >> 32));
    mmio_w32(d->common + C_QAVAIL, (u32)avail);
    mmio_w32(d->common + C_QAVAIL + 4, (u32)(avail >> 32));
    mmio_w32(d->common + C_QUSED, (u32)used);
    mmio_w32(d->common + C_QUSED + 4, (u32)(used >> 32));
    mmio_w16(d->common + C_QENABLE, 1);
}

static u8 vdev_driver_ok(struct vdev *d) {
    mmio_w8(d->common + C_STATUS, 1 | 2 | 8 | 4);
    return mmio_r8(d->common + C_STATUS);
}

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
#define D_NEXT 1
#define D_WRITE 2

#endif

/* One split queue at fixed addresses, polled. */
#define VQ_SIZE 8
#define VQ_DESC 0x300000ul
#define VQ_AVAIL 0x301000ul
#define VQ_USED 0x302000ul

static u16 vq_avail_idx, vq_used_seen;

/* Sets up queue 0 of `d` and starts the device; returns the status. */
static u8 vq_start(struct vdev *d) {
    vdev_negotiate(d);
    vdev_queue(d, 0, VQ_SIZE, VQ_DESC, VQ_AVAIL, VQ_USED);
    return vdev_driver_ok(d);
}

/* Publishes the chain already written at descriptor 0, waits for it to be
 * used and returns the used length (polls a bounded number of times: -1 if
 * the device never answers). */
static long vq_submit(struct vdev *d) {
    volatile u16 *avail = (volatile u16 *)VQ_AVAIL;
    avail[2 + vq_avail_idx % VQ_SIZE] = 0;
    mb();
    avail[1] = ++vq_avail_idx;
    mb();
    mmio_w16(d->notify, 0);
    volatile u16 *used = (volatile u16 *)VQ_USED;
    for (long spins = 0; used[1] == vq_used_seen; spins++)
        if (spins > 200000)
            return -1;
    vq_used_seen++;
    mb();
    volatile u32 *elem = (volatile u32 *)(VQ_USED + 4 + 8 * ((vq_used_seen - 1) % VQ_SIZE));
    return elem[1];
}

static void vq_desc(int i, u64 addr, u32 len, u16 flags, u16 next) {
    volatile struct desc *d = (volatile struct desc *)VQ_DESC;
    d[i].addr = addr;
    d[i].len = len;
    d[i].flags = flags;
    d[i].next = next;
}
