//! Backward of the normalisation and routing ops: train-mode BatchNorm2d + ReLU over NHWC
//! (per-chunk sums, a fixed-order finalize, the input gradient), the routing of fp16 input-part
//! gradients into a unit's fp32 dY (plain, through the 2×2 max-pool, through the ×2
//! upsampling) and the materialised ×2 upsampling the conv loader computes.
//! Equals (src/reference.rs): bn_bwd_reduce + bn_bwd_finalize + bn_bwd_apply =
//! relu_backward → bn_train_backward (NHWC as [pixels, c, 1]); grad_add = the sum of gradients
//! (split_channels' adjoint); maxpool_bwd = maxpool2x2_backward; upsample_bwd =
//! upsample2x_backward; upsample2x = upsample2x_forward (in fp16 arithmetic, bit-identical to
//! conv3x3_igemm_up's loader).
#include "common.cuh"
#include "upsample.cuh"

/// Train-mode BatchNorm2d + ReLU backward over NHWC: y = relu(z·scale + shift).
struct BnBwdParams {
    const float* dy;      // fp32 [pixels, c] gradient of y
    const __half* z;      // fp16 [pixels, c] the conv output before BN
    const float* scale;   // [c] γ·invstd (from bn_finalize)
    const float* shift;   // [c] β − mean·scale
    const float* mean;    // [c]
    const float* invstd;  // [c]
    const float* gamma;   // [c_real]
    float* partial;       // fp32 scratch [chunks][2][c]: Σ dy·mask, Σ dy·mask·x̂ per chunk
    float* dgamma;        // [c_real] written (=)
    float* dbeta;         // [c_real] written (=)
    __half* dz;           // fp16 [pixels, c] gradient of z (padding channels 0)
    int pixels, c, c_real, chunk;
};

/// Routes an fp16 input-part gradient into a unit's fp32 dY (+=).
struct GradRouteParams {
    const __half* src;  // the part gradient (its resolution depends on the kernel)
    const __half* y;    // maxpool_bwd: the unit's fp16 output at full resolution; else null
    float* dst;         // fp32 NHWC [n, h, w, c] (the unit's dY)
    int n, h, w, c;     // the destination's size, c padded
};

/// Materialises the ×2 bilinear upsampling the conv loader computes.
struct Upsample2xParams {
    const __half* x;  // [n, h, w, c] low resolution
    __half* y;        // [n, 2h, 2w, c]
    int n, h, w, c;
};

// The Rust twins (src/cuda/kernels/norm_grad.rs) assert the same sizes.
static_assert(sizeof(BnBwdParams) == 104, "BnBwdParams layout");
static_assert(sizeof(GradRouteParams) == 40, "GradRouteParams layout");
static_assert(sizeof(Upsample2xParams) == 32, "Upsample2xParams layout");

namespace norm_grad {

/// Threads of bn_bwd_reduce and bn_bwd_finalize blocks.
constexpr int THREADS = 256;
/// Pixels per thread of bn_bwd_apply (the per-channel coefficients are loaded once for them).
constexpr int APPLY_PIX = 4;

__device__ __forceinline__ void load8(const float* src, float f[8]) {
    float4 a = *reinterpret_cast<const float4*>(src);
    float4 b = *reinterpret_cast<const float4*>(src + 4);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
    f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ void store8(float* dst, const float f[8]) {
    *reinterpret_cast<float4*>(dst) = float4{f[0], f[1], f[2], f[3]};
    *reinterpret_cast<float4*>(dst + 4) = float4{f[4], f[5], f[6], f[7]};
}

/// The per-channel values of channels c0..c0+7 that the mask and x̂ need.
struct BnChannels {
    float sc[8], sh[8], mean[8], inv[8];
};

__device__ __forceinline__ void load_channels(const BnBwdParams& p, int c0, BnChannels& k) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        k.sc[e] = p.scale[c0 + e];
        k.sh[e] = p.shift[c0 + e];
        k.mean[e] = p.mean[c0 + e];
        k.inv[e] = p.invstd[c0 + e];
    }
}

/// dy·mask, the ReLU mask recomputed in fp32 exactly as bn_apply computes relu's argument.
__device__ __forceinline__ float masked(const BnChannels& k, int e, float z, float dy) {
    return z * k.sc[e] + k.sh[e] > 0.0f ? dy : 0.0f;
}

__device__ __forceinline__ float xhat(const BnChannels& k, int e, float z) {
    return (z - k.mean[e]) * k.inv[e];
}

/// The two (or, at an edge, one or three) high-resolution coordinates along an axis whose
/// upsampling (align_corners=False) reads low-resolution coordinate i of `len`, with their
/// weights; returns how many there are (a source clamped at the edge is read twice, hence
/// the weight 1: ¾ + ¼, or 1 + 0).
__device__ __forceinline__ int upsample_readers(int i, int len, int o[4], float wt[4]) {
    int k = 0;
    auto add = [&](int oi, float w) {
        o[k] = oi;
        wt[k++] = w;
    };
    if (i >= 1) add(2 * i - 1, 0.25f);
    add(2 * i, i == 0 ? 1.0f : 0.75f);
    add(2 * i + 1, i == len - 1 ? 1.0f : 0.75f);
    if (i <= len - 2) add(2 * i + 2, 0.25f);
    return k;
}

}  // namespace norm_grad

