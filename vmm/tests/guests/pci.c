/* Lists bus 0: slot, IDs, class, BAR 0 and its size (by the sizing protocol),
 * and the capability IDs. */
#include "guest.h"

int main(void) {
    for (int slot = 0; slot < 32; slot++) {
        u32 id = pci_r32(slot, 0);
        if (id == 0xffffffffu)
            continue;
        u32 class = pci_r32(slot, 8) >> 8;
        u32 lo = pci_r32(slot, 0x10), hi = pci_r32(slot, 0x14);
        pci_w32(slot, 0x10, 0xffffffffu);
        pci_w32(slot, 0x14, 0xffffffffu);
        u64 mask = ((u64)pci_r32(slot, 0x14) << 32) | (pci_r32(slot, 0x10) & ~0xfu);
        pci_w32(slot, 0x10, lo);
        pci_w32(slot, 0x14, hi);
        puts("slot ");
        putdec((u64)slot);
        puts(" id ");
        puthex(id & 0xffff, 4);
        putc(':');
        puthex(id >> 16, 4);
        puts(" class ");
        puthex(class, 6);
        puts(" bar0 ");
        puthex(((u64)hi << 32) | (lo & ~0xfu), 16);
        puts(" flags ");
        puthex(lo & 0xf, 1);
        puts(" size ");
        puthex(lo ? ~mask + 1 : 0, 8);
        puts(" caps");
        for (u8 p = pci_r8(slot, 0x34); p; p = pci_r8(slot, p + 1)) {
            putc(' ');
            puthex(pci_r8(slot, p), 2);
            if (pci_r8(slot, p) == 0x09) {
                putc('/');
                puthex(pci_r8(slot, p + 3), 1);
            }
        }
        puts("\n");
    }
    puts("done\n");
    return 0;
}
