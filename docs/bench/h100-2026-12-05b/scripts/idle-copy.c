/* How long one 4 KiB copy from VRAM takes after the GPU and the caller
 * have been idle for a while, and how long a short nap really sleeps.
 * Explains the sporadic-read shape of bench/nbd-compare (one 4 KiB read
 * every 100 ms): is the first copy after idle slow (the GPU or the
 * driver waking), or does the waiting thread oversleep its naps?
 * Then the ways a 4 KiB read from VRAM can be done with the least host
 * time: the copy engine (event polled, stream polled, synchronous), a
 * kernel launched per read that stores into mapped host memory, and a
 * resident kernel that polls a mailbox in host memory and copies on
 * request (no driver call per read at all).
 * Loads libcuda.so.1 at run time, as the plugin does.
 *   cc -O2 -o idle-copy idle-copy.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

typedef int R;
typedef unsigned long long P;
static R (*cuInit)(unsigned), (*cuDeviceGet)(int *, int),
    (*cuDevicePrimaryCtxRetain)(void **, int), (*cuCtxSetCurrent)(void *),
    (*cuMemAlloc)(P *, size_t), (*cuMemAllocHost)(void **, size_t),
    (*cuStreamCreate)(void **, unsigned), (*cuEventCreate)(void **, unsigned),
    (*cuMemcpyDtoHAsync)(void *, P, size_t, void *), (*cuEventRecord)(void *, void *),
    (*cuEventQuery)(void *), (*cuStreamQuery)(void *), (*cuMemcpyDtoH)(void *, P, size_t),
    (*cuMemcpyHtoD)(P, const void *, size_t), (*cuMemHostGetDevicePointer)(P *, void *, unsigned),
    (*cuModuleLoadDataEx)(void **, const void *, unsigned, int *, void **),
    (*cuModuleGetFunction)(void **, void *, const char *),
    (*cuLaunchKernel)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                      unsigned, void *, void **, void **);

/* copy_once(dst, src, flag, seq): 256 threads copy 4 KiB from src to dst
 * (mapped host memory), fence to the system, then thread 0 stores seq to
 * flag. serve(mbox, dst, src, flag, count): the same for each new value
 * thread 0 sees at mbox (host memory), from src + (seq % 64) * 4 KiB,
 * until seq reaches count. */
static const char ptx[] =
    ".version 7.0\n.target sm_70\n.address_size 64\n"
    ".shared .align 4 .u32 s_seq;\n"
    ".visible .entry copy_once(.param .u64 dst, .param .u64 src, .param .u64 flag, .param .u32 seq)\n{\n"
    " .reg .u64 %rd<8>; .reg .u32 %r<4>; .reg .b32 %v<4>; .reg .pred %p<2>;\n"
    " ld.param.u64 %rd1, [dst]; ld.param.u64 %rd2, [src]; ld.param.u64 %rd3, [flag]; ld.param.u32 %r1, [seq];\n"
    " cvta.to.global.u64 %rd1, %rd1; cvta.to.global.u64 %rd2, %rd2; cvta.to.global.u64 %rd3, %rd3;\n"
    " mov.u32 %r2, %tid.x; mul.wide.u32 %rd4, %r2, 16; add.u64 %rd5, %rd2, %rd4; add.u64 %rd6, %rd1, %rd4;\n"
    " ld.global.v4.u32 {%v0, %v1, %v2, %v3}, [%rd5]; st.global.v4.u32 [%rd6], {%v0, %v1, %v2, %v3};\n"
    " membar.sys; barrier.sync 0;\n"
    " setp.ne.u32 %p1, %r2, 0; @%p1 bra DONE; st.volatile.global.u32 [%rd3], %r1;\nDONE:\n ret;\n}\n"
    ".visible .entry serve(.param .u64 mbox, .param .u64 dst, .param .u64 src, .param .u64 flag, .param .u32 count)\n{\n"
    " .reg .u64 %rd<12>; .reg .u32 %r<8>; .reg .b32 %v<4>; .reg .pred %p<4>;\n"
    " ld.param.u64 %rd9, [mbox]; ld.param.u64 %rd1, [dst]; ld.param.u64 %rd2, [src]; ld.param.u64 %rd3, [flag];\n"
    " ld.param.u32 %r7, [count];\n"
    " cvta.to.global.u64 %rd9, %rd9; cvta.to.global.u64 %rd1, %rd1; cvta.to.global.u64 %rd2, %rd2; cvta.to.global.u64 %rd3, %rd3;\n"
    " mov.u32 %r2, %tid.x; mul.wide.u32 %rd4, %r2, 16; add.u64 %rd6, %rd1, %rd4; mov.u32 %r3, 0;\n"
    " setp.ne.u32 %p1, %r2, 0;\n"
    "LOOP:\n @%p1 bra WAIT;\nPOLL:\n ld.volatile.global.u32 %r5, [%rd9]; setp.eq.u32 %p2, %r5, %r3; @%p2 bra POLL;\n"
    " st.shared.u32 [s_seq], %r5;\nWAIT:\n barrier.sync 0; ld.shared.u32 %r5, [s_seq]; mov.u32 %r3, %r5;\n"
    " and.b32 %r6, %r5, 63; mul.wide.u32 %rd7, %r6, 4096; add.u64 %rd8, %rd2, %rd7; add.u64 %rd8, %rd8, %rd4;\n"
    " ld.global.v4.u32 {%v0, %v1, %v2, %v3}, [%rd8]; st.global.v4.u32 [%rd6], {%v0, %v1, %v2, %v3};\n"
    " membar.sys; barrier.sync 0;\n"
    " @%p1 bra NEXT; st.volatile.global.u32 [%rd3], %r5;\nNEXT:\n"
    " setp.lt.u32 %p3, %r5, %r7; @%p3 bra LOOP;\n ret;\n}\n"
    /* gather(desc): block i copies descriptor i's {u64 src, u64 dst, u64
     * len}: 16-byte words where both ends are 16-byte aligned, then bytes. */
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
    "DONE:\n ret;\n}\n";

