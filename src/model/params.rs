//! Parameter table (PyTorch state_dict names, shapes, offsets into one flat fp32 buffer),
//! BatchNorm buffers, PyTorch-default initialisation and per-block counts.

use super::arch::{Arch, ModuleKind};
use crate::config::{ModelConfig, BN_EPS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::ops::Range;

/// How a learnable tensor is initialised (PyTorch defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// kaiming_uniform(a=√5) weight or the matching bias: U(−1/√fan_in, 1/√fan_in).
    Uniform {
        fan_in: usize,
    },
    Ones,
    Zeros,
}

/// One learnable tensor in the flat parameter buffer.
#[derive(Clone, Debug)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub init: Init,
}

impl ParamEntry {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
    /// The block this tensor belongs to (`enc1`, `mil_emb`, `seg_head`, ...).
    pub fn block(&self) -> &str {
        self.name.split('.').next().unwrap_or(&self.name)
    }
}

/// One BatchNorm layer's buffers: running_mean and running_var (in the flat buffer vector,
/// `channels` each, mean first) and its num_batches_tracked counter.
#[derive(Clone, Debug)]
pub struct BnEntry {
    /// Module name, e.g. `enc1.bn1`.
    pub module: String,
    pub channels: usize,
    /// Offset of running_mean in the buffer vector; running_var follows it.
    pub offset: usize,
}

impl BnEntry {
    pub fn mean_range(&self) -> Range<usize> {
        self.offset..self.offset + self.channels
    }
    pub fn var_range(&self) -> Range<usize> {
        self.offset + self.channels..self.offset + 2 * self.channels
    }
}

/// Names, shapes and offsets of every tensor of the network for one config.
#[derive(Clone, Debug)]
pub struct ParamTable {
    /// The layers the table was built from.
    pub arch: Arch,
    pub params: Vec<ParamEntry>,
    pub bns: Vec<BnEntry>,
    /// Total learnable scalars.
    pub n_params: usize,
    /// Total running-statistics scalars (means and variances).
    pub n_buffers: usize,
    index: HashMap<String, usize>,
    bn_index: HashMap<String, usize>,
}

