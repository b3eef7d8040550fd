//! The decoders' up_conv as a sub-pixel implicit GEMM: conv3x3 (zero padding 1) of the ×2 bilinear upsampling (align_corners=False) of x computed from x itself with composite weights, the four output parities sharing one A operand; and the device pack of those weights.
//! Equals (src/reference.rs): conv3x3_up_subpixel = conv3x3_forward of upsample2x_forward(x)
//! (bn_eval_forward folded into w and b by the host) → relu_forward; conv_splitk_reduce
//! (conv.cu) finishes a split-K launch. pack_conv_up equals the host pack_conv_up
//! (src/cuda/weights.rs) bit for bit.
//!
//! The math, along one axis (rows; columns alike). The upsampling reads the low-resolution
//! rows clamped to [0, h−1]: U[2i] = ¼·x[i−1] + ¾·x[i], U[2i+1] = ¾·x[i] + ¼·x[i+1]. The
//! conv's taps d = 0, 1, 2 at output row Y = 2i + py read U[Y+d−1], zero outside [0, 2h):
//!   py = 0: x[i−1]·(¾w0 + ¼w1) + x[i]·(¼w0 + ¾w1 + ¾w2) + x[i+1]·(¼w2)
//!   py = 1: x[i−1]·(¼w0) + x[i]·(¾w0 + ¾w1 + ¼w2) + x[i+1]·(¼w1 + ¾w2)
//! i.e. low-res offset a = 0, 1, 2 (row i+a−1) gets Σ_d P_py[a][d]·w_d with
//!   P_0 = [[¾, ¼, 0], [¼, ¾, ¾], [0, 0, ¼]],  P_1 = [[¼, 0, 0], [¾, ¾, ¼], [0, ¼, ¾]].
//! That holds at the border too when the A loader clamps its reads as the upsampling does
//! (x[−1] → x[0], x[h] → x[h−1]), except that the high-res taps falling on the conv's zero
//! padding must drop out: U[−1] (py = 0, i = 0, tap d = 0) and U[2h] (py = 1, i = h−1,
//! d = 2). So each parity has two weight variants per axis: all taps, or the "edge" one
//! without d = 0 (py = 0) resp. d = 2 (py = 1), used by the first resp. last low-res row
//! (both when h = 1). In 2-D the composite of parity (py, px), variant (vy, vx), low-res tap
//! (a, b) is Σ_{d,e} P_py[a][d]·P_px[b][e]·w[d][e] over the kept d, e: 4 variants × 4
//! parities. The GEMM rows (low-res pixels) are grouped in nine regions (first / inner /
//! last row × first / inner / last column) so that every block tile has one variant per
//! parity.
#include "common.cuh"
#include "igemm.cuh"

/// The sub-pixel up_conv: low-res x [n, h, w, cin] → y [n, 2h, 2w, cout], GEMM M = n·h·w
/// (in regions), N = 4·cout (column q·cout + o: parity q = 2·py + px, channel o), K = 9·cin.
struct ConvUpParams {
    const __half* x;    // NHWC [n, h, w, cin] fp16, the low-resolution input
    const __half* wt;   // composite weights [4 variants 2·vy + vx][4·cout][9][cin] fp16
    const float* bias;  // [cout]
    __half* y;          // NHWC [n, 2h, 2w, cout]
    float* partial;     // split-K: fp32 [splits][n·2h·2w][cout], high-res NHWC order
    int n, h, w;        // low-resolution size
    int cin, cout;      // multiples of 8
    int relu;           // apply ReLU in the epilogue
    int splits;         // K split over gridDim.z (> 1: conv_splitk_reduce with quad = 0)
    int border_only;    // 1: only the eight border regions (the wgmma tier computes the inner one)
};

/// Region class k (0 first, 1 inner, 2 last) of an axis of length len: its first index and
/// length (0 when empty), and whether its pixels are the first / last along the axis.
__device__ __forceinline__ void up_class(int k, int len, int& lo, int& cnt, bool& first,
                                         bool& last) {
    lo = k == 0 ? 0 : (k == 1 ? 1 : len - 1);
    cnt = k == 0 ? 1 : (k == 1 ? imax(len - 2, 0) : (len >= 2 ? 1 : 0));
    first = k == 0;
    last = k == 2 || len == 1;
}