/// Grid (chunks, ⌈c/8 ÷ 256⌉), 256 threads: per-chunk Σ dy·mask and Σ dy·mask·x̂ per channel.
/// The block reads `groups` pixel rows at a time, `lanes` consecutive 8-channel vectors of each
/// (blockIdx.y selects which), so a warp's loads are contiguous; the groups' sums are then
/// added in group order.
extern "C" __global__ void __launch_bounds__(256) bn_bwd_reduce(const BnBwdParams p) {
    using namespace norm_grad;
    __shared__ float red[2][THREADS * 8];
    const int cv = p.c / 8;
    const int lanes = imin(cv, THREADS), groups = THREADS / lanes;
    const int g = threadIdx.x / lanes, l = threadIdx.x - g * lanes;
    const int v = blockIdx.y * lanes + l;
    const int p0 = blockIdx.x * p.chunk, np = imin(p.chunk, p.pixels - p0);
    if (g < groups) {
        float sb[8], sg[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) sb[e] = sg[e] = 0.0f;
        if (v < cv) {
            BnChannels k;
            load_channels(p, 8 * v, k);
            for (int i = g; i < np; i += groups) {
                const size_t off = size_t(p0 + i) * p.c + 8 * v;
                float z[8], dy[8];
                unpack8(*reinterpret_cast<const uint4*>(p.z + off), z);
                load8(p.dy + off, dy);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    float d = masked(k, e, z[e], dy[e]);
                    sb[e] += d;
                    sg[e] += d * xhat(k, e, z[e]);
                }
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            red[0][threadIdx.x * 8 + e] = sb[e];
            red[1][threadIdx.x * 8 + e] = sg[e];
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < lanes * 8; j += THREADS) {
        const int ch = blockIdx.y * lanes * 8 + j;
        if (ch >= p.c) break;
        float b = 0.0f, gm = 0.0f;
        for (int q = 0; q < groups; ++q) {
            b += red[0][q * lanes * 8 + j];
            gm += red[1][q * lanes * 8 + j];
        }
        p.partial[(size_t(blockIdx.x) * 2) * p.c + ch] = b;
        p.partial[(size_t(blockIdx.x) * 2 + 1) * p.c + ch] = gm;
    }
}

/// Grid c_real (one block per real channel), 256 threads: the chunks' sums in a fixed order (each
/// thread a strided run of chunks, then a tree) → dbeta, dgamma.
extern "C" __global__ void __launch_bounds__(256) bn_bwd_finalize(const BnBwdParams p) {
    using namespace norm_grad;
    __shared__ float sb[THREADS], sg[THREADS];
    const int c = blockIdx.x, t = threadIdx.x;
    const int chunks = (p.pixels + p.chunk - 1) / p.chunk;
    float b = 0.0f, g = 0.0f;
    for (int k = t; k < chunks; k += THREADS) {
        b += p.partial[(size_t(k) * 2) * p.c + c];
        g += p.partial[(size_t(k) * 2 + 1) * p.c + c];
    }
    sb[t] = b;
    sg[t] = g;
    block_sum_pairs(sb, sg, t, THREADS);
    if (t == 0) {
        p.dbeta[c] = sb[0];
        p.dgamma[c] = sg[0];
    }
}

/// One thread per 8-channel vector of APPLY_PIX pixels q, q + Q, q + 2Q, … (Q = ⌈pixels ÷
/// APPLY_PIX⌉, so a warp's loads stay contiguous): dz = γ·invstd/N·(N·dy·mask − dβ − x̂·dγ),
/// N = pixels; zero in the padding channels.
extern "C" __global__ void bn_bwd_apply(const BnBwdParams p) {
    using namespace norm_grad;
    const int cv = p.c / 8;
    const int q_all = (p.pixels + APPLY_PIX - 1) / APPLY_PIX;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= q_all * cv) return;
    const int q = u / cv, c0 = (u - q * cv) * 8;
    const float n = float(p.pixels);
    BnChannels k;
    load_channels(p, c0, k);
    float coef[8], db[8], dg[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const bool real = c0 + e < p.c_real;
        coef[e] = real ? p.gamma[c0 + e] * k.inv[e] / n : 0.0f;
        db[e] = real ? p.dbeta[c0 + e] : 0.0f;
        dg[e] = real ? p.dgamma[c0 + e] : 0.0f;
    }
    for (int i = 0; i < APPLY_PIX; ++i) {
        const int pix = q + i * q_all;
        if (pix >= p.pixels) break;
        const size_t off = size_t(pix) * p.c + c0;
        float z[8], dy[8], dz[8];
        unpack8(*reinterpret_cast<const uint4*>(p.z + off), z);
        load8(p.dy + off, dy);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float d = masked(k, e, z[e], dy[e]);
            dz[e] = c0 + e < p.c_real ? coef[e] * (n * d - db[e] - xhat(k, e, z[e]) * dg[e]) : 0.0f;
        }
        *reinterpret_cast<uint4*>(p.dz + off) = pack8(dz);
    }
}

