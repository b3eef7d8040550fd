//! The network's layers, listed once from the config: the parameter table, the FLOP count,
//! both engines' forward and backward, the CUDA weight packing and the test reference walk it.

use crate::config::ModelConfig;

/// Where a conv unit reads one part of its (channel-concatenated) input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    /// The input patches.
    Input,
    /// The output of unit `i` (same resolution).
    Unit(usize),
    /// The 2×2 max-pool (stride 2) of unit `i`'s output.
    Pooled(usize),
    /// The ×2 bilinear upsampling (align_corners=False) of unit `i`'s output.
    Upsampled(usize),
}

/// A 3×3 convolution (stride 1, zero padding 1, bias) → BatchNorm2d → ReLU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvUnit {
    /// Module names of the convolution (`enc1.conv1`) and its BatchNorm (`enc1.bn1`).
    pub conv: String,
    pub bn: String,
    /// The input: these parts concatenated along channels, in order, with their channels.
    pub inputs: Vec<(Src, usize)>,
    pub cout: usize,
    /// Resolution level: the unit works at side P >> level.
    pub level: usize,
    /// Some later unit reads this unit's output max-pooled.
    pub pooled: bool,
}

impl ConvUnit {
    pub fn cin(&self) -> usize {
        self.inputs.iter().map(|&(_, c)| c).sum()
    }
}

/// A fully connected layer `y = W x + b` (PyTorch Linear, weight [fout, fin]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linear {
    pub name: String,
    pub fin: usize,
    pub fout: usize,
}

/// The two-level multi-instance head on the bottleneck output h (docs/model.md, "MIL head").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MilHead {
    /// The unit whose output is h, its channels and level.
    pub src: usize,
    pub channels: usize,
    pub level: usize,
    /// Embedding level: concepts (h positions → K1 scores), GCP per patch, proj, BatchNorm1d
    /// (`bn`, K1 channels), ReLU.
    pub emb_concepts: Linear,
    pub emb_proj: Linear,
    pub emb_bn: String,
    /// Image level: concepts (K1 → K2 per patch), GCP per bag, proj, ReLU.
    pub img_concepts: Linear,
    pub img_proj: Linear,
    /// Severity logits.
    pub classifier: Linear,
}

/// The 1×1 convolution (with bias, no BN or ReLU) that turns the last unit into seg logits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegHead {
    pub name: String,
    pub src: usize,
    pub cin: usize,
    pub classes: usize,
}

/// What a learnable module holds, for the parameter table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// k×k convolution with bias: weight [cout, cin, k, k], bias [cout].
    Conv {
        cin: usize,
        cout: usize,
        k: usize,
    },
    Linear {
        fin: usize,
        fout: usize,
    },
    /// γ, β (learnable) and running mean/var (buffers), `c` channels each.
    BatchNorm {
        c: usize,
    },
}

/// One learnable module under its PyTorch name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub kind: ModuleKind,
}

/// The whole network for one config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arch {
    pub config: ModelConfig,
    /// Every conv unit in forward order: encoder stages, then decoder blocks.
    pub units: Vec<ConvUnit>,
    pub mil: MilHead,
    pub seg: SegHead,
}

impl Arch {
    /// Encoder stage k (1..=D): conv1, conv2 at level k − 1; every stage but the last is
    /// max-pooled into the next. Decoder block k (D..=2): up_conv of the upsampled input,
    /// conv1 of [up_conv output, skip of stage k − 1], conv2.
    pub fn new(config: &ModelConfig) -> Self {
        let c = config;
        let (w, d) = (c.enc_width, c.depth);
        let mut units: Vec<ConvUnit> = vec![];
        let push = |units: &mut Vec<ConvUnit>,
                    conv: String,
                    bn: String,
                    inputs: Vec<(Src, usize)>,
                    cout: usize,
                    level: usize| {
            units.push(ConvUnit {
                conv,
                bn,
                inputs,
                cout,
                level,
                pooled: false,
            });
            units.len() - 1
        };
        let mut input = (Src::Input, c.in_channels);
        let mut skips = vec![];
        for k in 1..=d {
            let cout = if k == d { c.bottleneck_width } else { w };
            let s = format!("enc{k}");
            let c1 = push(
                &mut units,
                format!("{s}.conv1"),
                format!("{s}.bn1"),
                vec![input],
                cout,
                k - 1,
            );
            let c2 = push(
                &mut units,
                format!("{s}.conv2"),
                format!("{s}.bn2"),
                vec![(Src::Unit(c1), cout)],
                cout,
                k - 1,
            );
            skips.push(c2);
            input = (Src::Pooled(c2), cout);
        }
        let h = *skips.last().expect("depth ≥ 2");
        for &skip in skips[..d - 1].iter() {
            units[skip].pooled = true;
        }
        let mut low = (h, c.bottleneck_width);
        for k in (2..=d).rev() {
            let s = format!("dec{k}");
            let level = k - 2;
            let up = push(
                &mut units,
                format!("{s}.up_conv"),
                format!("{s}.up_bn"),
                vec![(Src::Upsampled(low.0), low.1)],
                w,
                level,
            );
            let c1 = push(
                &mut units,
                format!("{s}.conv1"),
                format!("{s}.bn1"),
                vec![(Src::Unit(up), w), (Src::Unit(skips[level]), w)],
                w,
                level,
            );
            let c2 = push(
                &mut units,
                format!("{s}.conv2"),
                format!("{s}.bn2"),
                vec![(Src::Unit(c1), w)],
                w,
                level,
            );
            low = (c2, w);
        }
        let linear = |name: &str, fin, fout| Linear {
            name: name.to_string(),
            fin,
            fout,
        };
        let (b, k1, k2) = (c.bottleneck_width, c.emb_concepts, c.img_concepts);
        let mil = MilHead {
            src: h,
            channels: b,
            level: d - 1,
            emb_concepts: linear("mil_emb.concepts", b, k1),
            emb_proj: linear("mil_emb.proj", k1, k1),
            emb_bn: "mil_emb.bn".to_string(),
            img_concepts: linear("mil_img.concepts", k1, k2),
            img_proj: linear("mil_img.proj", k2, k2),
            classifier: linear("classifier", k2, c.cls_classes),
        };
        let seg = SegHead {
            name: "seg_head".to_string(),
            src: low.0,
            cin: w,
            classes: c.seg_classes,
        };
        Arch {
            config: *config,
            units,
            mil,
            seg,
        }
    }

