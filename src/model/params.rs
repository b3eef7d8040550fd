//! Parameter table (PyTorch state_dict names, shapes, offsets into one flat fp32 buffer),
//! BatchNorm buffers, PyTorch-default initialisation and per-block counts.

use crate::config::ModelConfig;
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
    pub config: ModelConfig,
    pub params: Vec<ParamEntry>,
    pub bns: Vec<BnEntry>,
    /// Total learnable scalars.
    pub n_params: usize,
    /// Total running-statistics scalars (means and variances).
    pub n_buffers: usize,
    index: HashMap<String, usize>,
    bn_index: HashMap<String, usize>,
}

struct Builder {
    params: Vec<ParamEntry>,
    bns: Vec<BnEntry>,
    n_params: usize,
    n_buffers: usize,
}

impl Builder {
    fn tensor(&mut self, name: String, shape: Vec<usize>, init: Init) {
        let entry = ParamEntry {
            name,
            shape,
            offset: self.n_params,
            init,
        };
        self.n_params += entry.len();
        self.params.push(entry);
    }
    /// A 3×3 (k=3) or 1×1 (k=1) convolution with bias.
    fn conv(&mut self, module: &str, cin: usize, cout: usize, k: usize) {
        let fan_in = cin * k * k;
        self.tensor(
            format!("{module}.weight"),
            vec![cout, cin, k, k],
            Init::Uniform { fan_in },
        );
        self.tensor(
            format!("{module}.bias"),
            vec![cout],
            Init::Uniform { fan_in },
        );
    }
    fn linear(&mut self, module: &str, fin: usize, fout: usize) {
        self.tensor(
            format!("{module}.weight"),
            vec![fout, fin],
            Init::Uniform { fan_in: fin },
        );
        self.tensor(
            format!("{module}.bias"),
            vec![fout],
            Init::Uniform { fan_in: fin },
        );
    }
    fn bn(&mut self, module: &str, c: usize) {
        self.tensor(format!("{module}.weight"), vec![c], Init::Ones);
        self.tensor(format!("{module}.bias"), vec![c], Init::Zeros);
        self.bns.push(BnEntry {
            module: module.to_string(),
            channels: c,
            offset: self.n_buffers,
        });
        self.n_buffers += 2 * c;
    }
}

impl ParamTable {
    pub fn new(config: ModelConfig) -> Self {
        let (w, b) = (config.enc_width, config.bottleneck_width);
        let (k1, k2) = (config.emb_concepts, config.img_concepts);
        let mut t = Builder {
            params: vec![],
            bns: vec![],
            n_params: 0,
            n_buffers: 0,
        };
        for (i, (cin, cout)) in [(config.in_channels, w), (w, w), (w, w), (w, w), (w, b)]
            .into_iter()
            .enumerate()
        {
            let m = format!("enc{}", i + 1);
            t.conv(&format!("{m}.conv1"), cin, cout, 3);
            t.bn(&format!("{m}.bn1"), cout);
            t.conv(&format!("{m}.conv2"), cout, cout, 3);
            t.bn(&format!("{m}.bn2"), cout);
        }
        t.linear("mil_emb.concepts", b, k1);
        t.linear("mil_emb.proj", k1, k1);
        t.bn("mil_emb.bn", k1);
        t.linear("mil_img.concepts", k1, k2);
        t.linear("mil_img.proj", k2, k2);
        t.linear("classifier", k2, config.cls_classes);
        for (k, cin) in [(5, b), (4, w), (3, w), (2, w)] {
            let m = format!("dec{k}");
            t.conv(&format!("{m}.up_conv"), cin, w, 3);
            t.bn(&format!("{m}.up_bn"), w);
            t.conv(&format!("{m}.conv1"), 2 * w, w, 3);
            t.bn(&format!("{m}.bn1"), w);
            t.conv(&format!("{m}.conv2"), w, w, 3);
            t.bn(&format!("{m}.bn2"), w);
        }
        t.conv("seg_head", w, config.seg_classes, 1);
        let index = t
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let bn_index = t
            .bns
            .iter()
            .enumerate()
            .map(|(i, e)| (e.module.clone(), i))
            .collect();
        ParamTable {
            config,
            params: t.params,
            bns: t.bns,
            n_params: t.n_params,
            n_buffers: t.n_buffers,
            index,
            bn_index,
        }
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
        match self.bn_index.get(module) {
            Some(&i) => &self.bns[i],
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
        &self.table.config
    }

    pub fn param(&self, name: &str) -> &[f32] {
        &self.params[self.table.range(name)]
    }
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
