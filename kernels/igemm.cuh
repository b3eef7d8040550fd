//! The tile machinery shared by the tensor-core implicit-GEMM convolutions (conv.cu, conv_up.cu): tile sizes, the swizzled shared-memory layout and one k-tile's MMAs.
#pragma once
#include "common.cuh"
#include "ptx_helpers.cuh"

// Block tile: BM GEMM rows × BN columns, K consumed BK at a time through STAGES shared-memory
// stages. Four warps as 2 (M) × 2 (N), each computing 64 × 32 with 4 × 4 mma tiles of 16 × 8.
constexpr int BM = 128, BN = 64, BK = 32, STAGES = 4, CONV_THREADS = 128;

/// Offset (halves) of 16-byte chunk `ch` (0..3) of row `r` in a [rows][BK] fp16 tile. The
/// XOR swizzle spreads the eight rows one ldmatrix phase reads over all 32 banks.
__device__ __forceinline__ int swz(int r, int ch) { return r * BK + ((ch ^ ((r >> 1) & 3)) << 3); }

/// A warp's 64 × 32 fp32 accumulators: [16-row tile i][8-column tile j][mma C register].
struct IgemmAcc {
    float v[4][4][4];
};

__device__ __forceinline__ void igemm_zero(IgemmAcc& acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc.v[i][j][e] = 0.0f;
}

/// acc += A·Bᵀ over one k-tile held in shared memory: A [BM][BK], B [BN][BK] (swizzled), warp
/// (wm, wn) taking rows wm·64.. and columns wn·32.. .
__device__ __forceinline__ void igemm_ktile(IgemmAcc& acc, const __half* A, const __half* B, int lane,
                                            int wm, int wn) {
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
        unsigned af[4][4], bf[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int r = wm * 64 + i * 16 + (lane & 15);
            ldmatrix_x4(af[i], A + swz(r, ks * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            int r = wn * 32 + j * 16 + ((lane >> 4) << 3) + (lane & 7);
            unsigned q[4];
            ldmatrix_x4(q, B + swz(r, ks * 2 + ((lane >> 3) & 1)));
            bf[2 * j][0] = q[0];
            bf[2 * j][1] = q[1];
            bf[2 * j + 1][0] = q[2];
            bf[2 * j + 1][1] = q[3];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_16816(acc.v[i][j], af[i], bf[j]);
    }
}
