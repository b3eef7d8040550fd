//! The network's heads: the segmentation head (1×1 conv to class logits + argmax) and the
//! hierarchical MIL head (concept scores with GCP pooling, small dense layers, bag pooling).
//! Equals (src/reference.rs): seg_head = reference::conv1x1_forward and argmax_channels;
//! mil_concepts_gcp and mil_concepts_mma (eval: fp16 weights on tensor cores) =
//! linear_forward over the instance rows → gcp_forward over each patch's instances;
//! linear_f32 = linear_forward (→ relu_forward with act 1); gcp_bags = gcp_forward.
#include "common.cuh"
#include "igemm.cuh"

/// One thread per pixel. Needs classes ≤ 16 and classes·c_real ≤ 4096.
extern "C" __global__ void seg_head(const SegHeadParams p) {
    __shared__ float sw[4096];
    __shared__ float sb[16];
    for (int i = threadIdx.x; i < p.classes * p.c_real; i += blockDim.x) sw[i] = p.w[i];
    for (int i = threadIdx.x; i < p.classes; i += blockDim.x) sb[i] = p.bias[i];
    __syncthreads();
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.n * p.hw) return;
    const int n = u / p.hw, pix = u - n * p.hw;
    // Fixed-size register accumulators (predicated on k < classes).
    float o[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) o[k] = k < p.classes ? sb[k] : 0.0f;
    const __half* x = p.x + size_t(u) * p.c;
    for (int c0 = 0; c0 < p.c_real; c0 += 8) {
        float v[8];
        unpack8(*reinterpret_cast<const uint4*>(x + c0), v);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            if (c0 + e >= p.c_real) break;
#pragma unroll
            for (int k = 0; k < 16; ++k)
                if (k < p.classes) o[k] += v[e] * sw[k * p.c_real + c0 + e];
        }
    }
    if (p.logits != nullptr)
#pragma unroll
        for (int k = 0; k < 16; ++k)
            if (k < p.classes) p.logits[(size_t(n) * p.classes + k) * p.hw + pix] = o[k];
    if (p.labels != nullptr) p.labels[u] = (unsigned char)first_argmax(o, p.classes);
    if (p.costs != nullptr) class_costs(o, p.classes, p.costs + size_t(u) * (p.classes - 1));
}

/// Grid (m, ⌈k/32⌉), 256 threads: 32 concepts × 8 warps, warp w scoring instances w, w+8, …
/// (8·U instance rows staged in shared memory at a time, U ≤ 4 of them per warp scored
/// together so that each weight load feeds U independent sums), then max/sum combined over
/// the warps. Each score is the same sequential sum over the channels whatever U is. The first
/// instance attaining the max (`arg`) is the lowest index among equal maxima.
/// Needs c_real ≤ 2048.
extern "C" __global__ void __launch_bounds__(256) mil_concepts_gcp(const ConceptsGcpParams p) {
    __shared__ __half sx[16384];
    __shared__ float smax[8][32], ssum[8][32];
    __shared__ int sarg[8][32];
    const int m = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int k = blockIdx.y * 32 + lane;
    const bool kok = k < p.k;
    const float b = kok ? p.bias[k] : 0.0f;
    const int U = imax(1, imin(4, 16384 / (8 * p.c_real))), R = 8 * U;
    float mx = -3.4e38f, sum = 0.0f;
    int arg = p.inst;  // beyond every instance: loses every tie
    for (int i0 = 0; i0 < p.inst; i0 += R) {
        __syncthreads();
        const int rows = imin(R, p.inst - i0);
        for (int e = threadIdx.x; e < rows * p.c_real; e += 256) {
            int r = e / p.c_real, c = e - r * p.c_real;
            sx[r * p.c_real + c] = p.x[(size_t(m) * p.inst + i0 + r) * p.c + c];
        }
        __syncthreads();
        if (!kok || warp >= rows) continue;
        float s[4] = {b, b, b, b};
        for (int c = 0; c < p.c_real; ++c) {
            const float wv = p.wt[size_t(c) * p.k + k];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (u < U) s[u] += __half2float(sx[(warp + 8 * u) * p.c_real + c]) * wv;
        }
        // A warp's instances come in increasing order: strict > keeps the first maximum.
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            if (u >= U || warp + 8 * u >= rows) break;
            if (s[u] > mx || arg == p.inst) {
                mx = s[u];
                arg = i0 + warp + 8 * u;
            }
            sum += s[u];
        }
    }
    smax[warp][lane] = mx;
    ssum[warp][lane] = sum;
    sarg[warp][lane] = arg;
    __syncthreads();
    if (warp == 0 && kok) {
        for (int w = 1; w < 8; ++w) {
            float v = smax[w][lane];
            int a = sarg[w][lane];
            if (a < p.inst && (v > mx || (v == mx && a < arg))) {
                mx = v;
                arg = a;
            }
            sum += ssum[w][lane];
        }
        p.z[size_t(m) * p.k + k] = gcp_combine(p.gcp, mx, sum, p.inst);
        if (p.arg != nullptr) p.arg[size_t(m) * p.k + k] = arg;
    }
}

