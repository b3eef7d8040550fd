//! The optimiser step on the device: the inf/NaN check of the scaled gradients, AdamW on the fp32 master weights (skipped when a gradient overflowed) and the loss-scale update.
//! Equals (src/reference.rs has no optimiser; the truth is src/cpu/ops/optim.rs): adamw =
//! cpu::ops::optim::adamw_step of grad / S with t = steps + 1, bit for bit; grad_check and
//! amp_update follow PyTorch's GradScaler (found_inf, backoff, growth after growth_interval
//! clean steps).
#include "amp.cuh"

struct GradCheckParams {
    const float* g;
    AmpState* amp;
    int len, pad_;
};

struct AdamWParams {
    float* params;        // fp32 master weights (flat)
    const float* grads;   // scaled gradients
    float* m;
    float* v;
    const AmpState* amp;  // skip everything when found_inf; t = amp->steps + 1; g = grad / scale;
                          // the learning rate is amp->lr
    int len, pad_;
    float beta1, beta2, eps, weight_decay;
};

struct AmpUpdateParams {
    AmpState* amp;
    int growth_interval;
    float growth, backoff;
    int pad_;
};

// The Rust twins (src/cuda/kernels/optim.rs) assert the same sizes.
static_assert(sizeof(GradCheckParams) == 24, "GradCheckParams layout");
static_assert(sizeof(AdamWParams) == 64, "AdamWParams layout");
static_assert(sizeof(AmpUpdateParams) == 24, "AmpUpdateParams layout");

/// Grid-stride over the gradients; a thread that saw an inf or NaN sets found_inf (an integer
/// OR: the result does not depend on the order).
extern "C" __global__ void grad_check(const GradCheckParams p) {
    bool bad = false;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.len; i += gridDim.x * blockDim.x)
        bad |= !(fabsf(p.g[i]) <= 3.4028235e38f);  // false for ±inf and NaN
    if (bad) atomicOr(&p.amp->found_inf, 1);
}

/// Grid-stride, one element per thread and step. The scalar coefficients are computed once
/// per block in double as the CPU does (from the f32 hyper-parameters); the element updates
/// use round-to-nearest intrinsics so that no multiply-add is contracted into an FMA, which
/// keeps them bit-identical to the CPU's f32 arithmetic.
extern "C" __global__ void adamw(const AdamWParams p) {
    __shared__ float coef[6];  // decay, 1 − β1, 1 − β2, step size, sqrt(1 − β2^t), 1/S
    if (p.amp->found_inf) return;
    if (threadIdx.x == 0) {
        const double lr = p.amp->lr, b1 = p.beta1, b2 = p.beta2, t = double(p.amp->steps + 1);
        coef[0] = float(1.0 - __dmul_rn(lr, double(p.weight_decay)));
        coef[1] = float(1.0 - b1);
        coef[2] = float(1.0 - b2);
        coef[3] = float(lr / (1.0 - pow(b1, t)));
        coef[4] = float(sqrt(1.0 - pow(b2, t)));
        coef[5] = p.amp->scale;
    }
    __syncthreads();
    const float decay = coef[0], omb1 = coef[1], omb2 = coef[2], step = coef[3], bc2 = coef[4];
    const float scale = coef[5];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.len; i += gridDim.x * blockDim.x) {
        const float g = p.grads[i] / scale;
        float w = __fmul_rn(p.params[i], decay);
        float m = __fadd_rn(p.m[i], __fmul_rn(omb1, __fsub_rn(g, p.m[i])));
        float v = __fadd_rn(__fmul_rn(p.v[i], p.beta2), __fmul_rn(__fmul_rn(omb2, g), g));
        const float denom = __fadd_rn(sqrtf(v) / bc2, p.eps);
        w = __fadd_rn(w, __fmul_rn(-step, m / denom));
        p.params[i] = w;
        p.m[i] = m;
        p.v[i] = v;
    }
}

/// One thread, after adamw: records the step's scale, then backs off and skips on overflow,
/// else counts the step and grows the scale after growth_interval clean steps; clears
/// found_inf.
extern "C" __global__ void amp_update(const AmpUpdateParams p) {
    AmpState* a = p.amp;
    a->last_scale = a->scale;
    if (a->found_inf) {
        a->scale *= p.backoff;
        a->good_steps = 0;
        a->skipped += 1;
        a->last_skipped = 1;
    } else {
        a->steps += 1;
        a->good_steps += 1;
        a->last_skipped = 0;
        if (a->good_steps == p.growth_interval) {
            a->scale *= p.growth;
            a->good_steps = 0;
        }
    }
    a->found_inf = 0;
}
