//! Backward of the network's heads: the segmentation loss (softmax CE + soft Dice) with the seg head's 1×1 conv backward, the classification loss, and the MIL head's layers (linear, GCP, BatchNorm1d + ReLU, concept scores pooled per patch).
//! Equals (src/reference.rs): seg_loss_backward = reference::seg_loss (losses, dlogits·S·λ) →
//! conv1x1_backward; cls_loss = cls_loss (dlogits·S); linear_bwd = relu_backward → linear_backward;
//! gcp_bwd = gcp_backward; bn1d_bwd_relu = relu_backward → bn_train_backward (hw = 1);
//! concepts_bwd = gcp_backward over each patch's instances → linear_backward over the instance rows.
#include "amp.cuh"

/// Softmax CE + soft Dice over fp32 logits, then the seg head's backward (see seg_loss_backward).
struct SegLossParams {
    const float* logits;    // [n, classes, hw] fp32 (the forward's seg logits)
    const int* labels;      // [n, hw] int32, −1 = ignore (any value outside 0..classes is ignored)
    const __half* x;        // NHWC [n·hw, c] the seg head's input (last unit's output)
    const float* w;         // [classes][c_real] seg head weight (fp32 master)
    const AmpState* amp;    // loss scale
    float* partial;         // scratch: per-block sums (size from seg_loss_partial_len)
    float* losses;          // [4]: writes losses[1] = ce, losses[2] = dice
    float* dx;              // fp32 NHWC [n·hw, c] dY of the last unit (+=)
    float* dw;              // [classes][c_real] (=)
    float* db;              // [classes] (=)
    int n, hw, c, c_real, classes;
    float lambda;           // λ_seg: the gradient is S·λ·d(ce + dice)/dlogits
};

struct ClsLossParams {
    const float* logits;    // [bags, classes]
    const int* labels;      // [bags]
    const float* weights;   // [classes] class weights or null
    const AmpState* amp;
    float* losses;          // writes losses[0] = cls loss
    float* dlogits;         // [bags, classes] = S·dloss/dlogits
    int bags, classes;
};

/// y = x·wᵀ + b (fp32), optionally followed by ReLU (y_relu given).
struct LinearBwdParams {
    const float* x;         // [rows, fin]
    const float* w;         // [fout, fin]
    const float* dy;        // [rows, fout] gradient of the (post-ReLU if y_relu) output
    const float* y_relu;    // [rows, fout] the post-ReLU output, or null: dy·[y_relu > 0] is used
    float* dx;              // [rows, fin] (=) or null
    float* dw;              // [fout, fin] (=)
    float* db;              // [fout] (=) or null (bias gradient exactly 0)
    int rows, fin, fout, pad_;
};

/// Gradient of gcp_bags (bag-level GCP over rows of t).
struct GcpBwdParams {
    const float* t;         // [rows, k] (argmax recomputed: first max in row order)
    const int* bag_start;   // [bags + 1]
    const float* dg;        // [bags, k]
    float* dt;              // [rows, k] (=) (rows outside the bags are not written)
    int bags, k, gcp, pad_;
};

/// BatchNorm1d (train) + ReLU backward; statistics recomputed from x as bn1d_train_relu does.
struct Bn1dBwdParams {
    const float* x;         // [rows, c] pre-BN
    const float* gamma;
    const float* beta;
    const float* dy;        // [rows, c] gradient of relu(bn(x))
    float* dx;              // [rows, c] (=)
    float* dgamma;          // (=)
    float* dbeta;           // (=)
    int rows, c;
    float eps;
    int pad_;
};

/// Backward of mil_concepts_gcp (embedding-level concepts + per-patch GCP).
struct ConceptsBwdParams {
    const __half* x;        // NHWC [m, inst, c] bottleneck output
    const float* w;         // [k][c_real] the Linear weight (PyTorch layout, fp32 master)
    const float* dz;        // [m, k]
    const int* arg;         // [m, k] first argmax instance (from the forward)
    float* dx;              // fp32 NHWC [m·inst, c] dY of the bottleneck unit (+=)
    float* dw;              // [k][c_real] (=)
    float* db;              // [k] (=) or null (max − mean: exactly 0)
    float* partial;         // scratch [chunks][k][c_real + 1] (concepts_bwd_partial_len)
    int m, inst, c, c_real, k, gcp;
};

