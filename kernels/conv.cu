//! 3×3 convolutions: the implicit-GEMM tensor-core kernel (mma.sync fed by ldmatrix, cp.async
//! multi-stage pipeline, swizzled shared memory, no im2col buffer; concat and bilinear ×2
//! upsampling done by the loader; bias/ReLU/2×2 max-pool in the epilogue) and the direct
//! kernel for the first layer's few fp32 input channels.
//! Equals (src/reference.rs): conv3x3_igemm = reference::conv3x3_forward of
//! concat_channels(x, x2), with bn_eval_forward folded into w and b by the host, → relu_forward
//! → maxpool2x2_forward (y_pool); conv3x3_igemm_up = the same of upsample2x_forward(x);
//! conv_splitk_reduce finishes either; conv3x3_first = conv3x3_forward → relu_forward
//! (→ maxpool2x2_forward); conv3x3_igemm_seg = conv3x3_igemm → conv1x1_forward (the seg head)
//! → argmax_channels; in train mode the epilogue's statistics = bn_train_forward's batch
//! statistics of the output (per chunk).
#include "common.cuh"
#include "igemm.cuh"
#include "upsample.cuh"

// The block tile (BM pixels × BN output channels) and its pipeline: igemm.cuh.

/// Train mode: the mean and centred sum of squares of each of the block's channels over its
/// BM GEMM rows (the fp16-rounded outputs, before BN), written where bn_stats writes a chunk of
/// BM pixels, so that bn_finalize combines them unchanged. Two passes over the accumulators
/// (sum, then squares about the mean), each reduced over the lanes of a column by shuffles
/// and over the two row warps through `red` (2·BN floats of shared memory): fixed order.
__device__ __forceinline__ void block_stats(const ConvParams& p, const IgemmAcc& acc, int m0,
                                            int n0, int wm, int wn, int lane, float* red) {
    const int g = lane >> 2, t = lane & 3;
    const int M = p.n * p.h * p.w;
    const int rows = imin(BM, M - m0);
    float mean[4][2];
    // The output of (tile i, half hf, column tile j, element e), or nothing past M or cout.
    auto value = [&](int i, int hf, int j, int e, float& v) {
        int m = m0 + wm * 64 + i * 16 + g + hf * 8;
        int col = n0 + wn * 32 + j * 8 + 2 * t + e;
        if (m >= M || col >= p.cout) return false;
        v = __half2float(__float2half_rn(acc.v[i][j][2 * hf + e] + p.bias[col]));
        return true;
    };
    for (int pass = 0; pass < 2; ++pass) {
        float s[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[j][e] = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        float v;
                        if (value(i, hf, j, e, v)) {
                            float d = pass == 0 ? v : v - mean[j][e];
                            s[j][e] += pass == 0 ? d : d * d;
                        }
                    }
#pragma unroll
                for (int off = 4; off < 32; off <<= 1) s[j][e] += __shfl_xor_sync(0xffffffffu, s[j][e], off);
            }
        if (g == 0)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) red[wm * BN + wn * 32 + j * 8 + 2 * t + e] = s[j][e];
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int c = wn * 32 + j * 8 + 2 * t + e, col = n0 + c;
                float total = red[c] + red[BN + c];
                if (pass == 0) {
                    mean[j][e] = total / float(rows);
                } else if (wm == 0 && g == 0 && col < p.cout) {
                    p.stats[(size_t(blockIdx.x) * 2) * p.cout + col] = mean[j][e];
                    p.stats[(size_t(blockIdx.x) * 2 + 1) * p.cout + col] = total;
                }
            }
        __syncthreads();
    }
}

struct ConvSegParams {
    ConvParams conv;
    SegTail seg;
};
static_assert(sizeof(ConvSegParams) == 152, "ConvSegParams layout");

