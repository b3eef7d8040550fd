//! Inline-PTX helpers for tensor-core convolutions (ldmatrix, mma.sync m16n8k16, cp.async),
//! each with its CPU twin for the emulator under `#ifdef __CUDA_EMU__`.
#pragma once
#include "common.cuh"

// Fragment layouts (PTX ISA, mma.m16n8k16 .f16 → .f32), g = lane / 4, t = lane % 4:
//   A (16×16, row-major), 4 regs of 2 halves: a0 (row g, k 2t..2t+1), a1 (row g+8, same k),
//     a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..)
//   B (16×8, "col": element (k, n)), 2 regs: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C/D (16×8 f32), 4 regs: c0,c1 (row g, n 2t, 2t+1), c2,c3 (row g+8, n 2t, 2t+1)

/// Loads four 8×8 fp16 matrices from shared memory; lane l gives the address of row l%8 of
/// matrix l/8 and receives, of matrix j, the two halves at (row l/4, cols 2(l%4), +1) in r[j].
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const __half* smem_row) {
#ifdef __CUDA_EMU__
    const unsigned char* s = emu::warp_allgather(&smem_row, sizeof smem_row);
    int l = emu::lane();
    for (int j = 0; j < 4; ++j) {
        const __half* row = emu::lane_value<const __half*>(s, 8 * j + l / 4);
        std::memcpy(&r[j], row + 2 * (l % 4), 4);
    }
#else
    unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

/// As ldmatrix_x4, transposed: of matrix j, lane l receives the halves at (rows 2(l%4) and
/// 2(l%4)+1, col l/4) in r[j]. From a [k][m] tile (k-major rows) it yields the A fragment of
/// an [m][k] operand, and from a [k][n] tile the B fragment.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const __half* smem_row) {
#ifdef __CUDA_EMU__
    const unsigned char* s = emu::warp_allgather(&smem_row, sizeof smem_row);
    int l = emu::lane();
    for (int j = 0; j < 4; ++j) {
        const __half* lo = emu::lane_value<const __half*>(s, 8 * j + 2 * (l % 4));
        const __half* hi = emu::lane_value<const __half*>(s, 8 * j + 2 * (l % 4) + 1);
        __half2 h = {lo[l / 4], hi[l / 4]};
        std::memcpy(&r[j], &h, 4);
    }
#else
    unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

/// d += a · b on one warp: a 16×16 (4 regs), b 16×8 (2 regs), fp16 in, fp32 accumulate.
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef __CUDA_EMU__
    struct Frag {
        unsigned a[4], b[2];
    } mine;
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
    mine.b[0] = b[0];
    mine.b[1] = b[1];
    const unsigned char* s = emu::warp_allgather(&mine, sizeof mine);
    int l = emu::lane(), g = l / 4, t = l % 4;
    auto half_at = [](unsigned reg, int hi) {
        __half2 h;
        std::memcpy(&h, &reg, 4);
        return float(hi ? h.y : h.x);
    };
    // A(row, k): lane (row%8)*4 + (k%8)/2, reg (row >= 8) + 2 (k >= 8), half k%2.
    auto A = [&](int row, int k) {
        Frag f = emu::lane_value<Frag>(s, (row % 8) * 4 + (k % 8) / 2);
        return half_at(f.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
    };
    // B(k, n): lane n*4 + (k%8)/2, reg (k >= 8), half k%2.
    auto B = [&](int k, int n) {
        Frag f = emu::lane_value<Frag>(s, n * 4 + (k % 8) / 2);
        return half_at(f.b[k >= 8 ? 1 : 0], k % 2);
    };
    float arow[2][16], bcol[2][16];
    for (int k = 0; k < 16; ++k) {
        arow[0][k] = A(g, k);
        arow[1][k] = A(g + 8, k);
        bcol[0][k] = B(k, 2 * t);
        bcol[1][k] = B(k, 2 * t + 1);
    }
    for (int i = 0; i < 4; ++i) {
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc += arow[i / 2][k] * bcol[i % 2][k];
        d[i] = acc;
    }
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

/// Copies 16 bytes global → shared asynchronously; when `valid` is false, writes 16 zero bytes
/// (src-size 0) and does not read `gmem`.
__device__ __forceinline__ void cp_async16(__half* smem, const void* gmem, bool valid) {
#ifdef __CUDA_EMU__
    if (valid)
        std::memcpy(smem, gmem, 16);
    else
        std::memset(smem, 0, 16);
#else
    unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem), "r"(n));
#endif
}

/// Closes the group of cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifndef __CUDA_EMU__
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

/// Waits until at most N committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef __CUDA_EMU__
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