// The Rust twins (src/cuda/kernels/heads_grad.rs) assert the same sizes.
static_assert(sizeof(SegLossParams) == 104, "SegLossParams layout");
static_assert(sizeof(ClsLossParams) == 56, "ClsLossParams layout");
static_assert(sizeof(LinearBwdParams) == 72, "LinearBwdParams layout");
static_assert(sizeof(GcpBwdParams) == 48, "GcpBwdParams layout");
static_assert(sizeof(Bn1dBwdParams) == 72, "Bn1dBwdParams layout");
static_assert(sizeof(ConceptsBwdParams) == 88, "ConceptsBwdParams layout");

// ---- segmentation loss + seg head backward ----
//
// Block b of seg_loss_stats / seg_loss_grad covers pixels [b·SEG_PIX, (b + 1)·SEG_PIX) of the
// n·hw pixels (u = image·hw + pixel); partial holds, in this order: the per-block sums
// [blocks][2 + 3·classes] (ce, count, Σp·y, Σp, Σy per class), the gradient coefficients
// [2 + 2·classes] (S·λ, 1/N, A_k, B_k), and the per-block dW/db partials
// [blocks][classes·(c_real + 1)] (column c_real: the bias).

#define SEG_PIX 1024
#define SEG_TILE 128
#define SEG_MAXC 16

__device__ __forceinline__ int seg_blocks(const SegLossParams& p) {
    return (p.n * p.hw + SEG_PIX - 1) / SEG_PIX;
}

/// Softmax of pixel u's logits into q[0..classes); returns log Σ exp(z − max) − (z_l − max),
/// the pixel's CE for label l.
__device__ __forceinline__ float seg_softmax(const SegLossParams& p, int u, int l,
                                             float q[SEG_MAXC]) {
    const int img = u / p.hw, pix = u - img * p.hw;
    const float* z = p.logits + size_t(img) * p.classes * p.hw + pix;
    float mx = -3.4e38f, zl = 0.0f;
#pragma unroll
    for (int k = 0; k < SEG_MAXC; ++k) {
        if (k >= p.classes) break;
        q[k] = z[size_t(k) * p.hw];
        mx = fmaxf(mx, q[k]);
        if (k == l) zl = q[k];
    }
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < SEG_MAXC; ++k) {
        if (k >= p.classes) break;
        q[k] = expf(q[k] - mx);
        s += q[k];
    }
#pragma unroll
    for (int k = 0; k < SEG_MAXC; ++k) {
        if (k >= p.classes) break;
        q[k] = q[k] / s;
    }
    return logf(s) - (zl - mx);
}

/// Grid seg_blocks, 128 threads: per-block sums of the CE, the labelled count and, per class,
/// Σ p·y, Σ p and Σ y over the labelled pixels (per thread, then over the threads in order).
extern "C" __global__ void __launch_bounds__(128) seg_loss_stats(const SegLossParams p) {
    __shared__ float red[128][2 + 3 * SEG_MAXC];
    const int nv = 2 + 3 * p.classes, pixels = p.n * p.hw;
    const int u0 = blockIdx.x * SEG_PIX, u1 = imin(pixels, u0 + SEG_PIX);
    float* acc = red[threadIdx.x];
    for (int v = 0; v < nv; ++v) acc[v] = 0.0f;
    for (int u = u0 + threadIdx.x; u < u1; u += 128) {
        const int l = p.labels[u];
        if (l < 0 || l >= p.classes) continue;
        float q[SEG_MAXC];
        acc[0] += seg_softmax(p, u, l, q);
        acc[1] += 1.0f;
        for (int k = 0; k < p.classes; ++k) {
            if (k == l) {
                acc[2 + k] += q[k];
                acc[2 + 2 * p.classes + k] += 1.0f;
            }
            acc[2 + p.classes + k] += q[k];
        }
    }
    __syncthreads();
    for (int v = threadIdx.x; v < nv; v += 128) {
        float s = 0.0f;
        for (int t = 0; t < 128; ++t) s += red[t][v];
        p.partial[size_t(blockIdx.x) * nv + v] = s;
    }
}

