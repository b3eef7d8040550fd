//! Shared by every kernel file: fp16 types, small helpers, and the kernel parameter structs
//! (passed by value; their Rust twins in src/cuda/kernels/mod.rs must keep the same layout).
#pragma once
#ifndef __CUDA_EMU__
#include <cuda_fp16.h>
#endif

typedef unsigned long long u64;

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

/// Eight fp16 values (one 16-byte vector of an NHWC row) as floats.
__device__ __forceinline__ void unpack8(uint4 v, float f[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
    for (int i = 0; i < 4; ++i) {
        float2 p = __half22float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

__device__ __forceinline__ uint4 pack8(const float f[8]) {
    uint4 v;
    __half2* h = reinterpret_cast<__half2*>(&v);
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return v;
}

/// Maps a GEMM row (a pixel) to (image, y, x). With `quad` (H and W even) four consecutive
/// rows form one 2×2 pooling window: m = ((n·H/2 + qy)·W/2 + qx)·4 + (dy·2 + dx).
__device__ __forceinline__ void pixel_of_row(int m, int h, int w, int quad, int& n, int& y,
                                             int& x) {
    if (quad) {
        int q = m & 3, r = m >> 2, hw = w >> 1, hh = h >> 1;
        int qx = r % hw;
        r /= hw;
        int qy = r % hh;
        n = r / hh;
        y = 2 * qy + (q >> 1);
        x = 2 * qx + (q & 1);
    } else {
        x = m % w;
        int r = m / w;
        y = r % h;
        n = r / h;
    }
}

/// 3×3 convolution (stride 1, zero padding 1) as an implicit GEMM over NHWC fp16 tensors:
/// M = n·h·w output pixels, N = cout, K = 9·(cin1 + cin2), k = tap·(cin1 + cin2) + c.
struct ConvParams {
    const __half* x;   // input NHWC [n, h, w, cin1] (or [n, in_h, in_w, cin1] when upsampling)
    const __half* x2;  // second input concatenated after x's channels, [n, h, w, cin2], or null
    const __half* wt;  // weights [cout][9][cin1 + cin2] fp16
    const float* bias; // [cout]
    __half* y;         // output NHWC [n, h, w, cout]
    __half* y_pool;    // 2×2 max-pooled output [n, h/2, w/2, cout], or null
    float* partial;    // split-K: fp32 partial sums [splits][M][cout] (GEMM row order)
    float* stats;      // or null (needs splits = 1): per block of BM GEMM rows, the mean and
                       // centred sum of squares of each channel's fp16 outputs, as bn_stats
                       // writes a chunk: stats[block][0][c], stats[block][1][c]
    int n, h, w;       // output (= conv input) spatial size
    int cin1, cin2;    // channels of x and x2, multiples of 8
    int cout;          // output channels, a multiple of 8
    int in_h, in_w;    // the low-resolution size of x when it is upsampled ×2 while loading
    int relu;          // apply ReLU in the epilogue
    int quad;          // rows in 2×2-window order (needs even h and w; required for y_pool)
    int splits;        // K split over gridDim.z blocks (1: no split; > 1: conv_splitk_reduce)
    int pad_;
};

/// The first layer: 3×3 convolution of fp32 NCHW input with few channels (direct, CUDA cores).
struct ConvFirstParams {
    const float* x;    // [n, cin, h, w] fp32
    const float* wt;   // [cout_real, cin, 3, 3] fp32
    const float* bias; // [cout_real]
    __half* y;         // NHWC [n, h, w, cout]
    __half* y_pool;    // [n, h/2, w/2, cout] or null
    int n, cin, h, w;
    int cout_real;     // real output channels; channels up to cout are written as zeros
    int cout;          // padded output channels (multiple of 8)
    int relu;
    int pad_;
};

/// Per-chunk channel statistics of an NHWC fp16 tensor: partial[chunk][0][c] = mean,
/// partial[chunk][1][c] = Σ (x − mean)² over the chunk's pixels.
struct BnStatsParams {
    const __half* x;
    float* partial;
    int pixels, c, chunk, pad_;
};

/// Combines the partials into batch mean/variance, the scale/shift that apply BatchNorm,
/// (optionally) the mean and 1/sqrt(var + eps) the backward needs, and (optionally) the
/// PyTorch running-statistics update.
struct BnFinalizeParams {
    const float* partial;
    const float* gamma;   // [c_real]
    const float* beta;    // [c_real]
    float* running_mean;  // [c_real] or null
    float* running_var;   // [c_real] or null
    float* scale;         // [c] (zero beyond c_real)
    float* shift;         // [c]
    float* mean;          // [c] batch mean (zero beyond c_real), or null
    float* invstd;        // [c] 1/sqrt(var + eps) (zero beyond c_real), or null
    int chunks, pixels, chunk, c, c_real, pad_;
    float momentum, eps;
};

/// y = relu(x·scale[c] + shift[c]) over NHWC fp16, optionally also the 2×2 max-pool of y.
struct BnApplyParams {
    const __half* x;
    const float* scale;
    const float* shift;
    __half* y;
    __half* y_pool;  // or null
    int n, h, w, c;
};

/// Segmentation head: 1×1 convolution to `classes` logits (fp32 NCHW) and their argmax.
struct SegHeadParams {
    const __half* x;     // NHWC [n, h, w, c]
    const float* w;      // [classes][c_real]
    const float* bias;   // [classes]
    float* logits;       // [n, classes, h, w] or null
    unsigned char* labels;  // [n, h, w] or null
    unsigned char* costs;   // [n, h, w][classes − 1] (class_costs) or null
    int n, hw, c, c_real, classes, pad_;
};

/// Embedding-level MIL concept scores s[m,k,i] = Σ_c wt[c][k]·x[m,i,c] + b[k], pooled over
/// the instances i of each patch m: z[m,k] = GCP_i s[m,k,i] (gcp 0: max − mean, 1: max, 2: mean).
struct ConceptsGcpParams {
    const __half* x;  // NHWC [m, inst, c]
    const float* wt;  // [c_real][k] (transposed Linear weight)
    const float* bias;
    float* z;         // [m, k]
    int* arg;         // [m, k] the first instance attaining the max (as the max used), or null
    int m, inst, c, c_real, k, gcp;
};

/// The eval concept scores on tensor cores (mil_concepts_mma): as ConceptsGcpParams, with
/// fp16 weights in Linear's [k][c] layout, rows zero-padded to kc (a multiple of 32) columns.
struct ConceptsMmaParams {
    const __half* x;   // NHWC [m, inst, c]
    const __half* wt;  // [k][kc] fp16, zero beyond c_real
    const float* bias; // [k]
    float* z;          // [m, k]
    int m, inst, c, kc, k, gcp;
    int pad_[2];
};

/// y[r,o] = act(Σ_i x[r,i]·w[o,i] + b[o]) in fp32 (act 0: none, 1: ReLU).
struct LinearParams {
    const float* x;
    const float* w;
    const float* bias;
    float* y;
    int rows, fin, fout, act;
};

/// BatchNorm1d in training mode over the rows, then ReLU, with the running-stats update.
struct Bn1dTrainParams {
    const float* x;
    const float* gamma;
    const float* beta;
    float* running_mean;
    float* running_var;
    float* y;
    int rows, c;
    float momentum, eps;
};

/// GCP over the rows of each bag: g[b,k] = GCP_{r in bag b} t[r,k].
struct GcpBagsParams {
    const float* t;
    const int* bag_start;  // [bags + 1]
    float* g;
    int bags, k, gcp, pad_;
};

/// Sums a[0..n) and b[0..n) (shared memory, one entry per thread t, n a power of two) into
/// a[0] and b[0] in a fixed tree order. Every thread of the block calls it after writing its
/// entries.
__device__ __forceinline__ void block_sum_pairs(float* a, float* b, int t, int n) {
    __syncthreads();
    for (int stride = n / 2; stride > 0; stride >>= 1) {
        if (t < stride) {
            a[t] += a[t + stride];
            b[t] += b[t + stride];
        }
        __syncthreads();
    }
}

/// GCP of n values already reduced to their max and sum.
__device__ __forceinline__ float gcp_combine(int mode, float mx, float sum, int n) {
    float mean = sum / float(n);
    return mode == 0 ? mx - mean : (mode == 1 ? mx : mean);
}

/// The seg head (1×1 conv to class logits) and its argmax fused into a conv's epilogue, for
/// `segment` (conv.cu, conv_wgmma.cu).
struct SegTail {
    const float* w;          // [classes][c_real]
    const float* bias;       // [classes]
    unsigned char* labels;   // [n·h·w]
    unsigned char* costs;    // [n·h·w][classes − 1] (class_costs) or null
    int classes, c_real;     // classes ≤ 16; c_real ≤ the conv's cout ≤ its block's columns
};

/// The first of the largest of o[0..classes) (classes ≤ 16): the label rule of every seg head.
__device__ __forceinline__ int first_argmax(const float o[16], int classes) {
    int best = 0;
    float bestv = o[0];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
        if (k >= classes) break;
        if (o[k] > bestv) {
            bestv = o[k];
            best = k;
        }
    }
    return best;
}

/// The lobe-order step's costs of classes 1..classes (src/engine.rs LobeScores): −ln softmax
/// in 1/16 nat steps, rounded half away from zero and saturated at 255, summed and rounded as
/// the host does.
__device__ __forceinline__ void class_costs(const float o[16], int classes, unsigned char* out) {
    float top = o[0];
    for (int k = 1; k < classes; ++k) top = fmaxf(top, o[k]);
    float sum = 0.0f;
    for (int k = 0; k < classes; ++k) sum += expf(o[k] - top);
    const float lse = top + logf(sum);
    for (int k = 1; k < classes; ++k)
        out[k - 1] = (unsigned char)fminf(fmaxf(roundf((lse - o[k]) * 16.0f), 0.0f), 255.0f);
}

/// One pixel's class logits in seg_head's order of operations (bias, then channel by channel)
/// from value(c), channel c of the conv output as stored (fp16-rounded): its first argmax into
/// labels[pixel] and, when asked, its class costs.
template <class F>
__device__ __forceinline__ void seg_label(const SegTail& seg, F value, size_t pixel) {
    float o[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) o[k] = k < seg.classes ? seg.bias[k] : 0.0f;
    for (int c = 0; c < seg.c_real; ++c) {
        const float v = value(c);
#pragma unroll
        for (int k = 0; k < 16; ++k)
            if (k < seg.classes) o[k] += v * seg.w[k * seg.c_real + c];
    }
    seg.labels[pixel] = (unsigned char)first_argmax(o, seg.classes);
    if (seg.costs != nullptr) class_costs(o, seg.classes, seg.costs + pixel * (seg.classes - 1));
}

// The Rust twins (src/cuda/kernels/mod.rs) assert the same sizes.
static_assert(sizeof(ConvParams) == 112, "ConvParams layout");
static_assert(sizeof(ConvFirstParams) == 72, "ConvFirstParams layout");
static_assert(sizeof(BnStatsParams) == 32, "BnStatsParams layout");
static_assert(sizeof(BnFinalizeParams) == 104, "BnFinalizeParams layout");
static_assert(sizeof(BnApplyParams) == 56, "BnApplyParams layout");
static_assert(sizeof(SegHeadParams) == 72, "SegHeadParams layout");
static_assert(sizeof(ConceptsGcpParams) == 64, "ConceptsGcpParams layout");
static_assert(sizeof(LinearParams) == 48, "LinearParams layout");
static_assert(sizeof(Bn1dTrainParams) == 64, "Bn1dTrainParams layout");
static_assert(sizeof(GcpBagsParams) == 40, "GcpBagsParams layout");
