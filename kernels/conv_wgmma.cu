//! 3×3 convolution, Hopper tier (sm_90a): per tap and 64-channel slice, TMA loads the input
//! tile shifted by the tap (its zero fill is the padding) and the weight slice into an
//! mbarrier ring; one producer thread and two consumer warpgroups running wgmma m64n128k16
//! with the weights as the 64-row operand and 128 pixels as N; the epilogue is staged in
//! shared memory (bias, ReLU, 16-byte stores, 2×2 max-pool).
//! Equals (src/reference.rs, as conv3x3_igemm in conv.cu): reference::conv3x3_forward of
//! concat_channels(x, x2), bn_eval_forward folded into w and b → relu_forward →
//! maxpool2x2_forward (y_pool) (→ conv1x1_forward → argmax_channels: the seg tail); and with
//! `up`, the interior of conv3x3_up_subpixel (conv_up.cu:
//! conv3x3_forward of upsample2x_forward(x) → relu_forward, from the low-resolution input
//! with the inner composite weights). Also the single-wgmma probe the tests compare with a
//! matmul.
#include "common.cuh"
#include "hopper.cuh"

// A block: one producer warpgroup (one thread issues the TMA loads) and two consumer
// warpgroups; see conv3x3_wgmma_body.
constexpr int HW_THREADS = 384;

struct WgmmaConvParams {
    TensorMap x1;    // input [n][h][w][cin1] as 4-D (c, x, y, n), box (64, tile_x, tile_y, 1)
    TensorMap x2;    // concatenated input [n][h][w][cin2], same box (x1 again when cin2 = 0)
    TensorMap wt;    // weights [cout][9·cin] as 2-D (k, co), box (64, 64·NSUB); with `up`
                     // the inner composite weights [4·cout][9·cin] (column q·cout + o)
    const float* bias;  // [cout]
    __half* y;          // [n][h][w][cout]; with `up` [n][2h][2w][cout]
    __half* y_pool;     // [n][h/2][w/2][cout], or null
    int n, h, w, cin1, cin2, cout, relu;
    int tile_x, tile_y, tiles_x, tiles_y;  // tile_x · tile_y = 256; tiles per image row/column
    int up;  // 1: the sub-pixel up_conv of the interior pixels (1..h−2 × 1..w−2) of the
             // low-resolution x (h × w); tiles start at (1, 1), the border is conv_up.cu's
};
static_assert(sizeof(WgmmaConvParams) == 512, "WgmmaConvParams layout");

#ifdef M2UNET_HOPPER
// A block computes 64·NSUB output channels × a tile of 256 pixels (tile_y rows × tile_x
// columns of one image); K = 9·cin runs as 9 taps × cin/64 slices of 64 channels (128-byte
// rows), through HW_STAGES stages of [pixels 256 × 64 | weights 64·NSUB × 64] fp16 and two
// barriers each. Dynamic shared memory: HW_STAGES · (32768 + 8192·NSUB) + 64 bytes, plus 1024
// for the alignment.
constexpr int HW_STAGES = 4, HW_PIXELS = 256;
constexpr int HW_X_BYTES = HW_PIXELS * 128;

/// The block's dynamic shared memory from its first 1024-byte aligned shared address.
__device__ __forceinline__ unsigned char* aligned_smem(unsigned char* raw) {
    return raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u);
}