/// One block of 64 threads: the per-block sums in block order → the losses and the gradient
/// coefficients. With N labelled pixels, num_k = 2 Σp·y + 1, den_k = Σp + Σy + 1 and
/// d dice/dp_k = g_k = A_k·y_k + B_k with A_k = −2/(den_k (c − 1)), B_k = num_k/(den_k² (c − 1))
/// for the foreground classes (g_0 = 0).
extern "C" __global__ void __launch_bounds__(64) seg_loss_finalize(const SegLossParams p) {
    __shared__ float tot[2 + 3 * SEG_MAXC];
    const int nv = 2 + 3 * p.classes, blocks = seg_blocks(p);
    for (int v = threadIdx.x; v < nv; v += 64) {
        float s = 0.0f;
        for (int b = 0; b < blocks; ++b) s += p.partial[size_t(b) * nv + v];
        tot[v] = s;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    float* coef = p.partial + size_t(blocks) * nv;
    const int c = p.classes;
    const double count = tot[1], fg = double(c - 1);
    double ce = 0.0, dice = 0.0;
    coef[0] = p.amp->scale * p.lambda;
    coef[1] = count > 0.0 ? float(1.0 / count) : 0.0f;
    coef[2] = 0.0f;
    coef[2 + c] = 0.0f;
    if (count > 0.0) {
        ce = tot[0] / count;
        double mean = 0.0;
        for (int k = 1; k < c; ++k) {
            double num = 2.0 * tot[2 + k] + 1.0, den = double(tot[2 + c + k]) + tot[2 + 2 * c + k] + 1.0;
            mean += num / den;
            coef[2 + k] = float(-2.0 / (den * fg));
            coef[2 + c + k] = float(num / (den * den * fg));
        }
        dice = 1.0 - mean / fg;
    } else {
        for (int k = 1; k < c; ++k) coef[2 + k] = coef[2 + c + k] = 0.0f;
    }
    p.losses[1] = float(ce);
    p.losses[2] = float(dice);
}

/// Grid seg_blocks, 256 threads, tiles of SEG_TILE pixels: each pixel's dlogits (S·λ·d(ce +
/// dice)/dz, 0 at ignored pixels) in shared memory, then dx += dlogits·w and the block's
/// dW/db sums (one thread per output, over the block's pixels in order). Needs
/// classes·c_real ≤ 4096 and classes ≤ 16.
extern "C" __global__ void __launch_bounds__(256) seg_loss_grad(const SegLossParams p) {
    __shared__ float sdl[SEG_TILE][SEG_MAXC];
    __shared__ float sw[4096];
    __shared__ float sacc[4096 + SEG_MAXC];
    const int c = p.classes, cr = p.c_real, outs = c * (cr + 1), pixels = p.n * p.hw;
    const int blocks = seg_blocks(p);
    const float* coef = p.partial + size_t(blocks) * (2 + 3 * c);
    const float sl = coef[0], inv_n = coef[1];
    for (int i = threadIdx.x; i < c * cr; i += 256) sw[i] = p.w[i];
    for (int o = threadIdx.x; o < outs; o += 256) sacc[o] = 0.0f;
    const int u0 = blockIdx.x * SEG_PIX, u1 = imin(pixels, u0 + SEG_PIX);
    for (int t0 = u0; t0 < u1; t0 += SEG_TILE) {
        const int tn = imin(SEG_TILE, u1 - t0);
        __syncthreads();  // the previous tile's sdl is consumed
        if (threadIdx.x < SEG_TILE) {
            const int u = t0 + threadIdx.x;
            float* d = sdl[threadIdx.x];
            const int l = int(threadIdx.x) < tn ? p.labels[u] : -1;
            if (l >= 0 && l < c) {
                float q[SEG_MAXC];
                seg_softmax(p, u, l, q);
                float qg = 0.0f;
                for (int k = 1; k < c; ++k) qg += q[k] * ((k == l ? coef[2 + k] : 0.0f) + coef[2 + c + k]);
                for (int j = 0; j < c; ++j) {
                    const float g = j == 0 ? 0.0f : (j == l ? coef[2 + j] : 0.0f) + coef[2 + c + j];
                    const float y = j == l ? 1.0f : 0.0f;
                    d[j] = sl * ((q[j] - y) * inv_n + q[j] * (g - qg));
                }
            } else {
                for (int j = 0; j < c; ++j) d[j] = 0.0f;
            }
        }
        __syncthreads();
        for (int e = threadIdx.x; e < tn * cr; e += 256) {
            const int r = e / cr, ch = e - r * cr;
            float s = 0.0f;
            for (int j = 0; j < c; ++j) s += sdl[r][j] * sw[j * cr + ch];
            p.dx[size_t(t0 + r) * p.c + ch] += s;
        }
        for (int o = threadIdx.x; o < outs; o += 256) {
            const int j = o / (cr + 1), ch = o - j * (cr + 1);
            float s = sacc[o];
            if (ch == cr) {
                for (int r = 0; r < tn; ++r) s += sdl[r][j];
            } else {
                const __half* x = p.x + size_t(t0) * p.c + ch;
                for (int r = 0; r < tn; ++r) s += sdl[r][j] * __half2float(x[size_t(r) * p.c]);
            }
            sacc[o] = s;
        }
    }
    __syncthreads();
    float* part = p.partial + size_t(blocks) * (2 + 3 * c) + 2 + 2 * c + size_t(blockIdx.x) * outs;
    for (int o = threadIdx.x; o < outs; o += 256) part[o] = sacc[o];
}

/// One thread per dW/db value: the per-block partials in block order.
extern "C" __global__ void seg_loss_reduce(const SegLossParams p) {
    const int c = p.classes, cr = p.c_real, outs = c * (cr + 1), blocks = seg_blocks(p);
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= outs) return;
    const float* part = p.partial + size_t(blocks) * (2 + 3 * c) + 2 + 2 * c + o;
    float s = 0.0f;
    for (int b = 0; b < blocks; ++b) s += part[size_t(b) * outs];
    const int j = o / (cr + 1), ch = o - j * (cr + 1);
    if (ch == cr)
        p.db[j] = s;
    else
        p.dw[j * cr + ch] = s;
}