/// `segment`'s seg head fused into the last decoder conv's epilogue: the conv's output (eval,
/// BN folded, ReLU, rounded to fp16 as it would be stored) is staged in shared memory and
/// each thread turns one pixel's channels into its label (seg_label); the conv's output
/// itself is never written. `tile` is BM × BN fp32 of shared memory, free once every warp is
/// past its MMAs.
__device__ __forceinline__ void seg_tail(const ConvParams& p, const SegTail& seg, const IgemmAcc& acc,
                                         int m0, int wm, int wn, int lane, float* tile) {
    const int g = lane >> 2, t = lane & 3;
    const int M = p.n * p.h * p.w;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    int row = wm * 64 + i * 16 + g + hf * 8, col = wn * 32 + j * 8 + 2 * t + e;
                    float v = col < p.cout ? acc.v[i][j][2 * hf + e] + p.bias[col] : 0.0f;
                    if (p.relu) v = fmaxf(v, 0.0f);
                    tile[row * BN + col] = __half2float(__float2half_rn(v));
                }
    __syncthreads();
    const int r = threadIdx.x, m = m0 + r;
    if (m >= M) return;
    int pn, py, px;
    pixel_of_row(m, p.h, p.w, p.quad, pn, py, px);
    seg_label(seg, [&](int c) { return tile[r * BN + c]; }, (size_t(pn) * p.h + py) * p.w + px);
}

