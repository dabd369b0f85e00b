/*
 * A stand-in for libcuda.so.1, so that the CUDA backend's code runs on
 * machines without an NVIDIA GPU (scripts/test-all builds it and runs the
 * conformance tests on it). It is no model of a GPU's speed, only of the
 * rules the driver documents, held strictly:
 *
 *  - every call but the device queries needs the device's primary context
 *    current on the calling thread, and retained (INVALID_CONTEXT
 *    otherwise): nbdkit calls in from many threads, and a lane moves
 *    between them;
 *  - async copies take only pinned host memory (registered or from
 *    cuMemHostAlloc) and ranges inside one device allocation;
 *  - each stream runs its work on a thread of its own, some of it after a
 *    delay longer than the backend's spin, so a download read before its
 *    event completes shows stale bytes; cuMemFree and cuCtxSynchronize wait
 *    for every stream, as the driver does;
 *  - cuMemcpyBatchAsync's copies run in any order, as the driver allows:
 *    last first here, and a batch whose copies overlap aborts;
 *  - new device memory holds garbage, as stale VRAM does;
 *  - registered host memory must still be mapped when it is unregistered;
 *  - when the last reference to the primary context goes, nothing made in
 *    it may be left (the real driver would free it silently).
 *
 * A broken rule returns the error the driver would, or, where the driver
 * would go on silently, aborts the process with a message. Built with
 * -DFAKE_CUDA_TOO_OLD it lacks cuMemsetD32Async, as an old driver would
 * lack an entry point, to test that the backend refuses it without a panic.
 * Built with -DFAKE_CUDA_BATCH_REFUSED its cuMemcpyBatchAsync refuses every
 * call, to test that lanes go on with a call per copy.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct ctx *CUcontext;
typedef struct stream *CUstream;
typedef struct event *CUevent;
typedef struct {
    char bytes[16];
} CUuuid;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

enum {
    ATTRIBUTE_INTEGRATED = 18,
    ATTRIBUTE_ASYNC_ENGINE_COUNT = 40,
    ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91,
};

#define EXPORT __attribute__((visibility("default")))
#define TOTAL_MEMORY (1ull << 30)
#define GARBAGE 0xA5

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("fake libcuda: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

struct ctx {
    int refs;
};
static struct ctx primary;
static int initialised;
static __thread CUcontext current;
static __thread CUcontext pushed[8];
static __thread int depth;

/* Guards everything below but a stream's queue, which has its own lock. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

enum kind { DEVICE, REGISTERED, PINNED };
static const char *const kind_names[] = {"device memory", "registered host memory",
                                         "pinned host memory"};
struct range {
    char *p;
    size_t n;
    enum kind kind;
    struct range *next;
};
static struct range *ranges;
static unsigned long long device_used;

struct op {
    char *dst;
    const char *src; /* NULL: fill */
    size_t n;
    uint32_t value;
    struct op *next;
};
struct stream {
    pthread_t thread;
    pthread_mutex_t m;
    pthread_cond_t cv;
    struct op *head, *tail;
    unsigned long long queued, done;
    int stop;
    struct stream *next;
};
static struct stream *streams;

struct event {
    struct stream *stream; /* NULL: never recorded */
    unsigned long long mark;
    struct event *next;
};
static struct event *events;