// ---- classification loss ----

/// One block of 256 threads: weighted CE over the bags (per-thread sums, then a fixed tree)
/// and dlogits = S·w[y_i]·(p_i − onehot(y_i))/Σ w.
extern "C" __global__ void __launch_bounds__(256) cls_loss(const ClsLossParams p) {
    __shared__ float sl[256], sws[256];
    const int t = threadIdx.x;
    float loss = 0.0f, wsum = 0.0f;
    for (int b = t; b < p.bags; b += 256) {
        const float* z = p.logits + size_t(b) * p.classes;
        const int l = p.labels[b];
        const float w = p.weights != nullptr ? p.weights[l] : 1.0f;
        float mx = -3.4e38f;
        for (int k = 0; k < p.classes; ++k) mx = fmaxf(mx, z[k]);
        float s = 0.0f;
        for (int k = 0; k < p.classes; ++k) s += expf(z[k] - mx);
        loss += w * (logf(s) - (z[l] - mx));
        wsum += w;
    }
    sl[t] = loss;
    sws[t] = wsum;
    block_sum_pairs(sl, sws, t, 256);
    const float total_w = sws[0], scale = p.amp->scale;
    if (t == 0) p.losses[0] = sl[0] / total_w;
    for (int b = t; b < p.bags; b += 256) {
        const float* z = p.logits + size_t(b) * p.classes;
        const int l = p.labels[b];
        const float w = p.weights != nullptr ? p.weights[l] : 1.0f;
        float mx = -3.4e38f;
        for (int k = 0; k < p.classes; ++k) mx = fmaxf(mx, z[k]);
        float s = 0.0f;
        for (int k = 0; k < p.classes; ++k) s += expf(z[k] - mx);
        for (int k = 0; k < p.classes; ++k) {
            const float q = expf(z[k] - mx) / s;
            p.dlogits[size_t(b) * p.classes + k] = scale * (w * (q - (k == l ? 1.0f : 0.0f)) / total_w);
        }
    }
}

// ---- MIL head layers ----