template <bool UPSAMPLE, bool SEG = false>
__device__ __forceinline__ void conv3x3_body(const ConvParams& p, const SegTail* seg = nullptr) {
    __shared__ __align__(128) __half sa[STAGES][BM * BK];
    __shared__ __align__(128) __half sb[STAGES][BN * BK];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 1, wn = warp >> 1;
    const int M = p.n * p.h * p.w;
    const int cin = p.cin1 + p.cin2;
    const int K = 9 * cin;
    // This block's share of the k-tiles (split-K over blockIdx.z).
    const int kt_all = (K + BK - 1) / BK;
    const int kt_begin = int(blockIdx.z) * kt_all / p.splits;
    const int KT = (int(blockIdx.z) + 1) * kt_all / p.splits - kt_begin;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;

    // The loader: this thread fills 16-byte chunk `ch` of A rows row0 + 32·i and B rows
    // row0 + 32·j of every stage.
    const int ch = tid & 3, row0 = tid >> 2;
    int an[4], ay[4], ax[4];
    bool aok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int m = m0 + row0 + 32 * i;
        aok[i] = m < M;
        pixel_of_row(aok[i] ? m : 0, p.h, p.w, p.quad, an[i], ay[i], ax[i]);
    }
    // The k index of this thread's chunk in k-tile kt, with its tap (9 past the end) and channel.
    auto chunk_k = [&](int kt, int& tap, int& c) {
        int k = (kt_begin + kt) * BK + ch * 8;
        tap = k < K ? k / cin : 9;
        c = k - tap * cin;
        return k;
    };
    // Calls f(i, ok, c, yy, xx) for each A row row0 + 32·i of k-tile kt: the row reads channels
    // c..c+7 of input pixel (yy, xx) when ok, else zeros (outside the image, or past the end
    // of K).
    auto for_a_rows = [&](int kt, auto&& f) {
        int tap, c;
        chunk_k(kt, tap, c);
        int dy = tap / 3 - 1, dx = tap % 3 - 1;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int yy = ay[i] + dy, xx = ax[i] + dx;
            bool ok = tap < 9 && aok[i] && yy >= 0 && yy < p.h && xx >= 0 && xx < p.w;
            f(i, ok, c, yy, xx);
        }
    };
    // A rows through cp.async (plain and concatenated inputs).
    auto load_a = [&](int stage, int kt) {
        for_a_rows(kt, [&](int i, bool ok, int c, int yy, int xx) {
            const __half* src = p.x;
            if (ok) {
                size_t pix = (size_t(an[i]) * p.h + yy) * p.w + xx;
                src = c < p.cin1 ? p.x + pix * p.cin1 + c : p.x2 + pix * p.cin2 + (c - p.cin1);
            }
            cp_async16(&sa[stage][swz(row0 + 32 * i, ch)], src, ok);
        });
    };
    // A rows of the upsampled input: per row, the four neighbours of the vector are loaded,
    // blended and stored to shared memory. (Holding all rows' loads in registers across the
    // MMAs was measured slower on an H200: it cost occupancy.)
    auto load_up = [&](int stage, int kt) {
        for_a_rows(kt, [&](int i, bool ok, int c, int yy, int xx) {
            uint4 v = {0u, 0u, 0u, 0u};
            if (ok) {
                UpFetch f;
                upsample_fetch(p.x, p.in_h, p.in_w, p.cin1, an[i], yy, xx, c, f);
                v = upsample_blend(f);
            }
            *reinterpret_cast<uint4*>(&sa[stage][swz(row0 + 32 * i, ch)]) = v;
        });
    };
    auto load_b = [&](int stage, int kt) {
        int tap, c;
        int k = chunk_k(kt, tap, c);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            int nn = n0 + row0 + 32 * j;
            bool ok = tap < 9 && nn < p.cout;
            const __half* src = ok ? p.wt + size_t(nn) * K + k : p.wt;
            cp_async16(&sb[stage][swz(row0 + 32 * j, ch)], src, ok);
        }
    };

    IgemmAcc acc;
    igemm_zero(acc);

    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) {
            if (UPSAMPLE)
                load_up(s, s);
            else
                load_a(s, s);
            load_b(s, s);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < KT) {
            if (UPSAMPLE)
                load_up(next % STAGES, next);
            else
                load_a(next % STAGES, next);
            load_b(next % STAGES, next);
        }
        cp_async_commit();
        igemm_ktile(acc, sa[kt % STAGES], sb[kt % STAGES], lane, wm, wn);
    }
    cp_async_wait<0>();

    const int g = lane >> 2, t = lane & 3;
    if (p.splits > 1) {
        // Split-K: raw fp32 sums, reduced (with bias, ReLU and pooling) by conv_splitk_reduce.
        float* part = p.partial + size_t(blockIdx.z) * M * p.cout;
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                int m = m0 + wm * 64 + i * 16 + g + hf * 8;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    int col = n0 + wn * 32 + j * 8 + 2 * t;
                    if (m < M && col < p.cout)
                        *reinterpret_cast<float2*>(part + size_t(m) * p.cout + col) =
                            make_float2(acc.v[i][j][2 * hf], acc.v[i][j][2 * hf + 1]);
                }
            }
        return;
    }

    if constexpr (SEG) {
        seg_tail(p, *seg, acc, m0, wm, wn, lane, reinterpret_cast<float*>(&sa[0][0]));
        return;
    }
    if (p.stats != nullptr) {
        // Every warp is done reading the stages: their memory holds the reduction.
        __syncthreads();
        block_stats(p, acc, m0, n0, wm, wn, lane, reinterpret_cast<float*>(&sa[0][0]));
    }

    // Epilogue: bias, ReLU, fp16 NHWC store; the 2×2 max over rows 4q..4q+3 (lanes whose
    // g = lane/4 differ in bits 0 and 1) for the pooled output.
    const bool pool = p.y_pool != nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
    #pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            int m = m0 + wm * 64 + i * 16 + g + hf * 8;
            bool mok = m < M;
            int pn, py, px;
            pixel_of_row(mok ? m : 0, p.h, p.w, p.quad, pn, py, px);
            size_t out = ((size_t(pn) * p.h + py) * p.w + px) * p.cout;
            size_t pout = ((size_t(pn) * (p.h / 2) + py / 2) * (p.w / 2) + px / 2) * p.cout;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int col = n0 + wn * 32 + j * 8 + 2 * t;
                bool cok = col < p.cout;
                float v0 = acc.v[i][j][2 * hf] + (cok ? p.bias[col] : 0.0f);
                float v1 = acc.v[i][j][2 * hf + 1] + (cok ? p.bias[col + 1] : 0.0f);
                if (p.relu) {
                    v0 = fmaxf(v0, 0.0f);
                    v1 = fmaxf(v1, 0.0f);
                }
                if (mok && cok)
                    *reinterpret_cast<__half2*>(p.y + out + col) = __floats2half2_rn(v0, v1);
                if (pool) {
                    v0 = fmaxf(v0, __shfl_xor_sync(0xffffffffu, v0, 4));
                    v1 = fmaxf(v1, __shfl_xor_sync(0xffffffffu, v1, 4));
                    v0 = fmaxf(v0, __shfl_xor_sync(0xffffffffu, v0, 8));
                    v1 = fmaxf(v1, __shfl_xor_sync(0xffffffffu, v1, 8));
                    if ((g & 3) == 0 && mok && cok)
                        *reinterpret_cast<__half2*>(p.y_pool + pout + col) = __floats2half2_rn(v0, v1);
                }
            }
        }
    }
}

