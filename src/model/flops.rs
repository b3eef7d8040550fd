//! Analytic FLOP counts of the network (for GFLOP/s and TFLOP/s next to timings).

use crate::config::ModelConfig;

fn conv3(cin: usize, cout: usize, side: usize) -> f64 {
    2.0 * (cout * cin * 9 * side * side) as f64
}

/// Forward FLOPs of one patch: 2·Cout·Cin·9·H·W per 3×3 convolution plus the 1×1 seg head
/// (the MIL head, BatchNorm, pooling and upsampling are not counted; they are < 0.1 %).
/// A training step (forward, data and weight gradients) counts as 3× this.
pub fn forward_flops_per_patch(cfg: &ModelConfig) -> f64 {
    let (p, w, b) = (cfg.patch, cfg.enc_width, cfg.bottleneck_width);
    let mut flops = conv3(cfg.in_channels, w, p) + conv3(w, w, p);
    for k in 1..4 {
        flops += 2.0 * conv3(w, w, p >> k);
    }
    flops += conv3(w, b, p >> 4) + conv3(b, b, p >> 4);
    for (k, cin) in [(3, b), (2, w), (1, w), (0, w)] {
        flops += conv3(cin, w, p >> k) + conv3(2 * w, w, p >> k) + conv3(w, w, p >> k);
    }
    flops + 2.0 * (cfg.seg_classes * w * p * p) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_patch_costs_about_36_gflop() {
        // Hand count for P=256, W=64, B=512 (GFLOP): enc1 0.076+4.832, enc2-4 2·(1.208+0.302+0.075),
        // enc5 0.151+1.208, dec5 0.604+0.151+0.075, dec4 0.302+0.604+0.302,
        // dec3 1.208+2.416+1.208, dec2 4.832+9.664+4.832, seg head 0.050.
        let g = forward_flops_per_patch(&ModelConfig::paper()) / 1e9;
        let hand = 0.0755
            + 4.832
            + 2.0 * (1.208 + 0.302 + 0.0755)
            + 0.151
            + 1.208
            + 0.604
            + 0.151
            + 0.0755
            + 0.302
            + 0.604
            + 0.302
            + 1.208
            + 2.416
            + 1.208
            + 4.832
            + 9.664
            + 4.832
            + 0.0503;
        println!("paper forward: {g:.3} GFLOP per patch (hand count {hand:.3})");
        assert!((g - hand).abs() / hand < 2e-3);
    }
}
