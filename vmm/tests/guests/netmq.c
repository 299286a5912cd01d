/* A multi-queue virtio-net NIC (vhost-user backed, control queue answered by
 * the vmm): takes MQ and CTRL_VQ, sets up two queue pairs and the control
 * queue, sends the control commands a driver may get wrong and the one it
 * needs (two pairs), then sends a frame on the second pair's transmit queue
 * and prints the first frame that comes back on either receive queue. */
#include "virtio.h"

#define QSIZE 8
#define HDR 12

struct ring {
    u64 desc, avail, used;
    u16 avail_idx, used_seen;
};

static struct vdev dev;
static struct ring rings[5];

static u64 ring_base(int q) { return 0x400000ul + (u64)q * 0x10000; }
static u64 buf_base(int q) { return 0x800000ul + (u64)q * 0x10000; }

/* Publishes the chain starting at descriptor `head` on queue `q`. */
static void publish(int q, u16 head) {
    struct ring *r = &rings[q];
    volatile u16 *avail = (volatile u16 *)r->avail;
    avail[2 + r->avail_idx % QSIZE] = head;
    mb();
    avail[1] = ++r->avail_idx;
    mb();
    mmio_w16(dev.notify + (u32)q * dev.notify_mult, (u16)q);
}

static void desc(int q, int i, u64 addr, u32 len, u16 flags, u16 next) {
    volatile struct desc *d = (volatile struct desc *)rings[q].desc;
    d[i].addr = addr;
    d[i].len = len;
    d[i].flags = flags;
    d[i].next = next;
}

/* The used length of the next chain queue `q` returns; -1 if none comes. */
static long used(int q) {
    struct ring *r = &rings[q];
    volatile u16 *u = (volatile u16 *)r->used;
    for (long spins = 0; u[1] == r->used_seen; spins++)
        if (spins > 2000000)
            return -1;
    volatile u32 *elem = (volatile u32 *)(r->used + 4 + 8 * (r->used_seen % QSIZE));
    r->used_seen++;
    mb();
    return elem[1];
}

/* Whether queue `q` has returned a chain not yet seen. */
static int has_used(int q) {
    volatile u16 *u = (volatile u16 *)rings[q].used;
    return u[1] != rings[q].used_seen;
}

/* Sends a control command (class, command, `n` bytes of data; `split`:
 * class and command in their own descriptor, as Linux does) and returns
 * the ack byte, or 0xee if the device never answered. */
static u8 control(u8 class, u8 cmd, const u8 *data, u32 n, int split) {
    u8 *b = (u8 *)buf_base(4);
    b[0] = class;
    b[1] = cmd;
    for (u32 i = 0; i < n; i++)
        b[2 + i] = data[i];
    u8 *ack = b + 0x100;
    *ack = 0xee;
    if (split) {
        desc(4, 0, (u64)b, 2, D_NEXT, 1);
        desc(4, 1, (u64)b + 2, n, D_NEXT, 2);
    } else {
        desc(4, 0, (u64)b, 2 + n, D_NEXT, 2);
    }
    desc(4, 2, (u64)ack, 1, D_WRITE, 0);
    publish(4, 0);
    if (used(4) < 0)
        return 0xee;
    return *(volatile u8 *)ack;
}

int main(void) {
    if (vdev_find(&dev, 0x10411af4)) {
        puts("no virtio-net device\n");
        return 1;
    }
    mmio_w8(dev.common + C_STATUS, 0);
    mmio_w8(dev.common + C_STATUS, 1 | 2);
    mmio_w32(dev.common + C_DFSEL, 0);
    u32 offered = mmio_r32(dev.common + C_DF);
    mmio_w32(dev.common + C_GFSEL, 1);
    mmio_w32(dev.common + C_GF, 1); /* VIRTIO_F_VERSION_1 */
    mmio_w32(dev.common + C_GFSEL, 0);
    mmio_w32(dev.common + C_GF, (1u << 17) | (1u << 22)); /* CTRL_VQ, MQ */
    mmio_w8(dev.common + C_STATUS, 1 | 2 | 8);
    u16 numq = mmio_r16(dev.common + C_NUMQ);
    u16 pairs = mmio_r16(dev.device + 8);
    puts("mq ");
    putdec((offered >> 22) & 1);
    puts(" ctrl ");
    putdec((offered >> 17) & 1);
    puts(" pairs ");
    putdec(pairs);
    puts(" queues ");
    putdec(numq);
    puts("\n");
    if (pairs != 2 || numq != 5)
        return 1;
    for (int q = 0; q < 5; q++) {
        rings[q].desc = ring_base(q);
        rings[q].avail = ring_base(q) + 0x1000;
        rings[q].used = ring_base(q) + 0x2000;
        vdev_queue(&dev, (u16)q, QSIZE, rings[q].desc, rings[q].avail, rings[q].used);
    }
    vdev_driver_ok(&dev);

    u8 three[2] = {3, 0}, zero[2] = {0, 0}, two[2] = {2, 0}, on[1] = {1};
    puts("ctrl three ");
    putdec(control(4, 0, three, 2, 1));
    puts(" zero ");
    putdec(control(4, 0, zero, 2, 1));
    puts(" promisc ");
    putdec(control(0, 0, on, 1, 1));
    puts(" short ");
    putdec(control(4, 0, two, 1, 0));
    puts(" two ");
    putdec(control(4, 0, two, 2, 1));
    puts("\n");

    /* A receive buffer on each pair's receive queue. */
    for (int q = 0; q < 4; q += 2) {
        desc(q, 0, buf_base(q), 2048, D_WRITE, 0);
        publish(q, 0);
    }
    u8 *f = (u8 *)buf_base(3);
    for (int i = 0; i < HDR; i++)
        f[i] = 0;
    u8 *e = f + HDR;
    for (int i = 0; i < 6; i++) {
        e[i] = 0xff;
        e[6 + i] = mmio_r8(dev.device + i);
    }
    e[12] = 0x88;
    e[13] = 0xb5;
    const char *msg = "atoll mq";
    int n = 0;
    while (msg[n]) {
        e[14 + n] = (u8)msg[n];
        n++;
    }
    desc(3, 0, (u64)f, (u32)(HDR + 14 + n), 0, 0);
    publish(3, 0);
    long sent = used(3);
    int rxq = -1;
    for (long spins = 0; rxq < 0 && spins < 20000000; spins++)
        for (int q = 0; q < 4; q += 2)
            if (has_used(q)) {
                rxq = q;
                break;
            }
    puts("tx1 used ");
    putdec((u64)sent);
    if (rxq < 0) {
        puts(" nothing received\n");
        return 1;
    }
    long got = used(rxq);
    u8 *r = (u8 *)buf_base(rxq) + HDR;
    r[14 + n] = 0;
    puts(" rx len ");
    putdec((u64)got);
    puts(" payload ");
    puts((const char *)(r + 14));
    puts("\n");
    return 0;
}
