/*
 * swaphog: the workload of bench/swap, run inside the guest. Fills MIB of
 * anonymous memory with verifiable pages (as tests/guest/hog.c does: every
 * 8-byte word names its seed, page and index), then touches it the way an
 * overcommitted program does, in THREADS threads, each owning one slice:
 *
 *   fill     write every page once                    (swap-out bound)
 *   seq      PASSES sequential passes: read and check every page, dirty
 *            one word                                  (swap-in + swap-out)
 *   random   TOUCHES touches of pseudo-random pages (fixed seed: every
 *            run touches the same pages), each checked and dirtied
 *   verify   one last sequential pass that checks every page
 *
 * Each random touch is timed (CLOCK_MONOTONIC around the whole touch).
 * Before it, mincore() says whether the page is resident: a touch of a page
 * that was not is a major fault, and its time is reported apart as the
 * swap-in latency (fault entry, the swap device's read, mapping the page;
 * with vm.page-cluster=0 one 4 KiB read per fault).
 *
 * A quarter of each page's words (RANDOM_PCT, default 25) are hashed, the
 * rest plain pattern: lz4 packs such pages 1.6:1 and zstd 2.8:1
 * (benches/compress.rs), below typical program memory's 2.6:1 with lz4;
 * 100 makes them incompressible (zram's worst case).
 *
 *   swaphog [--flip] MIB THREADS PASSES TOUCHES [RANDOM_PCT]
 *   swaphog --swapon DEVICE PRIORITY
 *
 * The second form is swapon(8) with a priority, which the static busybox
 * lacks: swap areas of equal priority are used round-robin (striped).
 * With --flip, after the fill it flips one bit of one page (the middle
 * one), as a bad swap-in would return it: the self-test of detection, from
 * the check to the exit status and the run's verdict. (Overwriting the
 * swap disk itself is no test: it also corrupts whatever else the guest
 * swapped out, its init included, and Linux refuses writes to an active
 * swap device from inside.)
 * Prints "key=value" lines (times in seconds, latencies in microseconds)
 * and exits 0 only when no page was corrupt; 1 if one was.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/swap.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / sizeof(uint64_t))

static uint64_t *mem;
static size_t pages, threads, passes, touches, hashed_from;
static pthread_barrier_t barrier;

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t word(uint64_t page, uint64_t i)
{
    uint64_t tag = (page << 9) ^ i ^ 0x5a5a000000000000ull;
    return i >= hashed_from ? mix(tag) : tag;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

struct worker {
    pthread_t thread;
    size_t first, count;    /* its slice of pages */
    size_t corrupt;
    double *fault_us;       /* random touches of non-resident pages */
    double *hit_us;         /* random touches of resident pages */
    size_t faults, hits;
};

static void report_corrupt(struct worker *w, size_t p, size_t i)
{
    if (w->corrupt < 5)
        fprintf(stderr, "swaphog: page %zu word %zu: %016llx, expected %016llx\n", p, i,
                (unsigned long long)mem[p * WORDS + i], (unsigned long long)word(p, i));
    w->corrupt++;
}

/* Checks page P; then, when DIRTY, rewrites its first word so that the
 * kernel must write the page out again before it can drop it. */
static void touch(struct worker *w, size_t p, int dirty)
{
    volatile uint64_t *m = mem + p * WORDS;
    for (size_t i = 0; i < WORDS; i++) {
        if (m[i] != word(p, i)) {
            report_corrupt(w, p, i);
            break;
        }
    }
    if (dirty)
        m[0] = word(p, 0);
}

/* pswpin, pswpout and pgmajfault from /proc/vmstat: the whole guest's. */
static void vmstat(long v[3])
{
    static const char *const keys[3] = {"pswpin", "pswpout", "pgmajfault"};
    char key[64];
    long value;
    FILE *f = fopen("/proc/vmstat", "r");
    v[0] = v[1] = v[2] = 0;
    while (f && fscanf(f, "%63s %ld", key, &value) == 2)
        for (int k = 0; k < 3; k++)
            if (strcmp(key, keys[k]) == 0)
                v[k] = value;
    if (f)
        fclose(f);
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    size_t end = w->first + w->count;

    pthread_barrier_wait(&barrier);
    for (size_t p = w->first; p < end; p++)
        for (size_t i = 0; i < WORDS; i++)
            mem[p * WORDS + i] = word(p, i);
    pthread_barrier_wait(&barrier); /* main: --flip */
    pthread_barrier_wait(&barrier);

    for (size_t pass = 0; pass < passes; pass++)
        for (size_t p = w->first; p < end; p++)
            touch(w, p, 1);
    pthread_barrier_wait(&barrier);

    uint64_t state = 0x243f6a8885a308d3ull ^ w->first;
    size_t n = touches / threads;
    for (size_t k = 0; k < n; k++) {
        state = mix(state);
        size_t p = w->first + state % w->count;
        unsigned char resident = 1;
        mincore(mem + p * WORDS, PAGE, &resident);
        double t0 = now();
        touch(w, p, 1);
        double us = (now() - t0) * 1e6;
        if (resident & 1)
            w->hit_us[w->hits++] = us;
        else
            w->fault_us[w->faults++] = us;
    }
    pthread_barrier_wait(&barrier);

    for (size_t p = w->first; p < end; p++)
        touch(w, p, 0);
    return NULL;
}