/// Grid (m, ⌈k/64⌉), 128 threads: the concept scores of one patch's instances for 64 concepts
/// as a GEMM on tensor cores (128 instance rows at a time, the conv kernels' tiles: A = the
/// instances' channels, B = the concepts' fp16 weights), whose epilogue reduces each column's
/// max and sum over the instances; z = gcp_combine of them. Needs kc ≥ c, kc % 32 == 0.
extern "C" __global__ void __launch_bounds__(CONV_THREADS) mil_concepts_mma(const ConceptsMmaParams p) {
    __shared__ __align__(128) __half sa[STAGES][BM * BK];
    __shared__ __align__(128) __half sb[STAGES][BN * BK];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 1, wn = warp >> 1, g = lane >> 2, t = lane & 3;
    const int m = blockIdx.x, n0 = blockIdx.y * BN;
    const int KT = p.kc / BK;
    const int ch = tid & 3, row0 = tid >> 2;
    const __half* xm = p.x + size_t(m) * p.inst * p.c;
    // Column tid's running max and sum over the row tiles.
    float run_mx = -3.4e38f, run_sum = 0.0f;
    for (int r0 = 0; r0 < p.inst; r0 += BM) {
        auto load = [&](int stage, int kt) {
            const int c = kt * BK + ch * 8;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = r0 + row0 + 32 * i;
                const bool ok = r < p.inst && c < p.c;
                cp_async16(&sa[stage][swz(row0 + 32 * i, ch)], ok ? xm + size_t(r) * p.c + c : p.x, ok);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int n = n0 + row0 + 32 * j;
                const bool ok = n < p.k;
                cp_async16(&sb[stage][swz(row0 + 32 * j, ch)], ok ? p.wt + size_t(n) * p.kc + c : p.wt, ok);
            }
        };
        IgemmAcc acc;
        igemm_zero(acc);
        __syncthreads();  // the previous row tile's reduction is done with the stages
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < KT) load(s, s);
            cp_async_commit();
        }
        for (int kt = 0; kt < KT; ++kt) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();
            const int next = kt + STAGES - 1;
            if (next < KT) load(next % STAGES, next);
            cp_async_commit();
            igemm_ktile(acc, sa[kt % STAGES], sb[kt % STAGES], lane, wm, wn);
        }
        cp_async_wait<0>();
        __syncthreads();
        // Per column: max and sum of this thread's rows, then over the 8 lanes sharing t, then
        // over wm (through the stages' memory: [wm][BN] maxima, then [wm][BN] sums).
        float* red = reinterpret_cast<float*>(&sa[0][0]);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = wn * 32 + j * 8 + 2 * t + e;
                const float b = n0 + col < p.k ? p.bias[n0 + col] : 0.0f;
                float mx = -3.4e38f, sum = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        const int r = r0 + wm * 64 + i * 16 + g + hf * 8;
                        if (r < p.inst) {
                            const float v = acc.v[i][j][2 * hf + e] + b;
                            mx = fmaxf(mx, v);
                            sum += v;
                        }
                    }
#pragma unroll
                for (int off = 4; off < 32; off <<= 1) {
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                    sum += __shfl_xor_sync(0xffffffffu, sum, off);
                }
                if (g == 0) {
                    red[wm * BN + col] = mx;
                    red[2 * BN + wm * BN + col] = sum;
                }
            }
        __syncthreads();
        if (tid < BN) {
            run_mx = fmaxf(run_mx, fmaxf(red[tid], red[BN + tid]));
            run_sum += red[2 * BN + tid] + red[3 * BN + tid];
        }
    }
    if (tid < BN && n0 + tid < p.k) p.z[size_t(m) * p.k + n0 + tid] = gcp_combine(p.gcp, run_mx, run_sum, p.inst);
}

/// One thread per output element.
extern "C" __global__ void linear_f32(const LinearParams p) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.rows * p.fout) return;
    const int r = u / p.fout, o = u % p.fout;
    float s = p.bias[o];
    const float* x = p.x + size_t(r) * p.fin;
    const float* w = p.w + size_t(o) * p.fin;
    for (int i = 0; i < p.fin; ++i) s += x[i] * w[i];
    p.y[u] = p.act == 1 ? fmaxf(s, 0.0f) : s;
}

/// One thread per (bag, concept).
extern "C" __global__ void gcp_bags(const GcpBagsParams p) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.bags * p.k) return;
    const int b = u / p.k, k = u % p.k;
    const int r0 = p.bag_start[b], r1 = p.bag_start[b + 1];
    float mx = -3.4e38f, sum = 0.0f;
    for (int r = r0; r < r1; ++r) {
        float v = p.t[size_t(r) * p.k + k];
        mx = fmaxf(mx, v);
        sum += v;
    }
    p.g[u] = gcp_combine(p.gcp, mx, sum, r1 - r0);
}