/// The block's conv (NSUB groups of 64 output channels); with `seg`, the seg head and its
/// argmax instead of the output (one block column: cout = 64·NSUB).
template <int NSUB>
__device__ __forceinline__ void conv3x3_wgmma_body(const WgmmaConvParams& p, const SegTail* seg = nullptr) {
    constexpr int BN = 64 * NSUB, STAGE = HW_X_BYTES + BN * 128;
    DYNAMIC_SMEM(raw);
    unsigned char* smem = aligned_smem(raw);
    u64* full = reinterpret_cast<u64*>(smem + HW_STAGES * STAGE);
    u64* empty = full + HW_STAGES;
    const int tid = threadIdx.x, wg = tid / 128;
    const int tiles = p.tiles_x * p.tiles_y;
    const int img = blockIdx.x / tiles, t = blockIdx.x % tiles;
    // The tile's first pixel, and the end of the pixels this launch writes.
    const int x0 = p.up + (t % p.tiles_x) * p.tile_x, y0 = p.up + (t / p.tiles_x) * p.tile_y;
    const int x_end = p.w - p.up, y_end = p.h - p.up;
    const int n0 = blockIdx.y * BN;
    const int cin = p.cin1 + p.cin2, slices = cin / 64, KT = 9 * slices;

    if (tid == 0) {
        for (int s = 0; s < HW_STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 256);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: stage s of round r is refilled once both consumer warpgroups released
        // round r − 1 of it.
        if (tid == 0)
            for (int kt = 0; kt < KT; ++kt) {
                const int s = kt % HW_STAGES, round = kt / HW_STAGES;
                if (round > 0) mbar_wait(&empty[s], (round - 1) & 1);
                const int tap = kt / slices, c = (kt % slices) * 64;
                unsigned char* a = smem + s * STAGE;
                mbar_arrive_expect_tx(&full[s], STAGE);
                const bool first = c < p.cin1;
                tma_load<4>(a, first ? &p.x1 : &p.x2, &full[s], first ? c : c - p.cin1,
                            x0 + tap % 3 - 1, y0 + tap / 3 - 1, img);
                tma_load<2>(a + HW_X_BYTES, &p.wt, &full[s], tap * cin + c, n0);
            }
        return;
    }

    // Consumers: warpgroup g takes pixels 128g..128g+127 of the tile; D[sub] is output
    // channels n0 + 64·sub.. (rows) × those pixels (columns).
    const int g = wg - 1, warp = (tid / 32) % 4, lane = tid % 32;
    float acc[NSUB][64];
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub) {
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[sub][i] = 0.0f;
        wgmma_pin(acc[sub]);
    }
    for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % HW_STAGES;
        mbar_wait(&full[s], (kt / HW_STAGES) & 1);
        const unsigned x = smem_addr(smem + s * STAGE) + g * 128 * 128;
        const unsigned w = smem_addr(smem + s * STAGE + HW_X_BYTES);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int sub = 0; sub < NSUB; ++sub)
                wgmma_m64n128k16(acc[sub], wgmma_desc(w + sub * 64 * 128 + 32 * kk), wgmma_desc(x + 32 * kk));
        wgmma_commit();
        // The previous k-step's MMAs are done: its stage goes back to the producer.
        wgmma_wait<1>();
        if (kt > 0) mbar_arrive(&empty[(kt - 1) % HW_STAGES]);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub) wgmma_pin(acc[sub]);

    // Epilogue: both warpgroups are past their last MMA, so the stages hold the output tile
    // [256 pixels][BN + 8 halves] (bias, ReLU, fp16; transposed from the fragments), stored
    // with 16-byte writes.
    sync_named(1, 256);
    constexpr int LD = BN + 8;
    __half* tile = reinterpret_cast<__half*>(smem);
    const int co0 = warp * 16 + lane / 4, px0 = g * 128 + 2 * (lane % 4);
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int co = sub * 64 + co0 + 8 * hf;
            const float b = p.bias[(n0 + co) % p.cout];  // with `up`: channel of its parity
#pragma unroll
            for (int j = 0; j < 16; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float v = acc[sub][4 * j + 2 * hf + e] + b;
                    if (p.relu) v = fmaxf(v, 0.0f);
                    tile[(px0 + 8 * j + e) * LD + co] = __float2half_rn(v);
                }
        }
    sync_named(1, 256);
    const int ct = tid - 128;
    if (seg != nullptr) {
        const int yy = y0 + ct / p.tile_x, xx = x0 + ct % p.tile_x;
        if (yy < y_end && xx < x_end)
            seg_label(*seg, [&](int c) { return __half2float(tile[ct * LD + c]); },
                      (size_t(img) * p.h + yy) * p.w + xx);
        return;
    }
    constexpr int CH = BN / 8;
    for (int u = ct; u < HW_PIXELS * CH; u += 256) {
        const int row = u / CH, ch = u % CH;
        const int yy = y0 + row / p.tile_x, xx = x0 + row % p.tile_x;
        if (yy >= y_end || xx >= x_end) continue;
        size_t out;
        if (p.up) {
            // Column q·cout + o of low-res pixel (yy, xx): channel o of (2yy + py, 2xx + px).
            const int col = n0 + ch * 8, q = col / p.cout, o = col - q * p.cout;
            out = ((size_t(img) * 2 * p.h + 2 * yy + (q >> 1)) * 2 * p.w + 2 * xx + (q & 1)) * p.cout + o;
        } else {
            out = ((size_t(img) * p.h + yy) * p.w + xx) * p.cout + n0 + ch * 8;
        }
        *reinterpret_cast<uint4*>(p.y + out) = *reinterpret_cast<const uint4*>(&tile[row * LD + ch * 8]);
    }
    if (p.y_pool != nullptr) {
        const int qw = p.tile_x / 2, hh = p.h / 2, hw = p.w / 2;
        for (int u = ct; u < HW_PIXELS / 4 * CH; u += 256) {
            const int q = u / CH, ch = u % CH;
            const int qy = q / qw, qx = q % qw;
            const int py = y0 / 2 + qy, px = x0 / 2 + qx;
            if (py >= hh || px >= hw) continue;
            const int r = 2 * qy * p.tile_x + 2 * qx;
            float m[8], v[8];
            unpack8(*reinterpret_cast<const uint4*>(&tile[r * LD + ch * 8]), m);
            const int others[3] = {r + 1, r + p.tile_x, r + p.tile_x + 1};
            for (int o : others) {
                unpack8(*reinterpret_cast<const uint4*>(&tile[o * LD + ch * 8]), v);
#pragma unroll
                for (int e = 0; e < 8; ++e) m[e] = fmaxf(m[e], v[e]);
            }
            *reinterpret_cast<uint4*>(p.y_pool + ((size_t(img) * hh + py) * hw + px) * p.cout + n0 + ch * 8) =
                pack8(m);
        }
    }
}
#endif

