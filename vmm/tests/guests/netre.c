/* A virtio-net NIC (vhost-user backed) whose backend restarts: sets up the
 * NIC and posts a receive buffer, waits for a byte on the console (the test
 * replaces the backend meanwhile), then sends one frame and prints what
 * comes back through the new backend, which echoes it. */
#define NET_WAIT_FOR_GO
#define NET_MESSAGE "atoll again"
#include "net.c"
