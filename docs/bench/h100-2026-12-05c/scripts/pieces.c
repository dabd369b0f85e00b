/* What moving a batch of scattered pieces from VRAM into registered host
 * memory costs, three ways: a cuMemcpyDtoHAsync per piece (what the CUDA
 * lane does now), one cuMemcpyBatchAsync for all (CUDA 12.8+), and one
 * gather kernel storing into the mapped host memory. Pieces are 1,000 to
 * 2,000 bytes at 64-byte-aligned places of 4 MiB (compressed pages in
 * their slots); the host side is memory of our own, locked and registered
 * with flags 0, as the plugin's staging is. Every byte is checked.
 * Then the same while another process keeps every SM busy with a kernel
 * (a GPU job beside swap): a kernel of ours must wait for the GPU's time
 * slice, a copy engine need not.
 * Loads libcuda.so.1 at run time, as the plugin does.
 *   cc -O2 -o pieces pieces.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int R;
typedef unsigned long long P;
typedef struct { int order; int src_type, src_id; int dst_type, dst_id; unsigned flags; } Attrs;
static R (*cuInit)(unsigned), (*cuDeviceGet)(int *, int),
    (*cuDevicePrimaryCtxRetain)(void **, int), (*cuCtxSetCurrent)(void *),
    (*cuMemAlloc)(P *, size_t), (*cuStreamCreate)(void **, unsigned),
    (*cuEventCreate)(void **, unsigned), (*cuMemcpyDtoHAsync)(void *, P, size_t, void *),
    (*cuEventRecord)(void *, void *), (*cuEventQuery)(void *), (*cuMemcpyHtoD)(P, const void *, size_t),
    (*cuMemHostRegister)(void *, size_t, unsigned), (*cuMemHostGetDevicePointer)(P *, void *, unsigned),
    (*cuModuleLoadDataEx)(void **, const void *, unsigned, int *, void **),
    (*cuModuleGetFunction)(void **, void *, const char *), (*cuCtxSynchronize)(void),
    (*cuLaunchKernel)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                      unsigned, void *, void **, void **),
    (*cuMemcpyBatchAsync)(P *, P *, size_t *, size_t, Attrs *, size_t *, size_t, size_t *, void *);

/* gather(desc, n): block i copies descriptor i's {u64 src, u64 dst, u64
 * len}: 16-byte words where both ends are 16-byte aligned, then bytes.
 * spin(cycles): every thread busy for that many clocks. */
static const char ptx[] =
    ".version 7.0\n.target sm_70\n.address_size 64\n"
    ".visible .entry gather(.param .u64 desc)\n{\n"
    " .reg .u64 %rd<16>; .reg .u32 %r<4>; .reg .b32 %v<4>; .reg .b16 %h<2>; .reg .pred %p<4>;\n"
    " ld.param.u64 %rd1, [desc]; cvta.to.global.u64 %rd1, %rd1;\n"
    " mov.u32 %r1, %ctaid.x; mul.wide.u32 %rd2, %r1, 24; add.u64 %rd1, %rd1, %rd2;\n"
    " ld.global.u64 %rd3, [%rd1]; ld.global.u64 %rd4, [%rd1+8]; ld.global.u64 %rd5, [%rd1+16];\n"
    " cvta.to.global.u64 %rd3, %rd3; cvta.to.global.u64 %rd4, %rd4;\n"
    " mov.u32 %r2, %tid.x; cvt.u64.u32 %rd6, %r2; mov.u32 %r3, %ntid.x; cvt.u64.u32 %rd7, %r3;\n"
    " mov.u64 %rd8, 0;\n"
    " or.b64 %rd9, %rd3, %rd4; and.b64 %rd9, %rd9, 15; setp.ne.u64 %p1, %rd9, 0; @%p1 bra BYTES;\n"
    " and.b64 %rd8, %rd5, -16; shl.b64 %rd10, %rd6, 4; shl.b64 %rd11, %rd7, 4;\n"
    "VEC:\n setp.ge.u64 %p2, %rd10, %rd8; @%p2 bra BYTES;\n"
    " add.u64 %rd12, %rd3, %rd10; add.u64 %rd13, %rd4, %rd10;\n"
    " ld.global.v4.u32 {%v0, %v1, %v2, %v3}, [%rd12]; st.global.v4.u32 [%rd13], {%v0, %v1, %v2, %v3};\n"
    " add.u64 %rd10, %rd10, %rd11; bra VEC;\n"
    "BYTES:\n add.u64 %rd10, %rd8, %rd6;\n"
    "BLOOP:\n setp.ge.u64 %p3, %rd10, %rd5; @%p3 bra DONE;\n"
    " add.u64 %rd12, %rd3, %rd10; add.u64 %rd13, %rd4, %rd10;\n"
    " ld.global.u8 %h0, [%rd12]; st.global.u8 [%rd13], %h0;\n"
    " add.u64 %rd10, %rd10, %rd7; bra BLOOP;\n"
    "DONE:\n ret;\n}\n"
    ".visible .entry spin(.param .u64 cycles)\n{\n"
    " .reg .u64 %rd<4>; .reg .pred %p1;\n"
    " ld.param.u64 %rd1, [cycles]; mov.u64 %rd2, %clock64;\n"
    "LOOP:\n mov.u64 %rd3, %clock64; sub.u64 %rd3, %rd3, %rd2; setp.lt.u64 %p1, %rd3, %rd1; @%p1 bra LOOP;\n"
    " ret;\n}\n";

