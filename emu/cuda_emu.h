//! CUDA-on-CPU shim, force-included (g++ -include) before every kernels/*.cu for the emulator.
//! Blocks run on worker threads, a block's threads as fibers on one OS thread, so
//! `__shared__` (a `static thread_local`) is that block's shared memory; barriers and warp
//! collectives are cooperative switches between the fibers (emu/runtime.cpp).
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

#define __CUDA_EMU__ 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {

/// One emulated CUDA thread as its kernel sees it.
struct ThreadCtx {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
    int linear;  // linear thread index in the block
};

/// The thread whose fiber runs now on this OS thread.
extern thread_local ThreadCtx* current;

/// Waits until every live thread of the block has arrived (`__syncthreads`).
void sync_block();
/// Each lane of the calling warp publishes `bytes` (≤ kSlotBytes) of `data`, waits for the
/// warp, and gets the base of the warp's 32 slots (slot l at base + l * kSlotBytes). The slots
/// stay valid until this warp's second collective after this one.
constexpr size_t kSlotBytes = 64;
const unsigned char* warp_allgather(const void* data, size_t bytes);

inline int lane() { return current->linear & 31; }

// ---- Hopper (sm_90a) twins: kernels/hopper.cuh calls these under __CUDA_EMU__ ----

/// The block's dynamic shared memory (the launch's byte count, 1024-byte aligned). Shared
/// addresses (`smem_addr`) are offsets into it.
unsigned char* dynamic_smem();
/// Yields to the block's other threads while this one polls (an mbarrier wait); aborts when
/// a wait never completes.
void spin();
/// `bar.sync id, count`: waits until `count` threads have arrived at named barrier `id`.
void sync_named(int id, int count);

/// The emulator's layout of a tiled TMA descriptor (the 128-byte CUtensorMap on a GPU), as
/// src/cuda/tensor_map.rs writes it: dims[0] innermost, strides in bytes (strides[0] = the
/// element size), swizzle as CUtensorMapSwizzle (0 none, 3 = 128 bytes).
struct TensorMapDesc {
    uint64_t base;
    uint64_t dims[5];
    uint64_t strides[5];
    uint32_t box[5];
    uint32_t rank, elem_bytes, swizzle;
};
static_assert(sizeof(TensorMapDesc) <= 128, "a tensor map is 128 bytes");

/// mbarrier twins on the 8-byte barrier word in dynamic shared memory.
void mbar_init(uint64_t* bar, unsigned count);
/// Adds `tx` expected bytes (may be 0), then arrives once.
void mbar_arrive(uint64_t* bar, unsigned tx);
/// Whether the phase of parity `parity` has completed; first lands the TMA copies that
/// signal this barrier (a copy becomes visible only through a wait on its barrier).
bool mbar_try_wait(uint64_t* bar, unsigned parity);
/// Queues a tiled TMA load of `map`'s box at `coords` into shared memory `dst`, completing
/// its bytes on `bar`.
void tma_load(void* dst, const TensorMapDesc* map, const int* coords, uint64_t* bar);

/// wgmma twins (one warpgroup = 128 consecutive threads): a queued m64nNk16 f16 → f32 MMA of
/// this thread's accumulator fragment `d` (N/2 floats), K-major A and B from shared-memory
/// descriptors; it executes at the `wgmma_wait` that retires its group.
void wgmma_issue(uint64_t desc_a, uint64_t desc_b, float* d, int n);
void wgmma_commit();
void wgmma_wait(int pending);

template <class T>
inline T lane_value(const unsigned char* slots, int src) {
    T v;
    std::memcpy(&v, slots + size_t(src & 31) * kSlotBytes, sizeof(T));
    return v;
}

/// Calls a kernel with its arguments unpacked from cuLaunchKernel's `void**` convention.
template <class... A, size_t... I>
inline void call_unpacked(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <class... A>
inline void call_kernel(void (*f)(A...), void** args) {
    call_unpacked(f, args, std::index_sequence_for<A...>{});
}

/// One entry of the kernel registry that build.rs generates.
struct KernelEntry {
    const char* name;
    void (*invoke)(void** args);
};

}  // namespace emu

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::current->block_idx)
#define blockDim (emu::current->block_dim)
#define gridDim (emu::current->grid_dim)
#define warpSize 32

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    int dummy = 0;
    emu::warp_allgather(&dummy, sizeof dummy);
}

template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
    return emu::lane_value<T>(emu::warp_allgather(&v, sizeof v), src);
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu::lane_value<T>(emu::warp_allgather(&v, sizeof v), emu::lane() ^ mask);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    int src = emu::lane() + int(delta);
    const unsigned char* s = emu::warp_allgather(&v, sizeof v);
    return src < 32 ? emu::lane_value<T>(s, src) : v;
}

// ---- fp16: __half is GCC's _Float16 (F16C conversions), __half2 a pair ----
typedef _Float16 __half;
struct alignas(4) __half2 {
    __half x, y;
};
struct float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline __half __float2half(float f) { return (__half)f; }
inline __half __float2half_rn(float f) { return (__half)f; }
inline __half __double2half(double d) { return (__half)d; }
inline float __half2float(__half h) { return (float)h; }
inline __half2 __floats2half2_rn(float a, float b) { return {(__half)a, (__half)b}; }
inline float2 __half22float2(__half2 h) { return {(float)h.x, (float)h.y}; }
inline __half2 __float2half2_rn(float f) { return {(__half)f, (__half)f}; }
inline __half2 __hsub2(__half2 a, __half2 b) { return {(__half)(a.x - b.x), (__half)(a.y - b.y)}; }
// One rounding, as the hardware's fused multiply-add: computed in float, rounded once.
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return {(__half)((float)a.x * (float)b.x + (float)c.x), (__half)((float)a.y * (float)b.y + (float)c.y)};
}
inline float __low2float(__half2 h) { return (float)h.x; }
inline float __high2float(__half2 h) { return (float)h.y; }

inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
// Round-to-nearest arithmetic that the compiler never contracts into an FMA (the shim is built
// without FMA instructions, so the plain operations already round once each).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// Integer atomics: blocks run on parallel worker threads, so these are real atomics.
inline int atomicOr(int* address, int val) {
    return std::atomic_ref<int>(*address).fetch_or(val);
}
using std::fmaxf;
using std::fminf;
using std::max;
using std::min;