/// Grid (n · tiles_y · tiles_x, cout / 64), 384 threads, 164,928 bytes of dynamic shared
/// memory (see above). sm_90a only.
extern "C" __global__ void __launch_bounds__(HW_THREADS, 1) conv3x3_wgmma_n64(const __grid_constant__ WgmmaConvParams p) {
#ifdef M2UNET_HOPPER
    conv3x3_wgmma_body<1>(p);
#else
    asm volatile("trap;");
#endif
}

/// As conv3x3_wgmma_n64 with 128 output channels per block: grid (…, cout / 128), 197,696
/// bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(HW_THREADS, 1) conv3x3_wgmma_n128(const __grid_constant__ WgmmaConvParams p) {
#ifdef M2UNET_HOPPER
    conv3x3_wgmma_body<2>(p);
#else
    asm volatile("trap;");
#endif
}

struct WgmmaSegParams {
    WgmmaConvParams conv;
    SegTail seg;
};
static_assert(sizeof(WgmmaSegParams) == 640, "WgmmaSegParams layout");

/// As conv3x3_wgmma_n64 (cout = 64, one block column), with the seg head and its argmax in the
/// epilogue instead of the output: `segment`'s last conv (see SegTail).
extern "C" __global__ void __launch_bounds__(HW_THREADS, 1) conv3x3_wgmma_seg(const __grid_constant__ WgmmaSegParams p) {
#ifdef M2UNET_HOPPER
    conv3x3_wgmma_body<1>(p.conv, &p.seg);
#else
    asm volatile("trap;");
#endif
}

struct WgmmaProbeParams {
    TensorMap a;  // [rows][64] fp16, box (64, 64): rows past the tensor's end load as zeros
    TensorMap b;  // [128][64] fp16, box (64, 128)
    float* d;     // [64][128] fp32: d = A · Bᵀ
};
static_assert(sizeof(WgmmaProbeParams) == 384, "WgmmaProbeParams layout");

/// The single-wgmma probe: one warpgroup loads A and B through TMA (128-byte swizzle) on one
/// mbarrier and computes A · Bᵀ with four m64n128k16 steps. 128 threads, 24 KiB + 1032 bytes
/// of dynamic shared memory. Checks TMA, the swizzle, descriptors and fragment layouts at once.
extern "C" __global__ void __launch_bounds__(128) wgmma_probe(const __grid_constant__ WgmmaProbeParams p) {
#ifdef M2UNET_HOPPER
    DYNAMIC_SMEM(raw);
    unsigned char* smem = aligned_smem(raw);
    u64* bar = reinterpret_cast<u64*>(smem + 3 * 8192);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    if (tid == 0) {
        mbar_init(bar, 1);
        mbar_init_fence();
    }
    __syncthreads();
    if (tid == 0) {
        mbar_arrive_expect_tx(bar, 3 * 8192);
        tma_load<2>(smem, &p.a, bar, 0, 0);
        tma_load<2>(smem + 8192, &p.b, bar, 0, 0);
    }
    mbar_wait(bar, 0);
    float acc[64];
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    wgmma_pin(acc);
    wgmma_fence();
    const unsigned a = smem_addr(smem), b = smem_addr(smem + 8192);
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k16(acc, wgmma_desc(a + 32 * kk), wgmma_desc(b + 32 * kk));
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(acc);
    for (int j = 0; j < 16; ++j)
        for (int i = 0; i < 4; ++i) {
            const int row = 16 * warp + lane / 4 + 8 * (i / 2), col = 8 * j + 2 * (lane % 4) + i % 2;
            p.d[row * 128 + col] = acc[4 * j + i];
        }
#else
    asm volatile("trap;");
#endif
}
