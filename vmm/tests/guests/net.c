/* A virtio-net NIC (vhost-user backed): reads the MAC and link status, posts
 * one receive buffer, sends one frame, and prints what comes back (the test
 * backend echoes every frame). With NET_WAIT_FOR_GO it waits for a byte on
 * the console before sending (netre.c). */
#include "virtio.h"

#ifndef NET_MESSAGE
#define NET_MESSAGE "atoll echo"
#endif

struct ring {
    u64 desc, avail, used;
    u16 avail_idx, used_seen;
};

static struct vdev dev;
static struct ring rx = {0x300000, 0x301000, 0x302000, 0, 0};
static struct ring tx = {0x310000, 0x311000, 0x312000, 0, 0};
#define RXBUF 0x340000ul
#define TXBUF 0x350000ul
#define HDR 12

static void post(struct ring *r, u16 q, u64 addr, u32 len, u16 flags) {
    volatile struct desc *d = (volatile struct desc *)r->desc;
    u16 i = r->avail_idx % 8;
    d[i].addr = addr;
    d[i].len = len;
    d[i].flags = flags;
    d[i].next = 0;
    volatile u16 *avail = (volatile u16 *)r->avail;
    avail[2 + i] = i;
    mb();
    avail[1] = ++r->avail_idx;
    mb();
    mmio_w16(dev.notify + q * dev.notify_mult, q);
}

static long wait_used(struct ring *r) {
    volatile u16 *used = (volatile u16 *)r->used;
    for (long spins = 0; used[1] == r->used_seen; spins++)
        if (spins > 200000)
            return -1;
    volatile u32 *elem = (volatile u32 *)(r->used + 4 + 8 * (r->used_seen % 8));
    r->used_seen++;
    mb();
    return elem[1];
}

int main(void) {
    if (vdev_find(&dev, 0x10411af4)) {
        puts("no virtio-net device\n");
        return 1;
    }
    u8 st = vdev_negotiate(&dev);
    vdev_queue(&dev, 0, 8, rx.desc, rx.avail, rx.used);
    vdev_queue(&dev, 1, 8, tx.desc, tx.avail, tx.used);
    st = vdev_driver_ok(&dev);
    u8 mac[6];
    for (int i = 0; i < 6; i++)
        mac[i] = mmio_r8(dev.device + i);
    puts("status ");
    puthex(st, 2);
    puts(" mac ");
    for (int i = 0; i < 6; i++) {
        puthex(mac[i], 2);
        if (i < 5)
            putc(':');
    }
    puts(" link ");
    putdec(mmio_r16(dev.device + 6) & 1);
    puts("\n");

    post(&rx, 0, RXBUF, 2048, D_WRITE);
#ifdef NET_WAIT_FOR_GO
    getc();
#endif
    u8 *f = (u8 *)TXBUF;
    for (int i = 0; i < HDR; i++)
        f[i] = 0;
    u8 *e = f + HDR;
    for (int i = 0; i < 6; i++) {
        e[i] = 0xff;
        e[6 + i] = mac[i];
    }
    e[12] = 0x88;
    e[13] = 0xb5;
    const char *msg = NET_MESSAGE;
    int n = 0;
    while (msg[n]) {
        e[14 + n] = (u8)msg[n];
        n++;
    }
    post(&tx, 1, TXBUF, (u32)(HDR + 14 + n), 0);
    long sent = wait_used(&tx);
    long got = wait_used(&rx);
    puts("tx used ");
    putdec((u64)sent);
    puts(" rx len ");
    putdec((u64)got);
    u8 *r = (u8 *)RXBUF + HDR;
    puts(" type ");
    puthex(r[12], 2);
    puthex(r[13], 2);
    puts(" payload ");
    r[14 + n] = 0;
    puts((const char *)(r + 14));
    puts("\n");
    return 0;
}
