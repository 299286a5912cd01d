/*
 * bootstamp: time a VMM from its start to a marker line on its console, and
 * measure the VMM's own memory at that moment. Same method for every VMM the
 * boot benchmark runs (ours and the peers), inside L1.
 *
 *   bootstamp MARKER RAM_MIB TIMEOUT_S LOG -- COMMAND ARGS...
 *
 * Starts COMMAND with stdout and stderr into a pipe, copies what it prints to
 * LOG, and as soon as a line containing MARKER arrives prints
 *
 *   BOOTSTAMP us=<microseconds since just before fork> rss_kib=<KiB>
 *
 * where rss_kib sums the Rss of every mapping in /proc/PID/smaps smaller than
 * RAM_MIB MiB (guest RAM is one mapping at least that large in every VMM
 * measured; everything else is the VMM's own). Then it kills COMMAND. The pipe
 * is read with blocking reads: no polling competes with the guest for L1's CPU.
 * Prints "BOOTSTAMP timeout" or "BOOTSTAMP exited" when the marker never came.
 * With BOOTSTAMP_SMAPS=FILE in the environment, also copies the smaps there.
 * Built by run.sh with the host's gcc (-static).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static pid_t child;

static void on_alarm(int sig) {
  (void)sig;
  if (child > 0) kill(-child, SIGKILL);
}

static long rss_kib(pid_t pid, unsigned long ram_bytes) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/smaps", (int)pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  char line[512];
  long total = 0;
  int guest = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long start, end;
    long kib;
    if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && strchr(line, ' ')) {
      guest = end - start >= ram_bytes;
    } else if (sscanf(line, "Rss: %ld kB", &kib) == 1 && !guest) {
      total += kib;
    }
  }
  fclose(f);
  return total;
}

static void copy_smaps(pid_t pid, const char *to) {
  if (!to) return;
  char path[64], buf[4096];
  snprintf(path, sizeof path, "/proc/%d/smaps", (int)pid);
  FILE *in = fopen(path, "r"), *out = fopen(to, "w");
  size_t n;
  while (in && out && (n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, out);
  if (in) fclose(in);
  if (out) fclose(out);
}

int main(int argc, char **argv) {
  if (argc < 7 || strcmp(argv[5], "--") != 0) {
    fprintf(stderr, "usage: bootstamp MARKER RAM_MIB TIMEOUT_S LOG -- COMMAND ARGS...\n");
    return 2;
  }
  const char *marker = argv[1];
  unsigned long ram = strtoul(argv[2], NULL, 10) << 20;
  unsigned timeout = (unsigned)strtoul(argv[3], NULL, 10);
  FILE *log = fopen(argv[4], "w");
  if (!log) {
    perror(argv[4]);
    return 2;
  }
  int p[2];
  if (pipe(p) != 0) {
    perror("pipe");
    return 2;
  }
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  child = fork();
  if (child < 0) {
    perror("fork");
    return 2;
  }
  if (child == 0) {
    setpgid(0, 0);
    dup2(p[1], 1);
    dup2(p[1], 2);
    close(p[0]);
    close(p[1]);
    execvp(argv[6], argv + 6);
    perror(argv[6]);
    _exit(127);
  }
  close(p[1]);
  signal(SIGALRM, on_alarm);
  alarm(timeout);
  char buf[4096], acc[8192];
  size_t used = 0;
  int found = 0;
  ssize_t n;
  while (!found && (n = read(p[0], buf, sizeof buf)) > 0) {
    fwrite(buf, 1, (size_t)n, log);
    for (ssize_t i = 0; i < n && !found; i++) {
      if (buf[i] == '\n' || used == sizeof acc - 1) {
        acc[used] = 0;
        if (strstr(acc, marker)) {
          clock_gettime(CLOCK_MONOTONIC, &t1);
          long us = (t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000;
          printf("BOOTSTAMP us=%ld rss_kib=%ld\n", us, rss_kib(child, ram));
          copy_smaps(child, getenv("BOOTSTAMP_SMAPS"));
          found = 1;
        }
        used = 0;
      } else {
        acc[used++] = buf[i];
      }
    }
  }
  alarm(0);
  int status = 0;
  int timed_out = 0;
  if (!found) {
    /* Either the alarm killed it or it ended by itself. */
    waitpid(child, &status, 0);
    timed_out = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
    printf("BOOTSTAMP %s\n", timed_out ? "timeout" : "exited");
  } else {
    kill(-child, SIGKILL);
    waitpid(child, &status, 0);
  }
  fclose(log);
  return found ? 0 : 1;
}
