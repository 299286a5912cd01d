/* Walks the ACPI tables the VMM wrote (RSDP, XSDT, FADT, MADT, DSDT), checks
 * every checksum, then powers off through the FADT's sleep control register. */
#include "guest.h"

static int sum_ok(const u8 *p, u32 len) {
    u8 s = 0;
    for (u32 i = 0; i < len; i++)
        s = (u8)(s + p[i]);
    return s == 0;
}

static int sig(const u8 *p, const char *s) {
    return p[0] == s[0] && p[1] == s[1] && p[2] == s[2] && p[3] == s[3];
}

static u32 r32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static u64 r64(const u8 *p) { return r32(p) | (u64)r32(p + 4) << 32; }

int main(void) {
    const u8 *rsdp = (const u8 *)0xe0000;
    const char *magic = "RSD PTR ";
    for (int i = 0; i < 8; i++)
        if (rsdp[i] != (u8)magic[i]) {
            puts("no rsdp\n");
            return 1;
        }
    puts(sum_ok(rsdp, 20) && sum_ok(rsdp, 36) ? "rsdp ok\n" : "rsdp bad\n");
    const u8 *xsdt = (const u8 *)r64(rsdp + 24);
    u32 n = (r32(xsdt + 4) - 36) / 8;
    puts(sig(xsdt, "XSDT") && sum_ok(xsdt, r32(xsdt + 4)) ? "xsdt ok entries " : "xsdt bad ");
    putdec(n);
    puts("\n");
    u16 sleep_port = 0;
    for (u32 i = 0; i < n; i++) {
        const u8 *t = (const u8 *)r64(xsdt + 36 + 8 * i);
        int ok = sum_ok(t, r32(t + 4));
        if (sig(t, "FACP")) {
            const u8 *dsdt = (const u8 *)r64(t + 140);
            puts(ok ? "fadt ok" : "fadt bad");
            puts(" hw-reduced ");
            putdec((r32(t + 112) >> 20) & 1);
            puts(sig(dsdt, "DSDT") && sum_ok(dsdt, r32(dsdt + 4)) ? " dsdt ok\n" : " dsdt bad\n");
            sleep_port = (u16)r64(t + 244 + 4);
        } else if (sig(t, "APIC")) {
            u32 cpus = 0;
            for (const u8 *e = t + 44; e < t + r32(t + 4); e += e[1])
                cpus += e[0] == 0;
            puts(ok ? "madt ok cpus " : "madt bad cpus ");
            putdec(cpus);
            puts("\n");
        }
    }
    puts("poweroff\n");
    outb(sleep_port, (5 << 2) | (1 << 5));
    puts("still here\n");
    return 1;
}
