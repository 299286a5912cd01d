/* Says hello, stamps the boot timer, echoes one console byte, exits 7. */
#include "guest.h"

int main(void) {
    outb(BOOT_TIMER, 'U');
    puts("hello from the guest\n");
    u8 c = getc();
    puts("got ");
    putc((char)c);
    puts("\n");
    return 7;
}