static double now(void)
{ struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static void sleep_us(double us)
{ struct timespec t = { (time_t)(us / 1e6), (long)((us - (time_t)(us / 1e6) * 1e6) * 1e3) }; nanosleep(&t, NULL); }
static int cmp(const void *a, const void *b)
{ double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }
static void report(const char *what, double *v, int n)
{
    double sum = 0; for (int i = 0; i < n; i++) sum += v[i];
    qsort(v, n, sizeof *v, cmp);
    printf("%-34s n=%3d  p50 %7.1f  p90 %7.1f  max %7.1f  mean %7.1f us\n", what, n, v[n / 2], v[n * 9 / 10], v[n - 1], sum / n);
}
#define LOAD(f, name) do { *(void **)&f = dlsym(lib, name); if (!f) { fprintf(stderr, "no %s\n", name); return 1; } } while (0)
#define CK(x) do { R r_ = (x); if (r_) { fprintf(stderr, "%s: %d\n", #x, r_); return 1; } } while (0)

static int kernels(P vram, void *host, void *stream, void *event)
{
    static double t[400];
    static unsigned char pattern[64 * 4096];
    for (size_t i = 0; i < sizeof pattern; i++) pattern[i] = (unsigned char)(i * 7 + i / 4096);
    CK(cuMemcpyHtoD(vram, pattern, sizeof pattern));
    /* The copy engine, three ways of waiting, back to back. */
    for (int i = 0; i < 400; i++) {
        double t0 = now();
        CK(cuMemcpyDtoHAsync(host, vram + (P)(i % 64) * 4096, 4096, stream));
        R r; while ((r = cuStreamQuery(stream)) == 600) ;
        CK(r); t[i] = now() - t0;
    }
    report("dma, stream polled", t, 400);
    for (int i = 0; i < 400; i++) {
        double t0 = now();
        CK(cuMemcpyDtoH(host, vram + (P)(i % 64) * 4096, 4096));
        t[i] = now() - t0;
    }
    report("dma, cuMemcpyDtoH (synchronous)", t, 400);
    /* Kernels: compile the PTX for this GPU. */
    char log[8192] = "";
    int opts[] = { 5, 6 };
    void *vals[] = { log, (void *)(size_t)sizeof log };
    void *mod, *once, *serve;
    R r = cuModuleLoadDataEx(&mod, ptx, 2, opts, vals);
    if (r) { printf("kernels: cuModuleLoadDataEx %d: %s\n", r, log); return 0; }
    CK(cuModuleGetFunction(&once, mod, "copy_once"));
    CK(cuModuleGetFunction(&serve, mod, "serve"));
    void *gather;
    CK(cuModuleGetFunction(&gather, mod, "gather"));
    volatile unsigned *mbox = (volatile unsigned *)((char *)host + 65536);
    volatile unsigned *flag = (volatile unsigned *)((char *)host + 65536 + 4096);
    unsigned char *dst = (unsigned char *)host + 131072;
    P dmbox, dflag, ddst;
    CK(cuMemHostGetDevicePointer(&dmbox, (void *)mbox, 0));
    CK(cuMemHostGetDevicePointer(&dflag, (void *)flag, 0));
    CK(cuMemHostGetDevicePointer(&ddst, dst, 0));
    int bad = 0;
    for (unsigned i = 1; i <= 400; i++) {
        P src = vram + (P)(i % 64) * 4096;
        void *args[] = { &ddst, &src, &dflag, &i };
        double t0 = now();
        CK(cuLaunchKernel(once, 1, 1, 1, 256, 1, 1, 0, stream, args, NULL));
        double limit = t0 + 1e6;
        while (*flag != i && now() < limit) ;
        t[i - 1] = now() - t0;
        if (*flag != i) { printf("copy_once: no flag after 1 s\n"); return 0; }
        bad += memcmp(dst, pattern + (i % 64) * 4096, 4096) != 0;
    }
    CK(cuEventRecord(event, stream));
    while (cuEventQuery(event) == 600) ;
    report("kernel launched per read", t, 400);
    printf("kernel launched per read: %d of 400 copies wrong\n", bad);
    /* A resident kernel: one launch, then a mailbox store per read. */
    *mbox = 0; *flag = 0; bad = 0;
    unsigned count = 400 + 20;
    void *args[] = { &dmbox, &ddst, &vram, &dflag, &count };
    CK(cuLaunchKernel(serve, 1, 1, 1, 256, 1, 1, 0, stream, args, NULL));
    sleep_us(10000);
    for (unsigned i = 1; i <= count; i++) {
        if (i > 400) sleep_us(100000);
        double t0 = now();
        __atomic_store_n(mbox, i, __ATOMIC_RELEASE);
        double limit = t0 + 1e6;
        while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) != i && now() < limit) ;
        double t1 = now();
        if (*flag != i) { printf("serve: no flag after 1 s at %u\n", i); *mbox = count; return 0; }
        bad += memcmp(dst, pattern + (i % 64) * 4096, 4096) != 0;
        if (i <= 400) t[i - 1] = t1 - t0; else t[i - 401] = t1 - t0;
        if (i == 400) report("resident kernel, back to back", t, 400);
    }
    report("resident kernel, 100 ms apart", t, 20);
    printf("resident kernel: %d of %u copies wrong\n", bad, count);
    CK(cuEventRecord(event, stream));
    while (cuEventQuery(event) == 600) ;
    /* A batch of 64 scattered pieces of 1,000-2,000 bytes (compressed
     * pages in their slots) into one staging buffer: 64 copies and an
     * event, or one gather kernel writing mapped host memory and an event. */
    enum { PIECES = 64 };
    unsigned long long *desc = (unsigned long long *)((char *)host + 65536 + 8192);
    P ddesc;
    CK(cuMemHostGetDevicePointer(&ddesc, desc, 0));
    size_t srcs[PIECES], lens[PIECES], ats[PIECES], at = 0;
    for (int k = 0; k < PIECES; k++) {
        srcs[k] = (size_t)((k * 37) % 64) * 4096 + (size_t)(k % 4) * 512;
        lens[k] = 1000 + (size_t)(k * 131) % 1000 / 64 * 64;
        ats[k] = at; at += (lens[k] + 15) / 16 * 16;
    }
    for (int rep = 0; rep < 2; rep++) {
        for (int i = 0; i < 200; i++) {
            memset(dst, 0, at);
            double t0 = now();
            if (rep == 0) {
                for (int k = 0; k < PIECES; k++)
                    CK(cuMemcpyDtoHAsync(dst + ats[k], vram + srcs[k], lens[k], stream));
            } else {
                for (int k = 0; k < PIECES; k++) {
                    desc[3 * k] = vram + srcs[k]; desc[3 * k + 1] = ddst + ats[k]; desc[3 * k + 2] = lens[k];
                }
                void *gargs[] = { &ddesc };
                CK(cuLaunchKernel(gather, PIECES, 1, 1, 128, 1, 1, 0, stream, gargs, NULL));
            }
            CK(cuEventRecord(event, stream));
            double t1 = now();
            while ((r = cuEventQuery(event)) == 600) ;
            CK(r);
            t[i] = now() - t0; t[200 + i] = t1 - t0;
            for (int k = 0; k < PIECES; k++)
                bad += memcmp(dst + ats[k], pattern + srcs[k], lens[k]) != 0;
        }
        report(rep ? "64 pieces: one gather kernel" : "64 pieces: 64 copies", t, 200);
        report(rep ? "64 pieces: gather, host part" : "64 pieces: copies, host part", t + 200, 200);
    }
    printf("64 pieces: %d of %d pieces wrong\n", bad, 400 * PIECES);
    return 0;
}