/// Grid (Σ over the nine regions (eight with border_only) of ⌈rows/128⌉, ⌈4·cout/64⌉, splits),
/// 128 threads. Blocks take the regions in the order inner×inner first, then the border ones.
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3x3_up_subpixel(const ConvUpParams p) {
    __shared__ __align__(128) __half sa[STAGES][BM * BK];
    __shared__ __align__(128) __half sb[STAGES][BN * BK];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 1, wn = warp >> 1;
    const int N = 4 * p.cout, K = 9 * p.cin;

    // This block's region and its first row in it.
    int y0 = 0, ry = 0, x0 = 0, rx = 0, m0 = 0;
    bool top = false, bottom = false, left = false, right = false;
    for (int r = p.border_only, tile = int(blockIdx.x); r < 9; ++r) {
        const int reg = (r + 4) % 9;
        int ylo, ycnt, xlo, xcnt;
        bool yf, yl, xf, xl;
        up_class(reg / 3, p.h, ylo, ycnt, yf, yl);
        up_class(reg % 3, p.w, xlo, xcnt, xf, xl);
        const int tiles = (p.n * ycnt * xcnt + BM - 1) / BM;
        if (tile < tiles) {
            y0 = ylo, ry = ycnt, x0 = xlo, rx = xcnt, m0 = tile * BM;
            top = yf, bottom = yl, left = xf, right = xl;
            break;
        }
        tile -= tiles;
    }
    const int M = p.n * ry * rx;
    auto pixel = [&](int m, int& n, int& i, int& j) {
        j = x0 + m % rx;
        const int q = m / rx;
        i = y0 + q % ry;
        n = q / ry;
    };

    const int kt_all = (K + BK - 1) / BK;
    const int kt_begin = int(blockIdx.z) * kt_all / p.splits;
    const int KT = (int(blockIdx.z) + 1) * kt_all / p.splits - kt_begin;
    const int n0 = blockIdx.y * BN;

    // The loader: this thread fills 16-byte chunk `ch` of A rows row0 + 32·i and B rows
    // row0 + 32·j of every stage.
    const int ch = tid & 3, row0 = tid >> 2;
    int an[4], ai[4], aj[4];
    bool aok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + row0 + 32 * i;
        aok[i] = m < M;
        pixel(aok[i] ? m : 0, an[i], ai[i], aj[i]);
    }
    // The weight rows this thread loads, in the variant its parity takes in this region.
    const __half* brow[2];
    bool bok[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int nn = n0 + row0 + 32 * j;
        const int q = nn / imax(p.cout, 1);
        const int vy = (q >> 1) ? bottom : top, vx = (q & 1) ? right : left;
        bok[j] = nn < N;
        brow[j] = p.wt + (size_t(2 * vy + vx) * N + (bok[j] ? nn : 0)) * K;
    }
    // The k index of this thread's chunk in k-tile kt, with its tap (9 past the end) and channel.
    auto chunk_k = [&](int kt, int& tap, int& c) {
        const int k = (kt_begin + kt) * BK + ch * 8;
        tap = k < K ? k / p.cin : 9;
        c = k - tap * p.cin;
        return k;
    };
    // A: channels c..c+7 of low-res pixel (i + a − 1, j + b − 1) clamped into the image, as
    // the upsampling clamps (the composite weights assume it).
    auto load_a = [&](int stage, int kt) {
        int tap, c;
        chunk_k(kt, tap, c);
        const int dy = tap / 3 - 1, dx = tap % 3 - 1;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const bool ok = tap < 9 && aok[i];
            const int yy = imin(imax(ai[i] + dy, 0), p.h - 1);
            const int xx = imin(imax(aj[i] + dx, 0), p.w - 1);
            const __half* src = p.x;
            if (ok) src = p.x + ((size_t(an[i]) * p.h + yy) * p.w + xx) * p.cin + c;
            cp_async16(&sa[stage][swz(row0 + 32 * i, ch)], src, ok);
        }
    };
    auto load_b = [&](int stage, int kt) {
        int tap, c;
        const int k = chunk_k(kt, tap, c);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const bool ok = tap < 9 && bok[j];
            cp_async16(&sb[stage][swz(row0 + 32 * j, ch)], ok ? brow[j] + k : p.wt, ok);
        }
    };

    IgemmAcc acc;
    igemm_zero(acc);
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) {
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
            load_a(next % STAGES, next);
            load_b(next % STAGES, next);
        }
        cp_async_commit();
        igemm_ktile(acc, sa[kt % STAGES], sb[kt % STAGES], lane, wm, wn);
    }
    cp_async_wait<0>();

    // Epilogue: column q·cout + o of low-res pixel (i, j) is channel o of high-res pixel
    // (2i + py, 2j + px); bias, ReLU and the fp16 store, or (split-K) the raw fp32 sums.
    const int g = lane >> 2, t = lane & 3;
    const int H2 = 2 * p.h, W2 = 2 * p.w;
    float* part = p.partial + size_t(blockIdx.z) * (size_t(p.n) * H2 * W2 * p.cout);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int m = m0 + wm * 64 + i * 16 + g + hf * 8;
            const bool mok = m < M;
            int pn, pi, pj;
            pixel(mok ? m : 0, pn, pi, pj);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = n0 + wn * 32 + j * 8 + 2 * t;
                if (!mok || col >= N) continue;
                const int q = col / p.cout, o = col - q * p.cout;
                const size_t out =
                    ((size_t(pn) * H2 + 2 * pi + (q >> 1)) * W2 + 2 * pj + (q & 1)) * p.cout + o;
                float v0 = acc.v[i][j][2 * hf], v1 = acc.v[i][j][2 * hf + 1];
                if (p.splits > 1) {
                    *reinterpret_cast<float2*>(part + out) = make_float2(v0, v1);
                    continue;
                }
                v0 += p.bias[o];
                v1 += p.bias[o + 1];
                if (p.relu) {
                    v0 = fmaxf(v0, 0.0f);
                    v1 = fmaxf(v1, 0.0f);
                }
                *reinterpret_cast<__half2*>(p.y + out) = __floats2half2_rn(v0, v1);
            }
        }
    }
}

