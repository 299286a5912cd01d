/* Prints a numbered tick forever (for pause/resume/stop tests). */
#include "guest.h"

int main(void) {
    outb(BOOT_TIMER, 'U');
    for (u64 n = 0;; n++) {
        puts("tick ");
        putdec(n);
        puts("\n");
        for (volatile int i = 0; i < 20000; i++) {
        }
    }
}