impl ParamTable {
    /// The table of the network `Arch::new(&config)`, walked in its module order.
    pub fn new(config: ModelConfig) -> Self {
        let arch = Arch::new(&config);
        let (mut params, mut bns) = (vec![], vec![]);
        let (mut n_params, mut n_buffers) = (0, 0);
        let mut tensor = |name: String, shape: Vec<usize>, init: Init| {
            let entry = ParamEntry {
                name,
                shape,
                offset: n_params,
                init,
            };
            n_params += entry.len();
            params.push(entry);
        };
        for m in arch.modules() {
            let name = &m.name;
            match m.kind {
                // weight [cout, cin, k, k] or [fout, fin], bias; both U(±1/√fan_in).
                ModuleKind::Conv { cin, cout, k } => {
                    let init = Init::Uniform {
                        fan_in: cin * k * k,
                    };
                    tensor(format!("{name}.weight"), vec![cout, cin, k, k], init);
                    tensor(format!("{name}.bias"), vec![cout], init);
                }
                ModuleKind::Linear { fin, fout } => {
                    let init = Init::Uniform { fan_in: fin };
                    tensor(format!("{name}.weight"), vec![fout, fin], init);
                    tensor(format!("{name}.bias"), vec![fout], init);
                }
                ModuleKind::BatchNorm { c } => {
                    tensor(format!("{name}.weight"), vec![c], Init::Ones);
                    tensor(format!("{name}.bias"), vec![c], Init::Zeros);
                    bns.push(BnEntry {
                        module: name.clone(),
                        channels: c,
                        offset: n_buffers,
                    });
                    n_buffers += 2 * c;
                }
            }
        }
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let bn_index = bns
            .iter()
            .enumerate()
            .map(|(i, e)| (e.module.clone(), i))
            .collect();
        ParamTable {
            arch,
            params,
            bns,
            n_params,
            n_buffers,
            index,
            bn_index,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.arch.config
    }

    /// The learnable tensor called `name`, if the network has one.
    pub fn find(&self, name: &str) -> Option<&ParamEntry> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    /// The range of the learnable tensor `name` in the flat buffer (panics on an unknown name:
    /// the engines only ask for names this table defines).
    pub fn range(&self, name: &str) -> Range<usize> {
        match self.find(name) {
            Some(p) => p.range(),
            None => panic!("no parameter named {name}"),
        }
    }

    /// The BatchNorm layer called `module` (e.g. `dec5.up_bn`).
    pub fn bn(&self, module: &str) -> &BnEntry {
        &self.bns[self.bn_position(module)]
    }

    /// The position of BatchNorm `module` in `bns` (and in `Model::batches_tracked`).
    pub fn bn_position(&self, module: &str) -> usize {
        match self.bn_index.get(module) {
            Some(&i) => i,
            None => panic!("no BatchNorm named {module}"),
        }
    }

    /// Learnable parameter counts per block, in network order.
    pub fn block_counts(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = vec![];
        for p in &self.params {
            match out.last_mut() {
                Some((b, n)) if b == p.block() => *n += p.len(),
                _ => out.push((p.block().to_string(), p.len())),
            }
        }
        out
    }
}

/// A network's state: learnable parameters, BN running statistics and batch counters.
#[derive(Clone, Debug)]
pub struct Model {
    pub table: ParamTable,
    pub params: Vec<f32>,
    /// running_mean/running_var of every BN, laid out by `BnEntry::offset`.
    pub buffers: Vec<f32>,
    /// num_batches_tracked of every BN, in `table.bns` order.
    pub batches_tracked: Vec<i64>,
}

impl Model {
    /// Initialised as PyTorch does by default, from a seeded generator.
    pub fn init(config: ModelConfig, seed: u64) -> Self {
        let table = ParamTable::new(config);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = vec![0f32; table.n_params];
        for p in &table.params {
            let dst = &mut params[p.range()];
            match p.init {
                Init::Uniform { fan_in } => {
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    dst.iter_mut()
                        .for_each(|v| *v = rng.gen_range(-bound..bound));
                }
                Init::Ones => dst.fill(1.0),
                Init::Zeros => dst.fill(0.0),
            }
        }
        let mut buffers = vec![0f32; table.n_buffers];
        for bn in &table.bns {
            buffers[bn.var_range()].fill(1.0);
        }
        let batches_tracked = vec![0; table.bns.len()];
        Model {
            table,
            params,
            buffers,
            batches_tracked,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        self.table.config()
    }

    pub fn arch(&self) -> &Arch {
        &self.table.arch
    }

    /// Weights and bias of `layer` with the eval-mode BatchNorm `bn` that follows it folded in.
    pub fn folded(&self, layer: &str, bn: &str) -> (Vec<f32>, Vec<f32>) {
        let e = self.table.bn(bn);
        fold_bn(
            self.param(&format!("{layer}.weight")),
            self.param(&format!("{layer}.bias")),
            self.param(&format!("{bn}.weight")),
            self.param(&format!("{bn}.bias")),
            &self.buffers[e.mean_range()],
            &self.buffers[e.var_range()],
        )
    }

    /// Records the patch side these weights are trained at (metadata for preprocessing; the
    /// engines take each batch's patch side from its input).
    pub fn set_trained_patch(&mut self, patch: usize) -> anyhow::Result<()> {
        self.table.arch.config.check_patch(patch)?;
        self.table.arch.config.patch = patch;
        Ok(())
    }

    pub fn param(&self, name: &str) -> &[f32] {
        &self.params[self.table.range(name)]
    }
}

/// Folds an eval-mode BatchNorm into the conv or linear layer before it, with weights `w`
/// [out][fan_in] and bias `b` [out]: with s = γ/√(var + ε) per output, w' = w·s and
/// b' = (b − mean)·s + β, computed in f64 and rounded once to f32.
pub fn fold_bn(
    w: &[f32],
    b: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let out = b.len();
    assert!(
        out > 0 && w.len().is_multiple_of(out),
        "fold_bn: w is not [out, fan_in]"
    );
    for v in [gamma, beta, mean, var] {
        assert_eq!(
            v.len(),
            out,
            "fold_bn: BatchNorm vectors need {out} entries"
        );
    }
    let fan_in = w.len() / out;
    let mut wf = vec![0f32; w.len()];
    let mut bf = vec![0f32; out];
    for o in 0..out {
        let s = gamma[o] as f64 / (var[o] as f64 + BN_EPS as f64).sqrt();
        for j in o * fan_in..(o + 1) * fan_in {
            wf[j] = (w[j] as f64 * s) as f32;
        }
        bf[o] = ((b[o] as f64 - mean[o] as f64) * s + beta[o] as f64) as f32;
    }
    (wf, bf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_counts_match_model_md_table() {
        let t = ParamTable::new(ModelConfig::paper());
        let expected = [
            ("enc1", 37_824),
            ("enc2", 74_112),
            ("enc3", 74_112),
            ("enc4", 74_112),
            ("enc5", 2_657_280),
            ("mil_emb", 197_632),
            ("mil_img", 49_408),
            ("classifier", 258),
            ("dec5", 406_080),
            ("dec4", 148_032),
            ("dec3", 148_032),
            ("dec2", 148_032),
            ("seg_head", 390),
        ];
        let got = t.block_counts();
        for ((name, n), (gname, gn)) in expected.iter().zip(&got) {
            println!("{gname}: {gn} (model.md {n})");
            assert_eq!((*name, *n), (gname.as_str(), *gn));
        }
        assert_eq!(got.len(), expected.len());
        assert_eq!(t.n_params, 4_015_304);
        // Table 1's "K" is ×1024: enc1 37K, enc2 72K, enc5 2595K, mil_emb 193K, dec5 397K.
        for (block, k) in [
            ("enc1", 37),
            ("enc2", 72),
            ("enc5", 2595),
            ("mil_emb", 193),
            ("dec5", 397),
        ] {
            let n = got.iter().find(|(b, _)| b == block).unwrap().1;
            assert_eq!((n as f64 / 1024.0).round() as usize, k, "{block}");
        }
    }

    #[test]
    fn init_follows_pytorch_bounds() {
        let m = Model::init(ModelConfig::tiny(), 7);
        let w = m.param("enc2.conv1.weight");
        let bound = 1.0 / ((8 * 9) as f32).sqrt();
        let max = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        println!("enc2.conv1.weight max |w| {max} bound {bound}");
        assert!(max <= bound && max > 0.8 * bound);
        assert!(m.param("enc1.bn1.weight").iter().all(|&v| v == 1.0));
        assert!(m.param("enc1.bn1.bias").iter().all(|&v| v == 0.0));
        let bn = m.table.bn("dec2.bn2");
        assert!(m.buffers[bn.var_range()].iter().all(|&v| v == 1.0));
        assert!(m.buffers[bn.mean_range()].iter().all(|&v| v == 0.0));
    }
}