static CUresult need_ctx(void)
{
    if (!__atomic_load_n(&initialised, __ATOMIC_ACQUIRE))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (current != &primary || __atomic_load_n(&primary.refs, __ATOMIC_ACQUIRE) == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    return CUDA_SUCCESS;
}

/* The range of one of `kinds` that holds p..p+n, under `lock`. */
static struct range *find(const void *p, size_t n, unsigned kinds)
{
    for (struct range *r = ranges; r; r = r->next) {
        if (!(kinds & (1u << r->kind)))
            continue;
        if ((const char *)p >= r->p && n <= r->n && (size_t)((const char *)p - r->p) <= r->n - n)
            return r;
    }
    return NULL;
}

static void add_range(void *p, size_t n, enum kind kind)
{
    struct range *r = calloc(1, sizeof *r);
    if (!r)
        die("out of memory");
    *r = (struct range){p, n, kind, ranges};
    ranges = r;
}

/* Unlinks the range of `kind` starting at p, under `lock`. */
static struct range *take_range(const void *p, enum kind kind)
{
    for (struct range **at = &ranges; *at; at = &(*at)->next) {
        if ((*at)->p == p && (*at)->kind == kind) {
            struct range *r = *at;
            *at = r->next;
            return r;
        }
    }
    return NULL;
}

static int is_stream(struct stream *s)
{
    for (struct stream *t = streams; t; t = t->next)
        if (t == s)
            return 1;
    return 0;
}

static int is_event(struct event *e)
{
    for (struct event *t = events; t; t = t->next)
        if (t == e)
            return 1;
    return 0;
}

static void *run_stream(void *arg)
{
    struct stream *s = arg;
    unsigned seed = (unsigned)(uintptr_t)s;
    pthread_mutex_lock(&s->m);
    for (;;) {
        while (!s->head && !s->stop)
            pthread_cond_wait(&s->cv, &s->m);
        if (!s->head)
            break;
        struct op *op = s->head;
        pthread_mutex_unlock(&s->m);
        if (rand_r(&seed) % 4 == 0)
            usleep(rand_r(&seed) % 300);
        if (op->src) {
            memcpy(op->dst, op->src, op->n);
        } else {
            for (size_t i = 0; i < op->n / 4; i++)
                memcpy(op->dst + 4 * i, &op->value, 4);
        }
        pthread_mutex_lock(&s->m);
        s->head = op->next;
        if (!s->head)
            s->tail = NULL;
        free(op);
        s->done++;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->m);
    return NULL;
}

static void wait_for(struct stream *s, unsigned long long mark)
{
    pthread_mutex_lock(&s->m);
    while (s->done < mark)
        pthread_cond_wait(&s->cv, &s->m);
    pthread_mutex_unlock(&s->m);
}

static unsigned long long queued(struct stream *s)
{
    pthread_mutex_lock(&s->m);
    unsigned long long n = s->queued;
    pthread_mutex_unlock(&s->m);
    return n;
}

/* Waits for all work of every stream, under `lock`. */
static void synchronize_all(void)
{
    for (struct stream *s = streams; s; s = s->next)
        wait_for(s, queued(s));
}

static CUresult enqueue(struct stream *s, char *dst, const char *src, size_t n, uint32_t value)
{
    struct op *op = calloc(1, sizeof *op);
    if (!op)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *op = (struct op){dst, src, n, value, NULL};
    pthread_mutex_lock(&s->m);
    if (s->tail)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    s->queued++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->m);
    return CUDA_SUCCESS;
}

/* Checks and queues one async step. */
static CUresult step(CUstream s, void *device, const void *host, size_t n, int to_device,
                     int fill, uint32_t value)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    int ok = is_stream(s) && find(device, n, 1u << DEVICE) &&
             (fill || find(host, n, (1u << REGISTERED) | (1u << PINNED)));
    pthread_mutex_unlock(&lock);
    if (!ok)
        return CUDA_ERROR_INVALID_VALUE;
    if (fill)
        return enqueue(s, device, NULL, n, value);
    if (to_device)
        return enqueue(s, device, host, n, 0);
    return enqueue(s, (char *)host, device, n, 0);
}

/* Device queries. */

EXPORT CUresult cuInit(unsigned flags)
{
    if (flags)
        return CUDA_ERROR_INVALID_VALUE;
    __atomic_store_n(&initialised, 1, __ATOMIC_RELEASE);
    return CUDA_SUCCESS;
}

