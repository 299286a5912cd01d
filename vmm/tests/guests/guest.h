/* Freestanding helpers for the VMM's test guests (x86-64, entered in long
 * mode by the VMM with an identity map of the first 4 GiB). */
#ifndef ATOLL_GUEST_H
#define ATOLL_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_r16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }

#define COM1 0x3f8
#define BOOT_TIMER 0x440
#define DEBUG_EXIT 0x501

static void putc(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {
    }
    outb(COM1, (u8)c);
}
static void puts(const char *s) {
    while (*s) {
        if (*s == '\n')
            putc('\r');
        putc(*s++);
    }
}
static void puthex(u64 v, int digits) {
    for (int i = digits - 1; i >= 0; i--)
        putc("0123456789abcdef"[(v >> (4 * i)) & 0xf]);
}
static void putdec(u64 v) {
    char b[21];
    int n = 0;
    do {
        b[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(b[--n]);
}
/* Waits for a byte from the console. */
static u8 getc(void) {
    while (!(inb(COM1 + 5) & 0x01)) {
    }
    return inb(COM1);
}
static void __attribute__((noreturn)) guest_exit(u8 code) {
    outb(DEBUG_EXIT, code);
    for (;;)
        __asm__ volatile("hlt");
}

static u32 pci_r32(int slot, int reg) {
    outl(0xcf8, 0x80000000u | ((u32)slot << 11) | (u32)(reg & 0xfc));
    return inl(0xcfc);
}
static void pci_w32(int slot, int reg, u32 v) {
    outl(0xcf8, 0x80000000u | ((u32)slot << 11) | (u32)(reg & 0xfc));
    outl(0xcfc, v);
}
static u8 pci_r8(int slot, int reg) { return (u8)(pci_r32(slot, reg) >> (8 * (reg & 3))); }

#endif
