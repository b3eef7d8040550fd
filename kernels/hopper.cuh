//! Hopper (sm_90a) primitives for the wgmma tier: dynamic shared memory, mbarriers, TMA tile
//! loads, wgmma m64n128k16 and named barriers, each with its CPU twin (emu/runtime.cpp).
#pragma once
#include "common.cuh"

// The Hopper code is compiled for sm_90a only (and for the emulator); other targets get
// kernels that trap, which the host never launches (src/cuda/kernels/conv_wgmma.rs).
#if defined(__CUDA_EMU__) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define M2UNET_HOPPER 1
#endif

/// A tiled TMA descriptor: the driver's opaque CUtensorMap on a GPU, emu::TensorMapDesc on
/// the emulator (written by src/cuda/tensor_map.rs).
struct __align__(128) TensorMap {
    u64 opaque[16];
};

#ifdef M2UNET_HOPPER

/// The block's dynamic shared memory (the launch's byte count).
#ifdef __CUDA_EMU__
#define DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()
#else
extern __shared__ __align__(1024) unsigned char m2unet_dynamic_smem[];
#define DYNAMIC_SMEM(name) unsigned char* name = m2unet_dynamic_smem
#endif

/// The shared-memory address of a pointer into dynamic shared memory.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
#ifdef __CUDA_EMU__
    return unsigned(static_cast<const unsigned char*>(p) - emu::dynamic_smem());
#else
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
#endif
}

__device__ __forceinline__ void mbar_init(u64* bar, unsigned count) {
#ifdef __CUDA_EMU__
    emu::mbar_init(reinterpret_cast<uint64_t*>(bar), count);
#else
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
#endif
}

/// Makes initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void mbar_init_fence() {
#ifndef __CUDA_EMU__
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
#endif
}

/// Announces `bytes` of TMA transactions for the current phase, and arrives.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, unsigned bytes) {
#ifdef __CUDA_EMU__
    emu::mbar_arrive(reinterpret_cast<uint64_t*>(bar), bytes);
#else
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(bytes));
#endif
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
#ifdef __CUDA_EMU__
    emu::mbar_arrive(reinterpret_cast<uint64_t*>(bar), 0);
#else
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)));
#endif
}

/// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, unsigned parity) {
#ifdef __CUDA_EMU__
    while (!emu::mbar_try_wait(reinterpret_cast<uint64_t*>(bar), parity)) emu::spin();
#else
    unsigned a = smem_addr(bar), done = 0;
    while (!done) {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            " selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(a), "r"(parity));
    }
#endif
}

/// TMA: the box of `map` at coordinates c0 (innermost) .. c3 into shared memory `dst`
/// (1024-byte aligned for the 128-byte swizzle); out-of-range elements are zeros; the bytes
/// complete on `bar`. Rank 2 ignores c2 and c3.
template <int RANK>
__device__ __forceinline__ void tma_load(void* dst, const TensorMap* map, u64* bar, int c0, int c1,
                                         int c2 = 0, int c3 = 0) {
#ifdef __CUDA_EMU__
    int coords[4] = {c0, c1, c2, c3};
    emu::tma_load(dst, reinterpret_cast<const emu::TensorMapDesc*>(map), coords,
                  reinterpret_cast<uint64_t*>(bar));
#else
    static_assert(RANK == 2 || RANK == 4, "tma_load: rank 2 or 4");
    if constexpr (RANK == 2)
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
            "{%2, %3}], [%4];\n" ::"r"(smem_addr(dst)),
            "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar))
            : "memory");
    else
        asm volatile(
            "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
            "{%2, %3, %4, %5}], [%6];\n" ::"r"(smem_addr(dst)),
            "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
            : "memory");
#endif
}

/// The wgmma shared-memory descriptor of a K-major fp16 operand stored as 128-byte rows (64
/// halves of K) with the 128-byte swizzle, 8-row groups 1024 bytes apart, from address `a`.
__device__ __forceinline__ u64 wgmma_desc(unsigned a) {
    return u64((a >> 4) & 0x3fff) | u64(1) << 16 | u64(1024 >> 4) << 32 | u64(1) << 62;
}

/// Orders this thread's register accesses before the warpgroup's next wgmma.
__device__ __forceinline__ void wgmma_fence() {
#ifndef __CUDA_EMU__
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#ifdef __CUDA_EMU__
    emu::wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

/// Waits until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef __CUDA_EMU__
    emu::wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

/// Pins accumulator registers in program order (an empty asm that "modifies" each), so that
/// the compiler neither reads them before the wgmma_wait that completes them nor moves their
/// initialisation past the first wgmma.
template <int R>
__device__ __forceinline__ void wgmma_pin(float (&d)[R]) {
#ifndef __CUDA_EMU__
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

/// d (64 × 128 fp32, this thread's 64-register fragment) += A (64 × 16) · Bᵀ (B 128 × 16), both
/// K-major in shared memory: register 4j + i holds row 16·warp + lane/4 + 8·(i/2), column
/// 8j + 2·(lane%4) + i%2.
__device__ __forceinline__ void wgmma_m64n128k16(float d[64], u64 desc_a, u64 desc_b) {
#ifdef __CUDA_EMU__
    emu::wgmma_issue(desc_a, desc_b, d, 128);
#else
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1, 1, 1, 0, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
          "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
          "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b));
#endif
}

/// `bar.sync id, count` among `count` threads (a multiple of 32).
__device__ __forceinline__ void sync_named(int id, int count) {
#ifdef __CUDA_EMU__
    emu::sync_named(id, count);
#else
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}

#endif  // M2UNET_HOPPER
