//! BatchNorm in training mode over NHWC fp16 activations (per-chunk statistics, a
//! deterministic combination into scale/shift with the running-stats update, and the
//! BN + ReLU (+ 2×2 max-pool) application), and BatchNorm1d for the MIL head.
//! Equals (src/reference.rs): bn_stats + bn_finalize + bn_apply = reference::bn_train_forward
//! (NHWC as [pixels, c, 1]) → relu_forward (→ maxpool2x2_forward), running statistics as
//! bn_running_update; bn1d_train_relu = bn_train_forward (hw = 1) → relu_forward, with
//! bn_running_update.
#include "common.cuh"

/// Grid ⌈pixels/chunk⌉, any block size: per-chunk mean and centred sum of squares per channel.
extern "C" __global__ void bn_stats(const BnStatsParams p) {
    const int p0 = blockIdx.x * p.chunk;
    const int np = imin(p.chunk, p.pixels - p0);
    for (int c = threadIdx.x; c < p.c; c += blockDim.x) {
        const __half* x = p.x + size_t(p0) * p.c + c;
        float s = 0.0f;
        for (int i = 0; i < np; ++i) s += __half2float(x[size_t(i) * p.c]);
        float mean = s / float(np), m2 = 0.0f;
        for (int i = 0; i < np; ++i) {
            float d = __half2float(x[size_t(i) * p.c]) - mean;
            m2 += d * d;
        }
        p.partial[(size_t(blockIdx.x) * 2) * p.c + c] = mean;
        p.partial[(size_t(blockIdx.x) * 2 + 1) * p.c + c] = m2;
    }
}

/// Chan et al.'s pairwise combination of (count, mean, M2) summaries.
__device__ __forceinline__ void chan_combine(float& n, float& mean, float& m2, float nb,
                                             float meanb, float m2b) {
    float tot = n + nb;
    if (nb == 0.0f) return;
    float delta = meanb - mean;
    mean += delta * (nb / tot);
    m2 += m2b + delta * delta * (n * nb / tot);
    n = tot;
}

/// Grid c (one block per channel), 256 threads.
extern "C" __global__ void __launch_bounds__(256) bn_finalize(const BnFinalizeParams p) {
    __shared__ float sn[256], smean[256], sm2[256];
    const int c = blockIdx.x, t = threadIdx.x;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int k = t; k < p.chunks; k += 256) {
        float nb = float(imin(p.chunk, p.pixels - k * p.chunk));
        chan_combine(n, mean, m2, nb, p.partial[(size_t(k) * 2) * p.c + c],
                     p.partial[(size_t(k) * 2 + 1) * p.c + c]);
    }
    sn[t] = n;
    smean[t] = mean;
    sm2[t] = m2;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (t < stride) {
            float a = sn[t], am = smean[t], a2 = sm2[t];
            chan_combine(a, am, a2, sn[t + stride], smean[t + stride], sm2[t + stride]);
            sn[t] = a;
            smean[t] = am;
            sm2[t] = a2;
        }
        __syncthreads();
    }
    if (t != 0) return;
    const bool real = c < p.c_real;
    float cnt = sn[0], bmean = smean[0], var = sm2[0] / cnt;
    float invstd = rsqrtf(var + p.eps);
    if (p.mean != nullptr) p.mean[c] = real ? bmean : 0.0f;
    if (p.invstd != nullptr) p.invstd[c] = real ? invstd : 0.0f;
    if (!real) {
        p.scale[c] = 0.0f;
        p.shift[c] = 0.0f;
        return;
    }
    float scale = p.gamma[c] * invstd;
    p.scale[c] = scale;
    p.shift[c] = p.beta[c] - bmean * scale;
    if (p.running_mean != nullptr) {
        float unbiased = cnt > 1.0f ? sm2[0] / (cnt - 1.0f) : var;
        p.running_mean[c] = (1.0f - p.momentum) * p.running_mean[c] + p.momentum * bmean;
        p.running_var[c] = (1.0f - p.momentum) * p.running_var[c] + p.momentum * unbiased;
    }
}

/// One thread per 8-channel vector of a pixel, or of a 2×2 window when pooling.
extern "C" __global__ void bn_apply(const BnApplyParams p) {
    const bool pool = p.y_pool != nullptr;
    const int cv = p.c / 8;
    const int hh = pool ? p.h / 2 : p.h, ww = pool ? p.w / 2 : p.w;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.n * hh * ww * cv) return;
    const int pix = u / cv, c0 = (u - pix * cv) * 8;
    const int ux = pix % ww, r = pix / ww;
    const int uy = r % hh, n = r / hh;
    float sc[8], sh[8], mx[8];
    for (int e = 0; e < 8; ++e) {
        sc[e] = p.scale[c0 + e];
        sh[e] = p.shift[c0 + e];
        mx[e] = 0.0f;
    }
    const int npx = pool ? 4 : 1;
    for (int q = 0; q < npx; ++q) {
        int y = pool ? 2 * uy + (q >> 1) : uy, x = pool ? 2 * ux + (q & 1) : ux;
        size_t off = ((size_t(n) * p.h + y) * p.w + x) * p.c + c0;
        float v[8];
        unpack8(*reinterpret_cast<const uint4*>(p.x + off), v);
        for (int e = 0; e < 8; ++e) {
            v[e] = fmaxf(v[e] * sc[e] + sh[e], 0.0f);
            mx[e] = fmaxf(mx[e], v[e]);
        }
        *reinterpret_cast<uint4*>(p.y + off) = pack8(v);
    }
    if (pool)
        *reinterpret_cast<uint4*>(p.y_pool + ((size_t(n) * hh + uy) * ww + ux) * p.c + c0) = pack8(mx);
}

/// One thread per channel: batch statistics over the rows, normalise, ReLU, running update.
extern "C" __global__ void bn1d_train_relu(const Bn1dTrainParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.c) return;
    float s = 0.0f;
    for (int r = 0; r < p.rows; ++r) s += p.x[size_t(r) * p.c + c];
    float mean = s / float(p.rows), m2 = 0.0f;
    for (int r = 0; r < p.rows; ++r) {
        float d = p.x[size_t(r) * p.c + c] - mean;
        m2 += d * d;
    }
    float var = m2 / float(p.rows);
    float scale = p.gamma[c] * rsqrtf(var + p.eps), shift = p.beta[c] - mean * scale;
    for (int r = 0; r < p.rows; ++r)
        p.y[size_t(r) * p.c + c] = fmaxf(p.x[size_t(r) * p.c + c] * scale + shift, 0.0f);
    float unbiased = p.rows > 1 ? m2 / float(p.rows - 1) : var;
    p.running_mean[c] = (1.0f - p.momentum) * p.running_mean[c] + p.momentum * mean;
    p.running_var[c] = (1.0f - p.momentum) * p.running_var[c] + p.momentum * unbiased;
}