/// One thread per 8-channel vector: dst += src (same size).
extern "C" __global__ void grad_add(const GradRouteParams p) {
    using namespace norm_grad;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.n * p.h * p.w * (p.c / 8)) return;
    const size_t off = size_t(u) * 8;
    float s[8], d[8];
    unpack8(*reinterpret_cast<const uint4*>(p.src + off), s);
    load8(p.dst + off, d);
#pragma unroll
    for (int e = 0; e < 8; ++e) d[e] += s[e];
    store8(p.dst + off, d);
}

/// One thread per 8-channel vector of a 2×2 window (h, w even): the window's gradient src
/// [n, h/2, w/2, c] goes to the first maximum of y in the order (0,0), (0,1), (1,0), (1,1).
extern "C" __global__ void maxpool_bwd(const GradRouteParams p) {
    using namespace norm_grad;
    const int cv = p.c / 8, hh = p.h / 2, ww = p.w / 2;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.n * hh * ww * cv) return;
    const int win = u / cv, c0 = (u - win * cv) * 8;
    const int ux = win % ww, r = win / ww;
    const int uy = r % hh, n = r / hh;
    float g[8], best[8];
    unpack8(*reinterpret_cast<const uint4*>(p.src + size_t(u) * 8), g);
    size_t off[4];
    for (int q = 0; q < 4; ++q)
        off[q] = ((size_t(n) * p.h + 2 * uy + (q >> 1)) * p.w + 2 * ux + (q & 1)) * p.c + c0;
    int arg[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    unpack8(*reinterpret_cast<const uint4*>(p.y + off[0]), best);
    for (int q = 1; q < 4; ++q) {
        float y[8];
        unpack8(*reinterpret_cast<const uint4*>(p.y + off[q]), y);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            if (y[e] > best[e]) {
                best[e] = y[e];
                arg[e] = q;
            }
        }
    }
    for (int q = 0; q < 4; ++q) {
        float d[8];
        load8(p.dst + off[q], d);
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (arg[e] == q) d[e] += g[e];
        store8(p.dst + off[q], d);
    }
}

/// One thread per 8-channel vector of a low-resolution pixel: dst += the adjoint of the ×2
/// bilinear upsampling of src [n, 2h, 2w, c], gathered from the (up to 4 × 4) high-resolution
/// pixels that read this one, in a fixed order; each weight wy·wx (a multiple of 1/16) and
/// its product with an fp16 value are exact in fp32.
extern "C" __global__ void upsample_bwd(const GradRouteParams p) {
    using namespace norm_grad;
    const int cv = p.c / 8;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.n * p.h * p.w * cv) return;
    const int pix = u / cv, c0 = (u - pix * cv) * 8;
    const int ix = pix % p.w, r = pix / p.w;
    const int iy = r % p.h, n = r / p.h;
    int oy[4], ox[4];
    float wy[4], wx[4];
    const int ny = upsample_readers(iy, p.h, oy, wy), nx = upsample_readers(ix, p.w, ox, wx);
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    for (int a = 0; a < ny; ++a)
        for (int b = 0; b < nx; ++b) {
            const size_t off = ((size_t(n) * 2 * p.h + oy[a]) * 2 * p.w + ox[b]) * p.c + c0;
            float s[8];
            unpack8(*reinterpret_cast<const uint4*>(p.src + off), s);
            const float wab = wy[a] * wx[b];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += wab * s[e];
        }
    const size_t doff = size_t(pix) * p.c + c0;
    float d[8];
    load8(p.dst + doff, d);
#pragma unroll
    for (int e = 0; e < 8; ++e) d[e] += acc[e];
    store8(p.dst + doff, d);
}

/// One thread per 8-channel vector of a high-resolution pixel: upsample_fetch + upsample_blend,
/// the same arithmetic as conv3x3_igemm_up's loader.
extern "C" __global__ void upsample2x(const Upsample2xParams p) {
    const int cv = p.c / 8, h2 = 2 * p.h, w2 = 2 * p.w;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.n * h2 * w2 * cv) return;
    const int pix = u / cv, c0 = (u - pix * cv) * 8;
    const int xx = pix % w2, r = pix / w2;
    const int yy = r % h2, n = r / h2;
    UpFetch f;
    upsample_fetch(p.x, p.h, p.w, p.c, n, yy, xx, c0, f);
    *reinterpret_cast<uint4*>(p.y + size_t(u) * 8) = upsample_blend(f);
}