static CUresult need_device(CUdevice dev)
{
    if (!__atomic_load_n(&initialised, __ATOMIC_ACQUIRE))
        return CUDA_ERROR_NOT_INITIALIZED;
    return dev == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

EXPORT CUresult cuDeviceGetCount(int *count)
{
    if (!__atomic_load_n(&initialised, __ATOMIC_ACQUIRE))
        return CUDA_ERROR_NOT_INITIALIZED;
    *count = 1;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice *dev, int ordinal)
{
    CUresult r = need_device(ordinal);
    if (r)
        return r;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
{
    CUresult r = need_device(dev);
    if (r)
        return r;
    if (len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "vramswap fake CUDA device");
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev)
{
    CUresult r = need_device(dev);
    if (r)
        return r;
    memcpy(uuid->bytes, "vramswap-fakegpu", 16);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetPCIBusId(char *bus, int len, CUdevice dev)
{
    CUresult r = need_device(dev);
    if (r)
        return r;
    /* The 8-digit domain and capitals some drivers print. */
    const char *id = "00000000:0A:00.0";
    if (len < (int)strlen(id) + 1)
        return CUDA_ERROR_INVALID_VALUE;
    strcpy(bus, id);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice dev)
{
    CUresult r = need_device(dev);
    if (r)
        return r;
    switch (attribute) {
    case ATTRIBUTE_INTEGRATED:
        *value = 0;
        return CUDA_SUCCESS;
    case ATTRIBUTE_ASYNC_ENGINE_COUNT:
        *value = 2;
        return CUDA_SUCCESS;
    case ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM:
        *value = 1;
        return CUDA_SUCCESS;
    default:
        return CUDA_ERROR_INVALID_VALUE;
    }
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    CUresult r = need_device(dev);
    if (r)
        return r;
    *bytes = TOTAL_MEMORY;
    return CUDA_SUCCESS;
}

/* Contexts. */

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev)
{
    CUresult r = need_device(dev);
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    __atomic_add_fetch(&primary.refs, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&lock);
    *ctx = &primary;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    CUresult r = need_device(dev);
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    if (primary.refs == 0) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (__atomic_sub_fetch(&primary.refs, 1, __ATOMIC_ACQ_REL) == 0) {
        if (ranges)
            die("the context was released holding %zu bytes of %s", ranges->n,
                kind_names[ranges->kind]);
        if (streams)
            die("the context was released with a stream left");
        if (events)
            die("the context was released with an event left");
    }
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(CUcontext *ctx)
{
    *ctx = current;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSetCurrent(CUcontext ctx)
{
    if (ctx && ctx != &primary)
        return CUDA_ERROR_INVALID_CONTEXT;
    current = ctx;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
    if (ctx != &primary || depth == 8)
        return CUDA_ERROR_INVALID_CONTEXT;
    pushed[depth++] = current;
    current = ctx;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *ctx)
{
    if (depth == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    *ctx = current;
    current = pushed[--depth];
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize(void)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    synchronize_all();
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

/* Memory. */

EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    *free_bytes = TOTAL_MEMORY - device_used;
    pthread_mutex_unlock(&lock);
    *total = TOTAL_MEMORY;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t n)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    if (n == 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lock);
    if (device_used + n > TOTAL_MEMORY) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    char *p = aligned_alloc(256, (n + 255) / 256 * 256);
    if (!p) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memset(p, GARBAGE, n);
    add_range(p, n, DEVICE);
    device_used += n;
    pthread_mutex_unlock(&lock);
    *ptr = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr ptr)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    synchronize_all();
    struct range *range = take_range((void *)(uintptr_t)ptr, DEVICE);
    if (range) {
        device_used -= range->n;
        free(range->p);
        free(range);
    }
    pthread_mutex_unlock(&lock);
    return range ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned flags)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    if (!p || n == 0 || flags & ~0xfu)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lock);
    for (struct range *o = ranges; o; o = o->next) {
        if (o->kind != DEVICE && (char *)p < o->p + o->n && o->p < (char *)p + n) {
            pthread_mutex_unlock(&lock);
            return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
        }
    }
    add_range(p, n, REGISTERED);
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemHostUnregister(void *p)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    struct range *range = take_range(p, REGISTERED);
    pthread_mutex_unlock(&lock);
    if (!range)
        return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)range->p / page * page;
    if (msync((void *)start, (uintptr_t)range->p + range->n - start, MS_ASYNC) != 0)
        die("host memory at %p was unmapped before it was unregistered", p);
    free(range);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemHostAlloc(void **pp, size_t n, unsigned flags)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    if (n == 0 || flags & ~0x7u)
        return CUDA_ERROR_INVALID_VALUE;
    void *p = malloc(n);
    if (!p)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&lock);
    add_range(p, n, PINNED);
    pthread_mutex_unlock(&lock);
    *pp = p;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemFreeHost(void *p)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    struct range *range = take_range(p, PINNED);
    pthread_mutex_unlock(&lock);
    if (!range)
        return CUDA_ERROR_INVALID_VALUE;
    free(range->p);
    free(range);
    return CUDA_SUCCESS;
}

