/*
 * hog: fills memory with a pattern that names every 8-byte word (seed,
 * page index, word index), so that a page that comes back from swap
 * corrupted, stale, zeroed or swapped with another is caught, then reads
 * every page back and counts the bad ones.
 *
 *   hog [--hold FILE] [--compressible] MIB SEED
 *   hog --watchdog PID SECONDS HEARTBEAT
 *
 * With --compressible, each word is repeated over its group of four (even
 * pages) or two (odd pages), still naming its page: lz4 packs such pages
 * about 3:1, where the plain pattern packs 2:1.
 *
 * With --hold, after writing it prints "hog SEED: written" and waits until
 * FILE exists before verifying (the scenario swaps, stops, kills... in
 * between). Prints "hog SEED: MIB MiB, N pages, M corrupt" and exits 0 only
 * when M is 0; 2 for bad arguments. A page lost with its swap device kills
 * the hog with SIGBUS, which the caller sees as its exit status.
 *
 * --watchdog, with all its memory locked, watches the file HEARTBEAT: it
 * exits 0 once the file is gone, and if the file's time has not moved for
 * SECONDS it asks the kernel to log every task's state and kernel stack,
 * the blocked tasks and every CPU's backtrace (sysrq t, w and l), then
 * writes to the kernel log where every thread of PID waits (state, wchan,
 * kernel stack; PID 0: none) and the memory figures, and exits 1. A swap
 * deadlock stops every process with a page out on the stuck device, the
 * scenario's shell and timeout(1) included, and the kernel's hung-task
 * report names only tasks in D state: this is what says where the server
 * is. Everything the sysrq part needs is opened at the start, while
 * memory is free, and the heartbeat is watched through its descriptor: in
 * a guest stuck in reclaim a path walk, an open() or a read of /proc may
 * itself wait (2026-12-02: in a hang the first line of a watchdog that
 * stat()ed the heartbeat's path came 1,100 s late; what held it is not
 * known).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / sizeof(uint64_t))

static uint64_t word(uint64_t seed, uint64_t page, uint64_t i)
{
    return (seed << 48) ^ (page << 9) ^ i ^ 0x5a5a000000000000ull;
}

/* --compressible: which word of its group a word repeats. */
static int compressible;

static uint64_t expected(uint64_t seed, uint64_t page, uint64_t i)
{
    if (compressible)
        i &= page % 2 ? ~1ull : ~3ull;
    return word(seed, page, i);
}

static int usage(void)
{
    fprintf(stderr, "usage: hog [--hold FILE] [--compressible] MIB SEED | "
                    "hog --watchdog PID SECONDS FILE\n");
    return 2;
}

/* Where the watchdog writes: the kernel log. A process stuck in a page
 * fault while writing to the console holds the tty's write lock, and every
 * later write to the console would wait behind it; printk does not. */
static int kmsg = -1;

static void say_line(const char *line, size_t len)
{
    char rec[1024];
    int n = snprintf(rec, sizeof rec, "watchdog: %.*s\n", (int)(len > 1000 ? 1000 : len), line);
    if (kmsg < 0 || write(kmsg, rec, (size_t)n) != n)
        fputs(rec, stdout);
}

/* Says PREFIX and the file PATH, up to 8 KiB of it, a line at a time. */
static void show(const char *prefix, const char *path)
{
    static char buf[8192];
    char line[1024];
    int fd = open(path, O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0)
        close(fd);
    buf[n > 0 ? n : 0] = 0;
    for (char *at = buf, *nl; *at || at == buf; at = nl + 1) {
        nl = strchr(at, '\n');
        size_t len = nl ? (size_t)(nl - at) : strlen(at);
        snprintf(line, sizeof line, "%s%.*s", prefix, (int)len, at);
        say_line(line, strlen(line));
        if (!nl || !nl[1])
            break;
    }
}

/* /proc/sysrq-trigger, opened while memory is free. */
static int sysrq_fd = -1;

static void sysrq(char key)
{
    if (sysrq_fd >= 0 && write(sysrq_fd, &key, 1) != 1)
        perror("watchdog: sysrq");
}

