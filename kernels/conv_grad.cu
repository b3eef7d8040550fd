//! Conv backward for the training step: device-side fp16 packs of the fp32 conv weights (the
//! forward pack and the tap-flipped dgrad pack that lets conv3x3_igemm compute input
//! gradients), the 3×3 weight gradient as a tensor-core implicit GEMM split over pixels, and
//! the first layer's weight gradient on CUDA cores.
//! Equals (src/reference.rs): conv3x3_igemm with the pack_conv_dgrad pack of part j =
//! conv3x3_backward's dx (channels of part j); conv_wgrad + conv_wgrad_reduce =
//! conv3x3_backward's dw (the slice of one input part); conv_wgrad_first +
//! conv_wgrad_first_reduce = conv3x3_backward's dw. pack_conv_fwd equals the host
//! pack_conv3x3 (src/cuda/weights.rs).
#include "common.cuh"
#include "ptx_helpers.cuh"

/// Device-side repack of fp32 PyTorch conv weights to fp16.
struct PackConvParams {
    const float* w;  // [cout][c1 + c2][3][3] fp32
    __half* out;
    int cout, c1, c2;  // real channels of the (one or two) concatenated input parts (c2 = 0: one)
    int part;          // pack_conv_dgrad: which part (0 or 1); pack_conv_fwd ignores it
};

/// Weight gradient of a 3×3 conv (one input part) as an implicit GEMM over pixels.
struct WgradParams {
    const __half* dz;  // NHWC [n, h, w, cz] gradient of the conv output (fp16, scaled)
    const __half* x;   // NHWC [n, h, w, cx] the input part at the conv's resolution
    float* partial;    // [splits][cz][9·cx] fp32 scratch
    float* dw;         // [cout][cin][3][3] fp32 (PyTorch layout)
    int n, h, w;
    int cz, cx;        // padded channels (multiples of 8)
    int cout, cin;     // real output channels and real TOTAL input channels (all parts)
    int c_off, c_real; // this part's first real input channel and its real channels
    int splits, pad_;  // pixel (K) splits
    int pad2_;         // keeps the struct free of implicit padding (Rust Pod twin)
};

/// Weight gradient of the first layer (fp32 NCHW patches input), on CUDA cores.
struct WgradFirstParams {
    const __half* dz;  // NHWC [n, h, w, cz]
    const float* x;    // [n, cin, h, w] fp32 patches
    float* partial;    // [splits][cz][cin][9] fp32 scratch
    float* dw;         // [cout][cin][3][3] fp32
    int n, cin, h, w, cz, cout;
    int splits, pad_;
};

static_assert(sizeof(PackConvParams) == 32, "PackConvParams layout");
static_assert(sizeof(WgradParams) == 80, "WgradParams layout");
static_assert(sizeof(WgradFirstParams) == 64, "WgradFirstParams layout");

__device__ __forceinline__ int pad8i(int c) { return (c + 7) & ~7; }

/// One thread per output value: out [pad8(cout)][9][pad8(c1) + pad8(c2)], the k index of
/// channel c of part j at tap t being t·Σpad + (part 1: pad8(c1)) + c; zeros in padding.
extern "C" __global__ void pack_conv_fwd(const PackConvParams p) {
    const int p1 = pad8i(p.c1), cin_pad = p1 + pad8i(p.c2);
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= pad8i(p.cout) * 9 * cin_pad) return;
    const int k = u % cin_pad, r = u / cin_pad;
    const int t = r % 9, o = r / 9;
    const bool second = k >= p1;
    const int c = second ? k - p1 : k;
    const int real = second ? p.c2 : p.c1, off = second ? p.c1 : 0;
    float v = 0.0f;
    if (o < p.cout && c < real) v = p.w[(size_t(o) * (p.c1 + p.c2) + off + c) * 9 + t];
    p.out[u] = __float2half_rn(v);
}

/// One thread per output value: out [pad8(c_j)][9][pad8(cout)] for part j,
/// out[c][t][o] = w[o][off_j + c][8 − t]; zeros in padding.
extern "C" __global__ void pack_conv_dgrad(const PackConvParams p) {
    const int cj = p.part ? p.c2 : p.c1, off = p.part ? p.c1 : 0;
    const int co_pad = pad8i(p.cout);
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= pad8i(cj) * 9 * co_pad) return;
    const int o = u % co_pad, r = u / co_pad;
    const int t = r % 9, c = r / 9;
    float v = 0.0f;
    if (o < p.cout && c < cj) v = p.w[(size_t(o) * (p.c1 + p.c2) + off + c) * 9 + (8 - t)];
    p.out[u] = __float2half_rn(v);
}

// conv_wgrad: D[o][(t, c)] = Σ_pixels dz[p][o] · x[p shifted by tap t][c], M = cz, N = 9·cx,
// K = pixels. Block tile WG_BM × WG_BN, K consumed WG_BK pixels at a time through WG_STAGES
// cp.async stages. Both operands are stored k-major ([pixel][channel], as in memory) and read
// with ldmatrix .trans. Four warps as 2 (M) × 2 (N), each 32 × 64 (2 × 8 mma tiles).
constexpr int WG_BM = 64, WG_BN = 128, WG_BK = 32, WG_STAGES = 4, WG_THREADS = 128;

