//! fp32 matrix transpose on the device: the MIL concepts' weight into the [in][out] layout
//! mil_concepts_gcp reads, rewritten from the master weights after every optimiser step.
//! Equals: src/cuda/weights.rs `transpose` (the host's repack of the same weight).
#include "common.cuh"

/// y [cols][rows] = x [rows][cols] transposed.
struct TransposeParams {
    const float* x;
    float* y;
    int rows, cols;
};
static_assert(sizeof(TransposeParams) == 24, "TransposeParams layout");

/// One thread per element, reading x in order.
extern "C" __global__ void transpose_f32(const TransposeParams p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.rows * p.cols) return;
    const int r = i / p.cols, c = i - r * p.cols;
    p.y[size_t(c) * p.rows + r] = p.x[i];
}
