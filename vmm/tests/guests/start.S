/* Entry of the test guests: a stack, main(), then its return value to the
 * debug exit port. */
    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    lea stack_top(%rip), %rsp
    call main
    mov $0x501, %dx
    out %al, %dx
1:  hlt
    jmp 1b

    .section .bss
    .align 16
stack:
    .space 65536
stack_top:
