//! The device-side state of dynamic loss scaling and AdamW's step count, shared by the loss kernels (kernels/heads_grad.cu) and the optimiser (kernels/optim.cu); Rust twin in src/cuda/kernels/optim.rs.
#pragma once
#include "common.cuh"

/// Dynamic loss scaling (PyTorch GradScaler) and AdamW's step count, on the device.
struct AmpState {
    float scale;       // loss scale S (starts at 65536)
    int found_inf;     // set by grad_check when any gradient is inf/NaN; cleared by amp_update
    int good_steps;    // clean steps since the last growth or skip
    int steps;         // AdamW steps taken (t); skipped steps do not count
    int skipped;       // total skipped steps
    int last_skipped;  // 1 when the last step was skipped
    float lr;          // AdamW's learning rate, written by the host before each step (a schedule
                       // changes it; a captured step graph cannot carry it by value)
    float last_scale;  // the loss scale the last step's gradients carried (set by amp_update)
};

static_assert(sizeof(AmpState) == 32, "AmpState layout");