int main(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    LOAD(cuInit, "cuInit"); LOAD(cuDeviceGet, "cuDeviceGet");
    LOAD(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"); LOAD(cuCtxSetCurrent, "cuCtxSetCurrent");
    LOAD(cuMemAlloc, "cuMemAlloc_v2"); LOAD(cuMemAllocHost, "cuMemAllocHost_v2");
    LOAD(cuStreamCreate, "cuStreamCreate"); LOAD(cuEventCreate, "cuEventCreate");
    LOAD(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2"); LOAD(cuEventRecord, "cuEventRecord");
    LOAD(cuEventQuery, "cuEventQuery"); LOAD(cuStreamQuery, "cuStreamQuery");
    LOAD(cuMemcpyDtoH, "cuMemcpyDtoH_v2"); LOAD(cuMemcpyHtoD, "cuMemcpyHtoD_v2");
    LOAD(cuMemHostGetDevicePointer, "cuMemHostGetDevicePointer_v2");
    LOAD(cuModuleLoadDataEx, "cuModuleLoadDataEx"); LOAD(cuModuleGetFunction, "cuModuleGetFunction");
    LOAD(cuLaunchKernel, "cuLaunchKernel");
    int dev; void *ctx, *stream, *event, *host; P vram;
    CK(cuInit(0)); CK(cuDeviceGet(&dev, 0)); CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx)); CK(cuMemAlloc(&vram, 1 << 20)); CK(cuMemAllocHost(&host, 1 << 20));
    CK(cuStreamCreate(&stream, 1)); CK(cuEventCreate(&event, 2));
    static double sub[400], tot[400];
    double idles[] = { 0, 1000, 10000, 100000 };
    int reps[] = { 400, 200, 100, 40 };
    for (int k = 0; k < 4; k++) {
        for (int i = 0; i < reps[k]; i++) {
            if (idles[k] > 0) sleep_us(idles[k]);
            double t0 = now();
            CK(cuMemcpyDtoHAsync(host, vram + (P)(i % 64) * 4096, 4096, stream));
            CK(cuEventRecord(event, stream));
            double t1 = now();
            R r; while ((r = cuEventQuery(event)) == 600) ;
            CK(r);
            double t2 = now();
            sub[i] = t1 - t0; tot[i] = t2 - t0;
        }
        char what[64];
        snprintf(what, sizeof what, "after %6.0f us idle: submit", idles[k]); report(what, sub, reps[k]);
        snprintf(what, sizeof what, "after %6.0f us idle: done", idles[k]); report(what, tot, reps[k]);
    }
    /* Naps: what a thread asking for 10 or 20 us of sleep gets. */
    unsigned long slacks[] = { 0, 1000 };
    for (int s = 0; s < 2; s++) {
        if (slacks[s]) prctl(PR_SET_TIMERSLACK, slacks[s], 0, 0, 0);
        for (int len = 10; len <= 40; len *= 2) {
            for (int i = 0; i < 200; i++) { double t0 = now(); sleep_us(len); sub[i] = now() - t0; }
            char what[64];
            snprintf(what, sizeof what, "nap %d us, slack %lu ns", len, (unsigned long)prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0));
            report(what, sub, 200);
        }
    }
    kernels(vram, host, stream, event);
    return 0;
}
