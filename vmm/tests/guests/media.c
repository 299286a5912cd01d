/* A read-only local disk and a virtio-rng, driven by polling, then hostile
 * chains: a descriptor loop, a buffer outside guest memory, an oversized
 * length, a chain with no status byte. The device must answer each sanely and
 * keep serving. */
#include "virtio.h"

#define HDR 0x310000ul
#define DATA 0x311000ul
#define STATUS 0x313000ul

static struct vdev blk, rng;

static void header(u32 type, u64 sector) {
    *(volatile u32 *)HDR = type;
    *(volatile u32 *)(HDR + 4) = 0;
    *(volatile u64 *)(HDR + 8) = sector;
    *(volatile u8 *)STATUS = 0xff;
}

static void report(const char *what, long used) {
    puts(what);
    puts(" used ");
    if (used < 0)
        puts("none");
    else
        putdec((u64)used);
    puts(" status ");
    puthex(*(volatile u8 *)STATUS, 2);
    puts("\n");
}

static long rw(u32 type, u64 sector, u64 addr, u32 len) {
    header(type, sector);
    vq_desc(0, HDR, 16, D_NEXT, 1);
    vq_desc(1, addr, len, (u16)(D_NEXT | (type == 0 || type == 8 ? D_WRITE : 0)), 2);
    vq_desc(2, STATUS, 1, D_WRITE, 0);
    return vq_submit(&blk);
}

int main(void) {
    if (vdev_find(&blk, 0x10421af4) || vdev_find(&rng, 0x10441af4)) {
        puts("devices missing\n");
        return 1;
    }
    /* Block first. */
    u8 st = vq_start(&blk);
    puts("media status ");
    puthex(st, 2);
    puts(" capacity ");
    putdec(*(volatile u64 *)blk.device);
    puts("\n");
    long used = rw(0, 0, DATA, 4096);
    int bad = -1;
    for (int i = 0; i < 4096; i++)
        if (((u8 *)DATA)[i] != (u8)(i % 251)) {
            bad = i;
            break;
        }
    report(bad < 0 ? "read pattern ok" : "read pattern bad", used);
    report("write", rw(1, 0, DATA, 512));
    used = rw(8, 0, DATA, 20);
    ((u8 *)DATA)[20] = 0;
    puts("id ");
    puts((const char *)DATA);
    puts("\n");
    report("get-id", used);
    report("past end", rw(0, 8192, DATA, 512));
    report("outside memory", rw(0, 0, 0xdead0000000ul, 512));
    report("oversized", rw(0, 0, DATA, 0xfffff000u));
    header(0, 0);
    vq_desc(0, HDR, 16, D_NEXT, 0); /* points at itself */
    report("loop", vq_submit(&blk));
    header(0, 0);
    vq_desc(0, HDR, 16, 0, 0);
    report("no status", vq_submit(&blk));
    report("still serving", rw(0, 1, DATA, 512));

    /* Entropy, on the same ring memory once the disk is reset. */
    mmio_w8(blk.common + C_STATUS, 0);
    for (int i = 0; i < 64; i++)
        ((u8 *)DATA)[i] = 0;
    vq_avail_idx = vq_used_seen = 0;
    for (int i = 0; i < 3 * 4096; i++)
        ((u8 *)VQ_DESC)[i] = 0;
    vq_start(&rng);
    vq_desc(0, DATA, 64, D_WRITE, 0);
    used = vq_submit(&rng);
    int zeros = 0;
    for (int i = 0; i < 64; i++)
        zeros += ((u8 *)DATA)[i] == 0;
    puts("rng used ");
    putdec((u64)used);
    puts(zeros < 8 ? " random\n" : " zeros\n");
    return 0;
}