/// Device pack of the composite weights from fp32 conv weights.
struct PackConvUpParams {
    const float* w;  // [cout][cin][3][3] fp32 (real channels)
    __half* out;     // [4 variants][4·pad8(cout)][9][pad8(cin)] fp16
    int cout, cin;
};

/// P_py[a][d] (see the top of the file) in quarters, 0 for the tap a border variant drops.
__device__ __forceinline__ int up_quarters(int parity, int edge, int a, int d) {
    const int P[2][3][3] = {{{3, 1, 0}, {1, 3, 3}, {0, 0, 1}}, {{1, 0, 0}, {3, 3, 1}, {0, 1, 3}}};
    return edge && d == (parity ? 2 : 0) ? 0 : P[parity][a][d];
}

/// One thread per packed value: Σ_{d,e} (qy·qx/16)·w[o][c][d][e] in fp64, d-major (each
/// product is exact in fp64, so FMA contraction cannot change it), rounded once to fp16.
extern "C" __global__ void pack_conv_up(const PackConvUpParams p) {
    const int cp = (p.cout + 7) / 8 * 8, kp = (p.cin + 7) / 8 * 8;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= 16 * cp * 9 * kp) return;
    const int c = u % kp, tap = u / kp % 9, nn = u / (kp * 9) % (4 * cp), var = u / (kp * 9 * 4 * cp);
    const int q = nn / cp, o = nn % cp, a = tap / 3, b = tap % 3;
    double s = 0.0;
    if (o < p.cout && c < p.cin) {
        const float* wk = p.w + (size_t(o) * p.cin + c) * 9;
        for (int d = 0; d < 3; ++d) {
            const int qy = up_quarters(q >> 1, var >> 1, a, d);
            for (int e = 0; e < 3; ++e) {
                const int qx = up_quarters(q & 1, var & 1, b, e);
                s += double(qy * qx) / 16.0 * double(wk[d * 3 + e]);
            }
        }
    }
    p.out[u] = __double2half(s);
}