    /// The units of the encoder (those before the first decoder unit).
    pub fn encoder_units(&self) -> usize {
        2 * self.config.depth
    }

    /// Every learnable module in parameter-table order (PyTorch's module order): encoder,
    /// MIL head, classifier, decoder, seg head.
    pub fn modules(&self) -> Vec<Module> {
        let conv_modules = |u: &ConvUnit| {
            [
                Module {
                    name: u.conv.clone(),
                    kind: ModuleKind::Conv {
                        cin: u.cin(),
                        cout: u.cout,
                        k: 3,
                    },
                },
                Module {
                    name: u.bn.clone(),
                    kind: ModuleKind::BatchNorm { c: u.cout },
                },
            ]
        };
        let linear = |l: &Linear| Module {
            name: l.name.clone(),
            kind: ModuleKind::Linear {
                fin: l.fin,
                fout: l.fout,
            },
        };
        let (enc, dec) = self.units.split_at(self.encoder_units());
        let m = &self.mil;
        let mut out: Vec<Module> = enc.iter().flat_map(conv_modules).collect();
        out.extend([
            linear(&m.emb_concepts),
            linear(&m.emb_proj),
            Module {
                name: m.emb_bn.clone(),
                kind: ModuleKind::BatchNorm { c: m.emb_proj.fout },
            },
            linear(&m.img_concepts),
            linear(&m.img_proj),
            linear(&m.classifier),
        ]);
        out.extend(dec.iter().flat_map(conv_modules));
        out.push(Module {
            name: self.seg.name.clone(),
            kind: ModuleKind::Conv {
                cin: self.seg.cin,
                cout: self.seg.classes,
                k: 1,
            },
        });
        out
    }

    /// Forward FLOPs of one patch of side `p`: 2·Cout·Cin·9·H·W per 3×3 convolution plus the
    /// 1×1 seg head (the MIL head, BatchNorm, pooling and upsampling are not counted; they are
    /// < 0.1 % for the paper network). A training step counts as 3× this.
    pub fn forward_flops_per_patch(&self, p: usize) -> f64 {
        let convs: f64 = self
            .units
            .iter()
            .map(|u| {
                let side = p >> u.level;
                2.0 * (u.cout * u.cin() * 9 * side * side) as f64
            })
            .sum();
        convs + 2.0 * (self.seg.classes * self.seg.cin * p * p) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_units_follow_model_md() {
        let a = Arch::new(&ModelConfig::paper());
        let names: Vec<&str> = a.units.iter().map(|u| u.conv.as_str()).collect();
        println!("{names:?}");
        assert_eq!(a.units.len(), 10 + 12);
        assert_eq!(names[0], "enc1.conv1");
        assert_eq!(names[9], "enc5.conv2");
        assert_eq!(names[10], "dec5.up_conv");
        assert_eq!(names[21], "dec2.conv2");
        // dec5.conv1 reads [dec5.up_conv, enc4.conv2] at level 3; enc2.conv1 reads enc1's pool.
        assert_eq!(
            a.units[11].inputs,
            vec![(Src::Unit(10), 64), (Src::Unit(7), 64)]
        );
        assert_eq!(a.units[11].level, 3);
        assert_eq!(a.units[2].inputs, vec![(Src::Pooled(1), 64)]);
        assert_eq!(a.units[10].inputs, vec![(Src::Upsampled(9), 512)]);
        let pooled: Vec<usize> = (0..a.units.len()).filter(|&i| a.units[i].pooled).collect();
        assert_eq!(pooled, vec![1, 3, 5, 7]);
        assert_eq!((a.mil.src, a.mil.level, a.seg.src), (9, 4, 21));
    }

    #[test]
    fn paper_patch_costs_about_36_gflop() {
        // Hand count for P=256, W=64, B=512 (GFLOP): enc1 0.076+4.832, enc2-4 2·(1.208+0.302+0.075),
        // enc5 0.151+1.208, dec5 0.604+0.151+0.075, dec4 0.302+0.604+0.302,
        // dec3 1.208+2.416+1.208, dec2 4.832+9.664+4.832, seg head 0.050.
        let g = Arch::new(&ModelConfig::paper()).forward_flops_per_patch(256) / 1e9;
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