/* Streams and copies. */

EXPORT CUresult cuStreamCreate(CUstream *out, unsigned flags)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    if (flags & ~1u)
        return CUDA_ERROR_INVALID_VALUE;
    struct stream *s = calloc(1, sizeof *s);
    if (!s)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_init(&s->m, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (pthread_create(&s->thread, NULL, run_stream, s) != 0) {
        free(s);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_lock(&lock);
    s->next = streams;
    streams = s;
    pthread_mutex_unlock(&lock);
    *out = s;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamDestroy_v2(CUstream s)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    struct stream **at = &streams;
    while (*at && *at != s)
        at = &(*at)->next;
    if (!*at) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    *at = s->next;
    for (struct event *e = events; e; e = e->next)
        if (e->stream == s)
            e->stream = NULL;
    pthread_mutex_unlock(&lock);
    /* The driver lets queued work finish after a destroy. */
    pthread_mutex_lock(&s->m);
    s->stop = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->m);
    pthread_join(s->thread, NULL);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->m);
    free(s);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamSynchronize(CUstream s)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    int ok = is_stream(s);
    pthread_mutex_unlock(&lock);
    if (!ok)
        return CUDA_ERROR_INVALID_HANDLE;
    wait_for(s, queued(s));
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s)
{
    return step(s, (void *)(uintptr_t)dst, src, n, 1, 0, 0);
}

EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s)
{
    return step(s, (void *)(uintptr_t)src, dst, n, 0, 0, 0);
}

/* cuMemcpyBatchAsync's attributes (CUDA 12.8). */
typedef struct {
    int type, id;
} CUmemLocation;
typedef struct {
    int src_access_order; /* 1 stream, 2 during the call, 3 any */
    CUmemLocation src_hint, dst_hint;
    unsigned flags;
} CUmemcpyAttributes;

#ifdef FAKE_CUDA_BATCH_REFUSED
/* A driver that has the entry point but refuses the call (one that cannot
 * batch some memory would). */
EXPORT CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes,
                                   size_t count, CUmemcpyAttributes *attrs, size_t *attrs_idxs,
                                   size_t num_attrs, size_t *fail_idx, CUstream s)
{
    (void)dsts, (void)srcs, (void)sizes, (void)count, (void)attrs, (void)attrs_idxs;
    (void)num_attrs, (void)s;
    CUresult r = need_ctx();
    if (r)
        return r;
    if (fail_idx)
        *fail_idx = 0;
    return CUDA_ERROR_NOT_SUPPORTED;
}
#else
static size_t batched_copies;

/* Not the driver's: how many copies cuMemcpyBatchAsync has queued, for the
 * tests to see that a lane uses it. */
EXPORT size_t fake_cuda_batched_copies(void)
{
    return __atomic_load_n(&batched_copies, __ATOMIC_RELAXED);
}

static int overlap(CUdeviceptr a, size_t an, CUdeviceptr b, size_t bn)
{
    return a < b + bn && b < a + an;
}

/* CUDA 12.8's batch of copies (the symbol without _v2 keeps that ABI, with
 * failIdx). Host addresses are taken as device addresses, as unified
 * addressing allows for pinned memory. Nothing is queued unless every copy
 * passes. The driver may run a batch's copies in any order, only the
 * batch as a whole in stream order: they are queued last first, so that
 * a caller that put copies that depend on one another in one batch reads
 * the wrong bytes. */