static double pct(double *v, size_t n, double q)
{
    return n ? v[(size_t)(q * (n - 1))] : 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: swaphog [--flip] MIB THREADS PASSES TOUCHES [RANDOM_PCT]\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "--swapon") == 0) {
        int prio = atoi(argv[3]);
        if (swapon(argv[2], SWAP_FLAG_PREFER | (prio << SWAP_FLAG_PRIO_SHIFT)) != 0) {
            fprintf(stderr, "swaphog: swapon %s: %s\n", argv[2], strerror(errno));
            return 1;
        }
        return 0;
    }
    int flip = 0;
    if (argc > 1 && strcmp(argv[1], "--flip") == 0) {
        flip = 1;
        argc--;
        argv++;
    }
    if (argc != 5 && argc != 6)
        return usage();
    size_t mib = strtoul(argv[1], NULL, 10);
    threads = strtoul(argv[2], NULL, 10);
    passes = strtoul(argv[3], NULL, 10);
    touches = strtoul(argv[4], NULL, 10);
    unsigned long random_pct = argc == 6 ? strtoul(argv[5], NULL, 10) : 25;
    if (mib == 0 || threads == 0 || threads > 256 || random_pct > 100)
        return usage();
    hashed_from = WORDS - WORDS * random_pct / 100;
    pages = mib * (1u << 20) / PAGE;

    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        fprintf(stderr, "swaphog: mmap %zu MiB: %s\n", mib, strerror(errno));
        return 1;
    }
    /* Swap moves 4 KiB pages: keep huge pages out of it. */
    madvise(mem, pages * PAGE, MADV_NOHUGEPAGE);

    struct worker *w = calloc(threads, sizeof *w);
    size_t per = touches / threads;
    pthread_barrier_init(&barrier, NULL, threads + 1);
    for (size_t k = 0; k < threads; k++) {
        w[k].first = pages * k / threads;
        w[k].count = pages * (k + 1) / threads - w[k].first;
        w[k].fault_us = malloc((per + 1) * sizeof(double));
        w[k].hit_us = malloc((per + 1) * sizeof(double));
        if (!w[k].fault_us || !w[k].hit_us)
            return 1;
        pthread_create(&w[k].thread, NULL, run, &w[k]);
    }

    struct rusage r0, r1;
    double t[5];
    long v[5][3];
    pthread_barrier_wait(&barrier);
    t[0] = now();
    vmstat(v[0]);
    pthread_barrier_wait(&barrier); /* filled */
    t[1] = now();
    vmstat(v[1]);
    if (flip) {
        mem[pages / 2 * WORDS + WORDS / 2] ^= 1ull << 17;
        printf("flipped=page-%zu\n", pages / 2);
    }
    pthread_barrier_wait(&barrier);
    pthread_barrier_wait(&barrier); /* seq passes done */
    t[2] = now();
    vmstat(v[2]);
    getrusage(RUSAGE_SELF, &r0);
    pthread_barrier_wait(&barrier); /* random touches done */
    t[3] = now();
    vmstat(v[3]);
    getrusage(RUSAGE_SELF, &r1);
    size_t corrupt = 0, faults = 0, hits = 0;
    for (size_t k = 0; k < threads; k++) {
        pthread_join(w[k].thread, NULL);
        corrupt += w[k].corrupt;
        faults += w[k].faults;
        hits += w[k].hits;
    }
    t[4] = now();
    vmstat(v[4]);

    double *fault_us = malloc((faults + 1) * sizeof(double));
    double *hit_us = malloc((hits + 1) * sizeof(double));
    size_t nf = 0, nh = 0;
    for (size_t k = 0; k < threads; k++) {
        memcpy(fault_us + nf, w[k].fault_us, w[k].faults * sizeof(double));
        nf += w[k].faults;
        memcpy(hit_us + nh, w[k].hit_us, w[k].hits * sizeof(double));
        nh += w[k].hits;
    }
    qsort(fault_us, nf, sizeof(double), cmp);
    qsort(hit_us, nh, sizeof(double), cmp);

    printf("mib=%zu threads=%zu passes=%zu touches=%zu random_pct=%lu\n", mib, threads, passes,
           touches, random_pct);
    printf("fill_s=%.3f seq_s=%.3f random_s=%.3f verify_s=%.3f total_s=%.3f\n", t[1] - t[0],
           t[2] - t[1], t[3] - t[2], t[4] - t[3], t[4] - t[0]);
    static const char *const phases[4] = {"fill", "seq", "random", "verify"};
    for (int k = 0; k < 4; k++)
        printf("%s_pswpin=%ld %s_pswpout=%ld %s_pgmajfault=%ld\n", phases[k],
               v[k + 1][0] - v[k][0], phases[k], v[k + 1][1] - v[k][1], phases[k],
               v[k + 1][2] - v[k][2]);
    printf("random_faults=%zu random_hits=%zu random_majflt=%ld\n", nf, nh,
           r1.ru_majflt - r0.ru_majflt);
    printf("swapin_p50_us=%.1f swapin_p90_us=%.1f swapin_p99_us=%.1f\n", pct(fault_us, nf, 0.5),
           pct(fault_us, nf, 0.9), pct(fault_us, nf, 0.99));
    printf("hit_p50_us=%.1f\n", pct(hit_us, nh, 0.5));
    printf("corrupt=%zu\n", corrupt);
    return corrupt ? 1 : 0;
}