/// Grid (⌈M/128⌉, ⌈cout/64⌉, splits), 128 threads. Input x (and x2 concatenated) at full resolution.
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3x3_igemm(const ConvParams p) {
    conv3x3_body<false>(p);
}

/// As conv3x3_igemm (one column block: cout ≤ 64, no split-K, no pool), with the seg head and
/// its argmax in the epilogue instead of the output (see SegTail).
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3x3_igemm_seg(const ConvSegParams p) {
    conv3x3_body<false, true>(p.conv, &p.seg);
}

/// As conv3x3_igemm, with x the low-resolution tensor upsampled ×2 (bilinear) while loading.
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3x3_igemm_up(const ConvParams p) {
    conv3x3_body<true>(p);
}

/// Sums the split-K partials of conv3x3_igemm(_up) and applies its epilogue (bias, ReLU, fp16
/// store, 2×2 max-pool). One thread per 8 channels of a GEMM row, or of 4 rows (a pooling
/// window) when y_pool is set.
extern "C" __global__ void conv_splitk_reduce(const ConvParams p) {
    const int M = p.n * p.h * p.w;
    const bool pool = p.y_pool != nullptr;
    const int npx = pool ? 4 : 1;
    const int chunks = p.cout / 8;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= M / npx * chunks) return;
    const int c0 = (u % chunks) * 8;
    const int m0 = u / chunks * npx;
    float mx[8];
    for (int e = 0; e < 8; ++e) mx[e] = -3.4e38f;
    int pn = 0, py = 0, px = 0;
    for (int q = 0; q < npx; ++q) {
        const int m = m0 + q;
        float v[8];
        for (int e = 0; e < 8; ++e) v[e] = p.bias[c0 + e];
        for (int s = 0; s < p.splits; ++s) {
            const float* src = p.partial + (size_t(s) * M + m) * p.cout + c0;
            float4 a = *reinterpret_cast<const float4*>(src);
            float4 b = *reinterpret_cast<const float4*>(src + 4);
            v[0] += a.x, v[1] += a.y, v[2] += a.z, v[3] += a.w;
            v[4] += b.x, v[5] += b.y, v[6] += b.z, v[7] += b.w;
        }
        for (int e = 0; e < 8; ++e) {
            if (p.relu) v[e] = fmaxf(v[e], 0.0f);
            mx[e] = fmaxf(mx[e], v[e]);
        }
        pixel_of_row(m, p.h, p.w, p.quad, pn, py, px);
        *reinterpret_cast<uint4*>(p.y + ((size_t(pn) * p.h + py) * p.w + px) * p.cout + c0) = pack8(v);
    }
    if (pool) {
        size_t off = ((size_t(pn) * (p.h / 2) + py / 2) * (p.w / 2) + px / 2) * p.cout + c0;
        *reinterpret_cast<uint4*>(p.y_pool + off) = pack8(mx);
    }
}