/// One thread per output value: rows·fin of dx (when given), then fout·fin of dw, then fout of
/// db (when given), each a sum in index order.
extern "C" __global__ void linear_bwd(const LinearBwdParams p) {
    int u = blockIdx.x * blockDim.x + threadIdx.x;
    auto d = [&](int r, int o) {
        const size_t i = size_t(r) * p.fout + o;
        return p.y_relu == nullptr || p.y_relu[i] > 0.0f ? p.dy[i] : 0.0f;
    };
    if (p.dx != nullptr) {
        if (u < p.rows * p.fin) {
            const int r = u / p.fin, i = u - r * p.fin;
            float s = 0.0f;
            for (int o = 0; o < p.fout; ++o) s += d(r, o) * p.w[size_t(o) * p.fin + i];
            p.dx[u] = s;
            return;
        }
        u -= p.rows * p.fin;
    }
    if (u < p.fout * p.fin) {
        const int o = u / p.fin, i = u - o * p.fin;
        float s = 0.0f;
        for (int r = 0; r < p.rows; ++r) s += d(r, o) * p.x[size_t(r) * p.fin + i];
        p.dw[u] = s;
        return;
    }
    u -= p.fout * p.fin;
    if (p.db != nullptr && u < p.fout) {
        float s = 0.0f;
        for (int r = 0; r < p.rows; ++r) s += d(r, u);
        p.db[u] = s;
    }
}

/// The GCP gradient coefficients of n pooled values: at the first maximum, and everywhere.
__device__ __forceinline__ void gcp_bwd_coef(int mode, int n, float& at_max, float& every) {
    at_max = mode == 2 ? 0.0f : 1.0f;
    every = mode == 1 ? 0.0f : (mode == 0 ? -1.0f : 1.0f) / float(n);
}

/// One thread per (bag, column): the first maximum of the bag's rows, then dt of each row.
extern "C" __global__ void gcp_bwd(const GcpBwdParams p) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.bags * p.k) return;
    const int b = u / p.k, j = u - b * p.k;
    const int r0 = p.bag_start[b], r1 = p.bag_start[b + 1];
    int first = r0;
    for (int r = r0 + 1; r < r1; ++r)
        if (p.t[size_t(r) * p.k + j] > p.t[size_t(first) * p.k + j]) first = r;
    float at_max, every;
    gcp_bwd_coef(p.gcp, r1 - r0, at_max, every);
    const float g = p.dg[u];
    for (int r = r0; r < r1; ++r) p.dt[size_t(r) * p.k + j] = ((r == first ? at_max : 0.0f) + every) * g;
}

/// One block of 128 threads per channel. Thread 0 recomputes the batch statistics exactly as
/// bn1d_train_relu (so the ReLU mask is the forward's); dβ = Σ dy·mask and dγ = Σ dy·mask·x̂
/// (per-thread sums, then a fixed tree); dx = γ·invstd/N·(N·dy·mask − dβ − x̂·dγ).
extern "C" __global__ void __launch_bounds__(128) bn1d_bwd_relu(const Bn1dBwdParams p) {
    __shared__ float stat[4];
    __shared__ float sb[128], sg[128];
    const int c = blockIdx.x, t = threadIdx.x;
    if (t == 0) {
        float s = 0.0f;
        for (int r = 0; r < p.rows; ++r) s += p.x[size_t(r) * p.c + c];
        float mean = s / float(p.rows), m2 = 0.0f;
        for (int r = 0; r < p.rows; ++r) {
            float d = p.x[size_t(r) * p.c + c] - mean;
            m2 += d * d;
        }
        float var = m2 / float(p.rows);
        float invstd = rsqrtf(var + p.eps);
        float scale = p.gamma[c] * invstd, shift = p.beta[c] - mean * scale;
        stat[0] = mean;
        stat[1] = invstd;
        stat[2] = scale;
        stat[3] = shift;
    }
    __syncthreads();
    const float mean = stat[0], invstd = stat[1], scale = stat[2], shift = stat[3];
    float db = 0.0f, dg = 0.0f;
    for (int r = t; r < p.rows; r += 128) {
        const float x = p.x[size_t(r) * p.c + c];
        const float dy = fmaxf(x * scale + shift, 0.0f) > 0.0f ? p.dy[size_t(r) * p.c + c] : 0.0f;
        db += dy;
        dg += dy * ((x - mean) * invstd);
    }
    sb[t] = db;
    sg[t] = dg;
    block_sum_pairs(sb, sg, t, 128);
    const float dbeta = sb[0], dgamma = sg[0], n = float(p.rows);
    if (t == 0) {
        p.dbeta[c] = dbeta;
        p.dgamma[c] = dgamma;
    }
    const float k = p.gamma[c] * invstd / n;
    for (int r = t; r < p.rows; r += 128) {
        const float x = p.x[size_t(r) * p.c + c];
        const float dy = fmaxf(x * scale + shift, 0.0f) > 0.0f ? p.dy[size_t(r) * p.c + c] : 0.0f;
        p.dx[size_t(r) * p.c + c] = k * (n * dy - dbeta - (x - mean) * invstd * dgamma);
    }
}