static double now(void)
{ struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static int cmp(const void *a, const void *b)
{ double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }
static void report(const char *what, double *v, int n)
{
    qsort(v, n, sizeof *v, cmp);
    printf("%-44s n=%3d  p50 %8.1f  p90 %8.1f  max %8.1f us\n", what, n, v[n / 2], v[n * 9 / 10], v[n - 1]);
}
#define LOAD(f, name) do { *(void **)&f = dlsym(lib, name); if (!f) { fprintf(stderr, "no %s\n", name); return 1; } } while (0)
#define CK(x) do { R r_ = (x); if (r_) { fprintf(stderr, "%s: %d\n", #x, r_); return 1; } } while (0)

enum { AREA = 4 << 20, MAXP = 64 };
static P vram, ddst, ddesc;
static unsigned char *dst, *pattern;
static unsigned long long *desc;
static void *stream, *event, *gather;

/* Moves n pieces `reps` times by `how` (0 copies, 1 batch, 2 kernel). */
static int pieces(int how, int n, int reps, const char *when)
{
    static double tot[400], host[400];
    P srcs[MAXP], dsts[MAXP]; size_t lens[MAXP], ats[MAXP], at = 0;
    int bad = 0;
    srand(n * 7 + how);
    for (int i = 0; i < reps; i++) {
        at = 0;
        for (int k = 0; k < n; k++) {
            srcs[k] = vram + (P)(rand() % (AREA / 64 - 64)) * 64;
            lens[k] = 1000 + (size_t)(rand() % 1000);
            ats[k] = at; dsts[k] = ddst + at; at += (lens[k] + 63) / 64 * 64;
        }
        memset(dst, 0, at);
        double t0 = now();
        if (how == 0) {
            for (int k = 0; k < n; k++)
                CK(cuMemcpyDtoHAsync(dst + ats[k], srcs[k], lens[k], stream));
        } else if (how == 1) {
            Attrs a = { 1, 0, 0, 0, 0, 0 };
            size_t idx = 0, fail = 0;
            CK(cuMemcpyBatchAsync(dsts, srcs, lens, n, &a, &idx, 1, &fail, stream));
        } else {
            for (int k = 0; k < n; k++) {
                desc[3 * k] = srcs[k]; desc[3 * k + 1] = dsts[k]; desc[3 * k + 2] = lens[k];
            }
            void *args[] = { &ddesc };
            CK(cuLaunchKernel(gather, n, 1, 1, 128, 1, 1, 0, stream, args, NULL));
        }
        CK(cuEventRecord(event, stream));
        double t1 = now();
        R r; while ((r = cuEventQuery(event)) == 600) ;
        CK(r);
        tot[i] = now() - t0; host[i] = t1 - t0;
        for (int k = 0; k < n; k++)
            bad += memcmp(dst + ats[k], pattern + (srcs[k] - vram), lens[k]) != 0;
    }
    const char *name[] = { "copies", "batch copy", "gather kernel" };
    char what[96];
    snprintf(what, sizeof what, "%s%2d pieces, %s: done", when, n, name[how]); report(what, tot, reps);
    snprintf(what, sizeof what, "%s%2d pieces, %s: host", when, n, name[how]); report(what, host, reps);
    if (bad) printf("%s%d pieces, %s: %d pieces WRONG\n", when, n, name[how], bad);
    return bad;
}

static int all(const char *when, int reps)
{
    int bad = 0, ns[] = { 1, 8, 64 };
    for (int j = 0; j < 3; j++)
        for (int how = 0; how < 3; how++)
            bad += pieces(how, ns[j], reps, when);
    return bad;
}

/* The other process: its own context, every SM spun for 100 ms at a time
 * once the parent says go, until killed. */
static int busy(int go)
{
    int dev; void *ctx, *mod, *fn;
    CK(cuInit(0)); CK(cuDeviceGet(&dev, 0)); CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
    CK(cuModuleLoadDataEx(&mod, ptx, 0, NULL, NULL));
    CK(cuModuleGetFunction(&fn, mod, "spin"));
    char c;
    if (read(go, &c, 1) != 1) return 1;
    unsigned long long cycles = 200000000ULL; /* ~100 ms at 2 GHz */
    void *args[] = { &cycles };
    for (;;) {
        CK(cuLaunchKernel(fn, 1056, 1, 1, 1024, 1, 1, 0, NULL, args, NULL));
        CK(cuCtxSynchronize());
    }
}

int main(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    LOAD(cuInit, "cuInit"); LOAD(cuDeviceGet, "cuDeviceGet");
    LOAD(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"); LOAD(cuCtxSetCurrent, "cuCtxSetCurrent");
    LOAD(cuMemAlloc, "cuMemAlloc_v2"); LOAD(cuStreamCreate, "cuStreamCreate"); LOAD(cuEventCreate, "cuEventCreate");
    LOAD(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2"); LOAD(cuEventRecord, "cuEventRecord");
    LOAD(cuEventQuery, "cuEventQuery"); LOAD(cuMemcpyHtoD, "cuMemcpyHtoD_v2");
    LOAD(cuMemHostRegister, "cuMemHostRegister_v2"); LOAD(cuMemHostGetDevicePointer, "cuMemHostGetDevicePointer_v2");
    LOAD(cuModuleLoadDataEx, "cuModuleLoadDataEx"); LOAD(cuModuleGetFunction, "cuModuleGetFunction");
    LOAD(cuLaunchKernel, "cuLaunchKernel"); LOAD(cuCtxSynchronize, "cuCtxSynchronize");
    LOAD(cuMemcpyBatchAsync, "cuMemcpyBatchAsync");
    int pipefd[2];
    if (pipe(pipefd)) return 1;
    pid_t child = fork();
    if (child == 0) { close(pipefd[1]); return busy(pipefd[0]); }
    close(pipefd[0]);
    int dev; void *ctx, *mod;
    CK(cuInit(0)); CK(cuDeviceGet(&dev, 0)); CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx)); CK(cuMemAlloc(&vram, AREA));
    CK(cuStreamCreate(&stream, 1)); CK(cuEventCreate(&event, 2));
    size_t hostlen = 1 << 20;
    unsigned char *host = mmap(NULL, hostlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (host == MAP_FAILED || mlock(host, hostlen)) { perror("host memory"); return 1; }
    CK(cuMemHostRegister(host, hostlen, 0));
    P dhost;
    CK(cuMemHostGetDevicePointer(&dhost, host, 0));
    printf("registered with flags 0: device pointer %s the host pointer\n",
           dhost == (P)(size_t)host ? "is" : "is NOT");
    dst = host; ddst = dhost;
    desc = (unsigned long long *)(host + (512 << 10)); ddesc = dhost + (512 << 10);
    pattern = malloc(AREA);
    for (size_t i = 0; i < AREA; i++) pattern[i] = (unsigned char)(i * 7 + i / 4093);
    CK(cuMemcpyHtoD(vram, pattern, AREA));
    char log[8192] = "";
    int opts[] = { 5, 6 };
    void *vals[] = { log, (void *)(size_t)sizeof log };
    double t0 = now();
    R r = cuModuleLoadDataEx(&mod, ptx, 2, opts, vals);
    if (r) { printf("cuModuleLoadDataEx %d: %s\n", r, log); return 1; }
    printf("PTX compiled and loaded in %.0f us\n", now() - t0);
    CK(cuModuleGetFunction(&gather, mod, "gather"));
    int bad = all("quiet: ", 200);
    if (write(pipefd[1], "g", 1) != 1) return 1;
    struct timespec settle = { 0, 300000000 };
    nanosleep(&settle, NULL);
    bad += all("GPU busy: ", 40);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    printf("pieces wrong in all: %d\n", bad);
    return bad != 0;
}