/// One thread's share of the first layer: output channels co0..co0+7 of one pixel (POOL false)
/// or of one 2×2 window and its max (POOL true), from the 3×3 (or 4×4) input neighbourhood.
template <bool POOL>
__device__ __forceinline__ void conv_first_unit(const ConvFirstParams& p, const float* sw,
                                                const float* sbias, int n, int uy, int ux, int co0) {
    constexpr int NP = POOL ? 4 : 1, NB = POOL ? 4 : 3;
    const int y0 = POOL ? 2 * uy : uy, x0 = POOL ? 2 * ux : ux;
    float o[NP][8];
#pragma unroll
    for (int q = 0; q < NP; ++q)
#pragma unroll
        for (int e = 0; e < 8; ++e) o[q][e] = co0 + e < p.cout_real ? sbias[co0 + e] : 0.0f;
    for (int ci = 0; ci < p.cin; ++ci) {
        const float* plane = p.x + (size_t(n) * p.cin + ci) * p.h * p.w;
        float nb[NB][NB];
#pragma unroll
        for (int dy = 0; dy < NB; ++dy)
#pragma unroll
            for (int dx = 0; dx < NB; ++dx) {
                int yy = y0 + dy - 1, xx = x0 + dx - 1;
                bool in = yy >= 0 && yy < p.h && xx >= 0 && xx < p.w;
                nb[dy][dx] = in ? plane[yy * p.w + xx] : 0.0f;
            }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            if (co0 + e >= p.cout_real) continue;
            const float* wk = sw + ((co0 + e) * p.cin + ci) * 9;
#pragma unroll
            for (int tap = 0; tap < 9; ++tap)
#pragma unroll
                for (int q = 0; q < NP; ++q)
                    o[q][e] += nb[q / 2 + tap / 3][q % 2 + tap % 3] * wk[tap];
        }
    }
    float mx[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) mx[e] = -3.4e38f;
#pragma unroll
    for (int q = 0; q < NP; ++q) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            if (p.relu) o[q][e] = fmaxf(o[q][e], 0.0f);
            mx[e] = fmaxf(mx[e], o[q][e]);
        }
        int y = y0 + q / 2, x = x0 + q % 2;
        *reinterpret_cast<uint4*>(p.y + ((size_t(n) * p.h + y) * p.w + x) * p.cout + co0) = pack8(o[q]);
    }
    if (POOL) {
        size_t off = ((size_t(n) * (p.h / 2) + uy) * (p.w / 2) + ux) * p.cout + co0;
        *reinterpret_cast<uint4*>(p.y_pool + off) = pack8(mx);
    }
}

/// Direct 3×3 convolution of few-channel fp32 NCHW input to fp16 NHWC on CUDA cores: a thread
/// computes 8 output channels of a pixel, or of a 2×2 window when the pooled output is wanted
/// (consecutive threads write consecutive 16-byte pieces of a pixel). The grid is capped
/// (`conv3x3_first` in src/cuda/kernels/mod.rs) and strides over the units, so each block
/// stages the weights once for many pixels instead of once per 16.
/// Needs cout_real·cin·9 ≤ 4608 and cout_real ≤ 512.
extern "C" __global__ void __launch_bounds__(128) conv3x3_first(const ConvFirstParams p) {
    __shared__ float sw[4608];
    __shared__ float sbias[512];
    for (int i = threadIdx.x; i < p.cout_real * p.cin * 9; i += blockDim.x) sw[i] = p.wt[i];
    for (int i = threadIdx.x; i < p.cout_real; i += blockDim.x) sbias[i] = p.bias[i];
    __syncthreads();
    const bool pool = p.y_pool != nullptr;
    const int hh = pool ? p.h / 2 : p.h, ww = pool ? p.w / 2 : p.w;
    const int chunks = p.cout / 8;
    const int units = p.n * hh * ww * chunks;
    for (int u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
        const int unit = u / chunks;
        const int co0 = (u - unit * chunks) * 8;
        const int ux = unit % ww, r = unit / ww;
        const int uy = r % hh, n = r / hh;
        if (pool)
            conv_first_unit<true>(p, sw, sbias, n, uy, ux, co0);
        else
            conv_first_unit<false>(p, sw, sbias, n, uy, ux, co0);
    }
}
