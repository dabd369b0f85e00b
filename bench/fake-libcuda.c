/* A stand-in libcuda.so.1 with host memory behind it, for hosts with no
 * NVIDIA GPU. It implements exactly the driver calls nbd-vram resolves with
 * dlsym, so nbd-vram's NBD side (handshake, batching, connection handling)
 * can be tested against libnbd clients here. Timings from it mean nothing.
 * Built by `bench/peers fake-libcuda DIR`. */
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

CUresult cuInit(unsigned flags) { (void)flags; return 0; }
CUresult cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; return 0; }
CUresult cuCtxCreate_v2(void **ctx, unsigned flags, int dev)
{ (void)flags; (void)dev; *ctx = (void *)1; return 0; }
CUresult cuCtxDestroy_v2(void *ctx) { (void)ctx; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { (void)ctx; return 0; }
/* 2 = CUDA_ERROR_OUT_OF_MEMORY, so nbd-vram's back-off path still works. */
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n)
{ void *m = calloc(1, n); if (!m) return 2; *p = (CUdeviceptr)m; return 0; }
CUresult cuMemFree_v2(CUdeviceptr p) { free((void *)p); return 0; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *h, size_t n, void *s)
{ (void)s; memcpy((void *)d, h, n); return 0; }
CUresult cuMemcpyDtoHAsync_v2(void *h, CUdeviceptr d, size_t n, void *s)
{ (void)s; memcpy(h, (void *)d, n); return 0; }
CUresult cuStreamCreate(void **s, unsigned flags) { (void)flags; *s = (void *)1; return 0; }
CUresult cuStreamDestroy_v2(void *s) { (void)s; return 0; }
CUresult cuStreamSynchronize(void *s) { (void)s; return 0; }
CUresult cuMemAllocHost_v2(void **p, size_t n) { *p = malloc(n); return *p ? 0 : 2; }
CUresult cuMemFreeHost(void *p) { free(p); return 0; }
CUresult cuGetErrorString(CUresult r, const char **s)
{ *s = r == 2 ? "out of memory (fake libcuda)" : "error (fake libcuda)"; return 0; }
