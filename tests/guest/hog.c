/*
 * hog: fills memory with a pattern that names every 8-byte word (seed,
 * page index, word index), so that a page that comes back from swap
 * corrupted, stale, zeroed or swapped with another is caught, then reads
 * every page back and counts the bad ones.
 *
 *   hog [--hold FILE] MIB SEED
 *
 * With --hold, after writing it prints "hog SEED: written" and waits until
 * FILE exists before verifying (the scenario swaps, stops, kills... in
 * between). Prints "hog SEED: MIB MiB, N pages, M corrupt" and exits 0 only
 * when M is 0; 2 for bad arguments. A page lost with its swap device kills
 * the hog with SIGBUS, which the caller sees as its exit status.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / sizeof(uint64_t))

static uint64_t word(uint64_t seed, uint64_t page, uint64_t i)
{
    return (seed << 48) ^ (page << 9) ^ i ^ 0x5a5a000000000000ull;
}

static int usage(void)
{
    fprintf(stderr, "usage: hog [--hold FILE] MIB SEED\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *hold = NULL;
    if (argc > 2 && strcmp(argv[1], "--hold") == 0) {
        hold = argv[2];
        argc -= 2;
        argv += 2;
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
            mem[p * WORDS + i] = word(seed, p, i);

    if (hold) {
        printf("hog %llu: written\n", (unsigned long long)seed);
        fflush(stdout);
        while (access(hold, F_OK) != 0)
            usleep(100000);
    }

    size_t corrupt = 0;
    for (size_t p = 0; p < pages; p++) {
        for (size_t i = 0; i < WORDS; i++) {
            if (mem[p * WORDS + i] != word(seed, p, i)) {
                if (corrupt < 5)
                    fprintf(stderr, "hog %llu: page %zu word %zu: %016llx, expected %016llx\n",
                            (unsigned long long)seed, p, i,
                            (unsigned long long)mem[p * WORDS + i],
                            (unsigned long long)word(seed, p, i));
                corrupt++;
                break;
            }
        }
    }
    printf("hog %llu: %lu MiB, %zu pages, %zu corrupt\n", (unsigned long long)seed, mib, pages,
           corrupt);
    return corrupt == 0 ? 0 : 1;
}