// ---- concept scores pooled per patch ----
//
// ds[m,i,k] = dz[m,k]·([i = arg[m,k]]·at_max + every) (gcp_bwd_coef over inst values);
// dx[m,i,c] += Σ_k ds·w[k][c]; dw[k][c] = Σ_m dz[m,k]·(at_max·x[m,arg,c] + every·Σ_i x[m,i,c]);
// db[k] likewise with x = 1. dw/db are summed per chunk of CONCEPTS_M patches into partial
// [chunks][k][c_real + 1], then over the chunks in order.

#define CONCEPTS_M 32

/// One thread per (patch, instance, real channel).
extern "C" __global__ void concepts_bwd_dx(const ConceptsBwdParams p) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.m * p.inst * p.c_real) return;
    const int row = u / p.c_real, ch = u - row * p.c_real;
    const int m = row / p.inst, i = row - m * p.inst;
    float at_max, every;
    gcp_bwd_coef(p.gcp, p.inst, at_max, every);
    float s = 0.0f;
    for (int k = 0; k < p.k; ++k) {
        const size_t mk = size_t(m) * p.k + k;
        s += p.dz[mk] * ((p.arg[mk] == i ? at_max : 0.0f) + every) * p.w[size_t(k) * p.c_real + ch];
    }
    p.dx[size_t(row) * p.c + ch] += s;
}

/// Grid (⌈k·(c_real + 1)/128⌉, chunks), 128 threads: one thread per (concept, channel or bias)
/// summing the chunk's patches in order.
extern "C" __global__ void concepts_bwd_dw(const ConceptsBwdParams p) {
    const int cr1 = p.c_real + 1;
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= p.k * cr1) return;
    const int k = o / cr1, ch = o - k * cr1;
    float at_max, every;
    gcp_bwd_coef(p.gcp, p.inst, at_max, every);
    const int m0 = blockIdx.y * CONCEPTS_M, m1 = imin(p.m, m0 + CONCEPTS_M);
    float s = 0.0f;
    for (int m = m0; m < m1; ++m) {
        const size_t mk = size_t(m) * p.k + k;
        float v;
        if (ch == p.c_real) {
            v = at_max + every * float(p.inst);
        } else {
            const __half* x = p.x + size_t(m) * p.inst * p.c + ch;
            float sum = 0.0f;
            if (every != 0.0f)
                for (int i = 0; i < p.inst; ++i) sum += __half2float(x[size_t(i) * p.c]);
            const float top = at_max != 0.0f ? __half2float(x[size_t(p.arg[mk]) * p.c]) : 0.0f;
            v = at_max * top + every * sum;
        }
        s += p.dz[mk] * v;
    }
    p.partial[size_t(blockIdx.y) * p.k * cr1 + o] = s;
}

/// One thread per (concept, channel or bias): the chunks in order → dw, db (exactly 0 for
/// max − mean, whose output does not depend on the bias).
extern "C" __global__ void concepts_bwd_reduce(const ConceptsBwdParams p) {
    const int cr1 = p.c_real + 1, chunks = (p.m + CONCEPTS_M - 1) / CONCEPTS_M;
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= p.k * cr1) return;
    const int k = o / cr1, ch = o - k * cr1;
    float s = 0.0f;
    for (int b = 0; b < chunks; ++b) s += p.partial[size_t(b) * p.k * cr1 + o];
    if (ch < p.c_real)
        p.dw[size_t(k) * p.c_real + ch] = s;
    else if (p.db != nullptr)
        p.db[k] = p.gcp == 0 ? 0.0f : s;
}