static int watchdog(const char *pid, unsigned long seconds, const char *heartbeat)
{
    char path[256];
    if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0)
        perror("watchdog: mlockall");
    kmsg = open("/dev/kmsg", O_WRONLY);
    sysrq_fd = open("/proc/sysrq-trigger", O_WRONLY);
    /* The heartbeat by descriptor: fstat needs no path walk, and a link
     * count of 0 says the file is gone. */
    int beat = open(heartbeat, O_RDONLY);
    if (beat < 0)
        return 0;
    /* Whatever opendir allocates, allocated now, while memory is free. */
    snprintf(path, sizeof path, "/proc/%s/task", pid);
    DIR *dir = opendir(path);
    if (dir)
        closedir(dir);
    for (;;) {
        struct stat st;
        if (fstat(beat, &st) != 0 || st.st_nlink == 0)
            return 0;
        if ((unsigned long)(time(NULL) - st.st_mtime) >= seconds)
            break;
        sleep(1);
    }
    char head[128];
    snprintf(head, sizeof head, "no progress for %lu s; every task's state follows (sysrq t, w, l)", seconds);
    say_line(head, strlen(head));
    sysrq('t');
    sysrq('w');
    sysrq('l');
    if (strcmp(pid, "0") == 0)
        return 1;
    snprintf(head, sizeof head, "where process %s's threads wait:", pid);
    say_line(head, strlen(head));
    dir = opendir(path);
    for (struct dirent *e; dir && (e = readdir(dir));) {
        if (e->d_name[0] == '.')
            continue;
        char item[600];
        snprintf(item, sizeof item, "%s/%s/comm", path, e->d_name);
        show("== thread ", item);
        snprintf(item, sizeof item, "%s/%s/stat", path, e->d_name);
        show("   stat: ", item);
        snprintf(item, sizeof item, "%s/%s/wchan", path, e->d_name);
        show("   wchan: ", item);
        snprintf(item, sizeof item, "%s/%s/stack", path, e->d_name);
        show("", item);
    }
    if (dir)
        closedir(dir);
    show("", "/proc/meminfo");
    return 1;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "--watchdog") == 0) {
        char *end;
        unsigned long seconds = strtoul(argv[3], &end, 10);
        if (*end || seconds == 0)
            return usage();
        return watchdog(argv[2], seconds, argv[4]);
    }
    const char *hold = NULL;
    if (argc > 2 && strcmp(argv[1], "--hold") == 0) {
        hold = argv[2];
        argc -= 2;
        argv += 2;
    }
    if (argc > 1 && strcmp(argv[1], "--compressible") == 0) {
        compressible = 1;
        argc--;
        argv++;
    }
    if (argc != 3)
        return usage();
    char *end;
    unsigned long mib = strtoul(argv[1], &end, 10);
    if (*end || mib == 0)
        return usage();
    uint64_t seed = strtoull(argv[2], &end, 10);
    if (*end)
        return usage();

    size_t pages = (size_t)mib * (1u << 20) / PAGE;
    uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        fprintf(stderr, "hog %llu: mmap %lu MiB: %s\n", (unsigned long long)seed, mib,
                strerror(errno));
        return 1;
    }
    /* Keep huge pages out of it: swap handles 4 KiB pages one by one. */
    madvise(mem, pages * PAGE, MADV_NOHUGEPAGE);

    for (size_t p = 0; p < pages; p++)
        for (size_t i = 0; i < WORDS; i++)
            mem[p * WORDS + i] = expected(seed, p, i);

    if (hold) {
        printf("hog %llu: written\n", (unsigned long long)seed);
        fflush(stdout);
        while (access(hold, F_OK) != 0)
            usleep(100000);
    }

    size_t corrupt = 0;
    for (size_t p = 0; p < pages; p++) {
        for (size_t i = 0; i < WORDS; i++) {
            if (mem[p * WORDS + i] != expected(seed, p, i)) {
                if (corrupt < 5)
                    fprintf(stderr, "hog %llu: page %zu word %zu: %016llx, expected %016llx\n",
                            (unsigned long long)seed, p, i,
                            (unsigned long long)mem[p * WORDS + i],
                            (unsigned long long)expected(seed, p, i));
                corrupt++;
                break;
            }
        }
    }
    printf("hog %llu: %lu MiB, %zu pages, %zu corrupt\n", (unsigned long long)seed, mib, pages,
           corrupt);
    return corrupt == 0 ? 0 : 1;
}