/// Offset (halves) of 16-byte chunk `ch` of row `r` in a [WG_BK][8·chunks] fp16 tile. The XOR
/// swizzle puts the eight rows one ldmatrix .trans phase reads (same chunk) on distinct banks.
__device__ __forceinline__ int wswz(int r, int ch, int chunks) {
    return (r * chunks + (ch ^ (r & 7))) << 3;
}

/// Grid (⌈9·cx/128⌉, ⌈cz/64⌉, splits), 128 threads: block z sums its share of the pixels into
/// partial[z] ([cz][9·cx], every value written).
extern "C" __global__ void __launch_bounds__(WG_THREADS) conv_wgrad(const WgradParams p) {
    __shared__ __align__(128) __half sa[WG_STAGES][WG_BK * WG_BM];
    __shared__ __align__(128) __half sb[WG_STAGES][WG_BK * WG_BN];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 1, wn = warp >> 1;
    const int P = p.n * p.h * p.w, N = 9 * p.cx;
    const int kt_all = (P + WG_BK - 1) / WG_BK, z = blockIdx.z;
    const int kt_begin = int((long long)z * kt_all / p.splits);
    const int KT = int((long long)(z + 1) * kt_all / p.splits) - kt_begin;
    const int m0 = blockIdx.y * WG_BM, n0 = blockIdx.x * WG_BN;

    // The loader: this thread fills chunk `ch` of A rows (pixels) row0 and row0 + 16, and
    // chunks ch and ch + 8 of the same B rows, of every stage. The B columns (tap, channel)
    // are fixed for the whole kernel; the pixels advance by WG_BK per k-tile.
    const int ch = tid & 7, row0 = tid >> 3;
    const bool a_ok = m0 + ch * 8 < p.cz;
    bool b_ok[2];
    int b_dy[2], b_dx[2];
    long long b_off[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        int col = n0 + (ch + 8 * j) * 8;
        b_ok[j] = col < N;
        int tap = col / p.cx, c = col - tap * p.cx;
        b_dy[j] = tap / 3 - 1;
        b_dx[j] = tap % 3 - 1;
        b_off[j] = (long long)(b_dy[j] * p.w + b_dx[j]) * p.cx + c;
    }
    int pp[2], py[2], px[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        pp[i] = kt_begin * WG_BK + row0 + 16 * i;
        px[i] = pp[i] % p.w;
        py[i] = (pp[i] / p.w) % p.h;
    }
    // Issues the next k-tile's loads into `stage` and advances the pixels.
    auto load = [&](int stage) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = row0 + 16 * i;
            const bool in = pp[i] < P;
            const bool aok = in && a_ok;
            const __half* asrc = aok ? p.dz + size_t(pp[i]) * p.cz + m0 + ch * 8 : p.dz;
            cp_async16(&sa[stage][wswz(r, ch, WG_BM / 8)], asrc, aok);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                int yy = py[i] + b_dy[j], xx = px[i] + b_dx[j];
                bool ok = in && b_ok[j] && yy >= 0 && yy < p.h && xx >= 0 && xx < p.w;
                const __half* src = ok ? p.x + (long long)pp[i] * p.cx + b_off[j] : p.x;
                cp_async16(&sb[stage][wswz(r, ch + 8 * j, WG_BN / 8)], src, ok);
            }
            pp[i] += WG_BK;
            px[i] += WG_BK;
            while (px[i] >= p.w) {
                px[i] -= p.w;
                if (++py[i] == p.h) py[i] = 0;
            }
        }
    };

    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    for (int s = 0; s < WG_STAGES - 1; ++s) {
        if (s < KT) load(s);
        cp_async_commit();
    }
    // ldmatrix .trans addresses: lane l gives row l%8 of matrix l/8. A matrices (of an m16 ×
    // k16 tile): (k 0–7, m 0–7), (k 0–7, m 8–15), (k 8–15, m 0–7), (k 8–15, m 8–15) = a0..a3.
    // B matrices (of two n8 tiles): (k 0–7, n 0–7), (k 8–15, n 0–7), then n 8–15 = b0, b1 of
    // each.
    const int q = lane >> 3, lr = lane & 7;
    const int a_k = lr + 8 * (q >> 1), a_ch = (wm * 32) / 8 + (q & 1);
    const int b_k = lr + 8 * (q & 1), b_ch = (wn * 64) / 8 + (q >> 1);
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<WG_STAGES - 2>();
        __syncthreads();
        if (kt + WG_STAGES - 1 < KT) load((kt + WG_STAGES - 1) % WG_STAGES);
        cp_async_commit();
        const __half* A = sa[kt % WG_STAGES];
        const __half* B = sb[kt % WG_STAGES];
