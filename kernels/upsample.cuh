//! The bilinear ×2 upsampling (align_corners=False) of one 8-channel NHWC vector in fp16x2
//! arithmetic, shared by conv3x3_igemm_up's loader (conv.cu) and upsample2x (norm_grad.cu) so
//! that both produce the same bits.
#pragma once
#include "common.cuh"

/// The four low-resolution neighbours (and weights) of one 8-channel vector of the bilinear ×2
/// upsampling (align_corners=False) of x.
struct UpFetch {
    uint4 v[4];
    float ly, lx;
};

/// Issues the loads of channels c..c+7 at high-resolution pixel (yy, xx) of image n of
/// x [n, in_h, in_w, cs] (cs channels per pixel).
__device__ __forceinline__ void upsample_fetch(const __half* x, int in_h, int in_w, int cs, int n,
                                               int yy, int xx, int c, UpFetch& f) {
    float sy = fmaxf((yy + 0.5f) * 0.5f - 0.5f, 0.0f);
    float sx = fmaxf((xx + 0.5f) * 0.5f - 0.5f, 0.0f);
    int y0 = int(sy), x0 = int(sx);
    int y1 = imin(y0 + 1, in_h - 1), x1 = imin(x0 + 1, in_w - 1);
    f.ly = sy - float(y0);
    f.lx = sx - float(x0);
    const __half* base = x + size_t(n) * in_h * in_w * cs + c;
    f.v[0] = *reinterpret_cast<const uint4*>(base + (size_t(y0) * in_w + x0) * cs);
    f.v[1] = *reinterpret_cast<const uint4*>(base + (size_t(y0) * in_w + x1) * cs);
    f.v[2] = *reinterpret_cast<const uint4*>(base + (size_t(y1) * in_w + x0) * cs);
    f.v[3] = *reinterpret_cast<const uint4*>(base + (size_t(y1) * in_w + x1) * cs);
}

/// Interpolates a fetched vector in fp16x2 arithmetic (the weights 0, ¼, ¾ are exact in fp16):
/// top = a + lx·(b − a), bottom = c + lx·(d − c), result = top + ly·(bottom − top).
__device__ __forceinline__ uint4 upsample_blend(const UpFetch& f) {
    const __half2 lx = __float2half2_rn(f.lx), ly = __float2half2_rn(f.ly);
    const __half2* a = reinterpret_cast<const __half2*>(&f.v[0]);
    const __half2* b = reinterpret_cast<const __half2*>(&f.v[1]);
    const __half2* c = reinterpret_cast<const __half2*>(&f.v[2]);
    const __half2* d = reinterpret_cast<const __half2*>(&f.v[3]);
    uint4 out;
    __half2* o = reinterpret_cast<__half2*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        __half2 top = __hfma2(lx, __hsub2(b[i], a[i]), a[i]);
        __half2 bot = __hfma2(lx, __hsub2(d[i], c[i]), c[i]);
        o[i] = __hfma2(ly, __hsub2(bot, top), top);
    }
    return out;
}