EXPORT CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes,
                                   size_t count, CUmemcpyAttributes *attrs, size_t *attrs_idxs,
                                   size_t num_attrs, size_t *fail_idx, CUstream s)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    if (fail_idx)
        *fail_idx = SIZE_MAX;
    if (!dsts || !srcs || !sizes || count == 0 || !attrs || !attrs_idxs || num_attrs == 0 ||
        num_attrs > count || attrs_idxs[0] != 0)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t a = 0; a < num_attrs; a++) {
        if (attrs[a].src_access_order < 1 || attrs[a].src_access_order > 3 ||
            attrs[a].flags > 1 || (a > 0 && attrs_idxs[a] <= attrs_idxs[a - 1]) ||
            attrs_idxs[a] >= count)
            return CUDA_ERROR_INVALID_VALUE;
    }
    pthread_mutex_lock(&lock);
    int ok = is_stream(s);
    for (size_t i = 0; ok && i < count; i++) {
        void *dst = (void *)(uintptr_t)dsts[i], *src = (void *)(uintptr_t)srcs[i];
        size_t n = sizes[i];
        unsigned host = (1u << REGISTERED) | (1u << PINNED);
        ok = n > 0 && ((find(dst, n, 1u << DEVICE) && find(src, n, host)) ||
                       (find(src, n, 1u << DEVICE) && find(dst, n, host)));
        if (!ok && fail_idx)
            *fail_idx = i;
    }
    pthread_mutex_unlock(&lock);
    if (!ok)
        return CUDA_ERROR_INVALID_VALUE;
    /* What the driver would run in some order without a word. */
    for (size_t i = 0; i < count; i++) {
        for (size_t j = 0; j < count; j++) {
            int dst_dst = i < j && overlap(dsts[i], sizes[i], dsts[j], sizes[j]);
            if (dst_dst || (i != j && overlap(dsts[i], sizes[i], srcs[j], sizes[j])))
                die("cuMemcpyBatchAsync: copy %zu writes what copy %zu %s, and a batch's copies "
                    "run in any order",
                    i, j, dst_dst ? "writes" : "reads");
        }
    }
    __atomic_add_fetch(&batched_copies, count, __ATOMIC_RELAXED);
    for (size_t i = count; i-- > 0;) {
        r = enqueue(s, (char *)(uintptr_t)dsts[i], (const char *)(uintptr_t)srcs[i], sizes[i], 0);
        if (r)
            return r;
    }
    return CUDA_SUCCESS;
}
#endif

#ifndef FAKE_CUDA_TOO_OLD
EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t words, CUstream s)
{
    if (dst % 4 != 0 || words > SIZE_MAX / 4)
        return CUDA_ERROR_INVALID_VALUE;
    return step(s, (void *)(uintptr_t)dst, NULL, words * 4, 1, 1, value);
}
#endif

/* Events. */

EXPORT CUresult cuEventCreate(CUevent *out, unsigned flags)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    if (flags & ~0x7u)
        return CUDA_ERROR_INVALID_VALUE;
    struct event *e = calloc(1, sizeof *e);
    if (!e)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&lock);
    e->next = events;
    events = e;
    pthread_mutex_unlock(&lock);
    *out = e;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(CUevent e, CUstream s)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    if (!is_event(e) || !is_stream(s)) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    e->stream = s;
    e->mark = queued(s);
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

/* The stream and mark an event waits for (NULL: nothing). The stream is
 * used after `lock` is dropped: only the lane that owns both would destroy
 * it, and that lane is the caller. */
static CUresult event_target(struct event *e, struct stream **s, unsigned long long *mark)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    int ok = is_event(e);
    if (ok) {
        *s = e->stream;
        *mark = e->mark;
    }
    pthread_mutex_unlock(&lock);
    return ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuEventQuery(CUevent e)
{
    struct stream *s;
    unsigned long long mark;
    CUresult r = event_target(e, &s, &mark);
    if (r || !s)
        return r;
    pthread_mutex_lock(&s->m);
    int done = s->done >= mark;
    pthread_mutex_unlock(&s->m);
    return done ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

EXPORT CUresult cuEventDestroy_v2(CUevent e)
{
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&lock);
    struct event **at = &events;
    while (*at && *at != e)
        at = &(*at)->next;
    if (!*at) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    *at = e->next;
    pthread_mutex_unlock(&lock);
    free(e);
    return CUDA_SUCCESS;
}