#pragma unroll
        for (int ks = 0; ks < WG_BK / 16; ++ks) {
            unsigned af[2][4], bf[8][2];
#pragma unroll
            for (int i = 0; i < 2; ++i)
                ldmatrix_x4_trans(af[i], A + wswz(ks * 16 + a_k, a_ch + 2 * i, WG_BM / 8));
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned r4[4];
                ldmatrix_x4_trans(r4, B + wswz(ks * 16 + b_k, b_ch + 2 * j, WG_BN / 8));
                bf[2 * j][0] = r4[0];
                bf[2 * j][1] = r4[1];
                bf[2 * j + 1][0] = r4[2];
                bf[2 * j + 1][1] = r4[3];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) mma_16816(acc[i][j], af[i], bf[j]);
        }
    }
    cp_async_wait<0>();

    const int g = lane >> 2, t = lane & 3;
    float* part = p.partial + size_t(z) * p.cz * N;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            int m = m0 + wm * 32 + i * 16 + g + hf * 8;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int col = n0 + wn * 64 + j * 8 + 2 * t;
                if (m < p.cz && col < N)
                    *reinterpret_cast<float2*>(part + size_t(m) * N + col) =
                        make_float2(acc[i][j][2 * hf], acc[i][j][2 * hf + 1]);
            }
        }
}

/// One thread per dw value of this part's slice (o < cout, c < c_real, tap t): the sum of the
/// splits' partials in split order, written to dw[o][c_off + c][t].
extern "C" __global__ void conv_wgrad_reduce(const WgradParams p) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.cout * 9 * p.c_real) return;
    const int c = u % p.c_real, r = u / p.c_real;
    const int t = r % 9, o = r / 9;
    const size_t N = size_t(9) * p.cx, stride = size_t(p.cz) * N;
    const float* src = p.partial + size_t(o) * N + size_t(t) * p.cx + c;
    float s = 0.0f;
    for (int sp = 0; sp < p.splits; ++sp) s += src[sp * stride];
    p.dw[(size_t(o) * p.cin + p.c_off + c) * 9 + t] = s;
}

constexpr int WF_THREADS = 256;

/// Grid splits, 256 threads; needs cz/8·cin ≤ 256. Thread unit (ci, 8 output channels) over
/// every (256 / units)-th pixel of block z's pixel range: 72 fp32 accumulators, then a
/// fixed-order sum over the threads of the same unit into partial[z][o][ci][t].
extern "C" __global__ void __launch_bounds__(WF_THREADS) conv_wgrad_first(const WgradFirstParams p) {
    __shared__ float red[WF_THREADS][9];
    const int chunks = p.cz / 8, G = chunks * p.cin, PS = WF_THREADS / G;
    const int tid = threadIdx.x, unit = tid % G, lane_px = tid / G;
    const bool active = lane_px < PS;
    const int ci = unit / chunks, o8 = (unit % chunks) * 8;
    const int P = p.n * p.h * p.w, z = blockIdx.x;
    const int pb = int((long long)z * P / p.splits), pe = int((long long)(z + 1) * P / p.splits);
    float acc[8][9];
#pragma unroll
    for (int e = 0; e < 8; ++e)
#pragma unroll
        for (int t = 0; t < 9; ++t) acc[e][t] = 0.0f;
    if (active) {
        for (int pix = pb + lane_px; pix < pe; pix += PS) {
            const int x = pix % p.w, r = pix / p.w;
            const int y = r % p.h, img = r / p.h;
            float d[8];
            unpack8(*reinterpret_cast<const uint4*>(p.dz + size_t(pix) * p.cz + o8), d);
            const float* plane = p.x + (size_t(img) * p.cin + ci) * p.h * p.w;
            float nb[9];
#pragma unroll
            for (int t = 0; t < 9; ++t) {
                int yy = y + t / 3 - 1, xx = x + t % 3 - 1;
                bool in = yy >= 0 && yy < p.h && xx >= 0 && xx < p.w;
                nb[t] = in ? plane[yy * p.w + xx] : 0.0f;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e)
#pragma unroll
                for (int t = 0; t < 9; ++t) acc[e][t] += d[e] * nb[t];
        }
    }
    float* part = p.partial + size_t(z) * p.cz * p.cin * 9;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        if (active)
#pragma unroll
            for (int t = 0; t < 9; ++t) red[tid][t] = acc[e][t];
        __syncthreads();
        if (tid < G)
            for (int t = 0; t < 9; ++t) {
                float s = 0.0f;
                for (int l = 0; l < PS; ++l) s += red[l * G + tid][t];
                part[(size_t(o8 + e) * p.cin + ci) * 9 + t] = s;
            }
        __syncthreads();
    }
}

/// One thread per dw value (o < cout): the sum of the splits' partials in split order.
extern "C" __global__ void conv_wgrad_first_reduce(const WgradFirstParams p) {
    const int len = p.cin * 9;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= p.cout * len) return;
    const size_t stride = size_t(p.cz) * len;
    float s = 0.0f;
    for (int sp = 0; sp < p.splits; ++sp) s += p.partial[sp * stride + u];
    p.dw[u] = s;
}
