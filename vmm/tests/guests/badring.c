/* Programs a descriptor table outside guest memory and starts the device:
 * the VMM must refuse the queue (NEEDS_RESET) and keep running; after a
 * reset the device must work again with a sane queue. */
#include "virtio.h"

static struct vdev dev;

int main(void) {
    if (vdev_find(&dev, 0x10421af4))
        return 1;
    vdev_negotiate(&dev);
    vdev_queue(&dev, 0, 8, 0xdead00000000ul, 0x301000, 0x302000);
    u8 st = vdev_driver_ok(&dev);
    puts("bad ring status ");
    puthex(st, 2);
    puts("\n");
    /* An oversized queue is refused: the size reads back unchanged. */
    mmio_w8(dev.common + C_STATUS, 0);
    mmio_w16(dev.common + C_QSEL, 0);
    mmio_w16(dev.common + C_QSIZE, 0x8000);
    puts("oversized queue size ");
    putdec(mmio_r16(dev.common + C_QSIZE));
    puts("\n");
    /* A queue index that does not exist reads size 0. */
    mmio_w16(dev.common + C_QSEL, 99);
    puts("queue 99 size ");
    putdec(mmio_r16(dev.common + C_QSIZE));
    puts("\n");
    st = vdev_negotiate(&dev);
    vdev_queue(&dev, 0, 8, 0x300000, 0x301000, 0x302000);
    st = vdev_driver_ok(&dev);
    puts("after reset status ");
    puthex(st, 2);
    puts("\n");
    return 0;
}
