/* Drives a virtio-blk device (vhost-user backed) by polling: reads the
 * host's pattern at sector 0, writes sector 8, flushes, reads it back, and
 * reads past the end. Prints one line per step. */
#include "virtio.h"

#define QSIZE 8
#define DESC 0x300000ul
#define AVAIL 0x301000ul
#define USED 0x302000ul
#define HDR 0x310000ul
#define DATA 0x311000ul
#define STATUS 0x313000ul

static struct vdev dev;
static u16 avail_idx, used_seen;

static u8 request(u32 type, u64 sector, u32 len) {
    volatile struct desc *d = (volatile struct desc *)DESC;
    *(volatile u32 *)HDR = type;
    *(volatile u32 *)(HDR + 4) = 0;
    *(volatile u64 *)(HDR + 8) = sector;
    *(volatile u8 *)STATUS = 0xff;
    d[0] = (struct desc){HDR, 16, D_NEXT, 1};
    if (len) {
        d[1] = (struct desc){DATA, len, (u16)(D_NEXT | (type == 0 ? D_WRITE : 0)), 2};
        d[2] = (struct desc){STATUS, 1, D_WRITE, 0};
    } else {
        d[0].next = 2;
        d[2] = (struct desc){STATUS, 1, D_WRITE, 0};
    }
    volatile u16 *avail = (volatile u16 *)AVAIL;
    avail[2 + avail_idx % QSIZE] = 0;
    mb();
    avail[1] = ++avail_idx;
    mb();
    mmio_w16(dev.notify + 0 * dev.notify_mult, 0);
    volatile u16 *used = (volatile u16 *)USED;
    while (used[1] == used_seen) {
    }
    used_seen++;
    mb();
    return *(volatile u8 *)STATUS;
}

int main(void) {
    if (vdev_find(&dev, 0x10421af4)) {
        puts("no virtio-blk device\n");
        return 1;
    }
    u8 st = vdev_negotiate(&dev);
    if (!(st & 8)) {
        puts("features refused\n");
        return 2;
    }
    vdev_queue(&dev, 0, QSIZE, DESC, AVAIL, USED);
    st = vdev_driver_ok(&dev);
    puts("status ");
    puthex(st, 2);
    puts("\n");
    u64 capacity = *(volatile u64 *)dev.device;
    puts("capacity ");
    putdec(capacity);
    puts("\n");

    st = request(0, 0, 4096);
    u8 *data = (u8 *)DATA;
    int bad = -1;
    for (int i = 0; i < 4096; i++)
        if (data[i] != (u8)(i % 251)) {
            bad = i;
            break;
        }
    puts("read0 status ");
    putdec(st);
    puts(bad < 0 ? " pattern ok\n" : " pattern mismatch\n");

    for (int i = 0; i < 4096; i++)
        data[i] = (u8)(0xa5 ^ i);
    st = request(1, 8, 4096);
    puts("write8 status ");
    putdec(st);
    puts("\n");
    st = request(4, 0, 0);
    puts("flush status ");
    putdec(st);
    puts("\n");
    for (int i = 0; i < 4096; i++)
        data[i] = 0;
    st = request(0, 8, 4096);
    bad = -1;
    for (int i = 0; i < 4096; i++)
        if (data[i] != (u8)(0xa5 ^ i)) {
            bad = i;
            break;
        }
    puts("read8 status ");
    putdec(st);
    puts(bad < 0 ? " pattern ok\n" : " pattern mismatch\n");
    st = request(0, capacity, 512);
    puts("past-end status ");
    putdec(st);
    puts("\n");
    return 0;
}
