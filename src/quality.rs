//! The quality gate of `assess`: is this a plausible chest CT with a plausible lobe map? Each check with its measured value, accepted range and result.
//!
//! A check outside its range is fatal (the volume is not a chest CT, or its header or values are
//! broken: the severity is unreliable and `assess` exits non-zero unless `--force`) or a warning
//! (an unusual but possible chest CT, such as partial coverage). [`RULES`] lists every check
//! with its range and why; `assess --help` and the README repeat them.

use crate::data::preprocess::CanonicalCt;
use rayon::prelude::*;
use serde::Serialize;

/// What a check's value means for the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    /// Outside the range but possible in a chest CT: reported, the result stands.
    Warning,
    /// Not a chest CT, or broken values: the severity is unreliable.
    Fail,
}

/// One check of the gate: its range, and what a value below or above it (or none) means.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub name: &'static str,
    pub unit: &'static str,
    pub accepted: [f64; 2],
    pub below: Outcome,
    pub above: Outcome,
    /// The outcome when nothing could be measured (no lung, no lobe; the lung checks then fail
    /// on `lung_sides` already).
    pub missing: Outcome,
    /// Why the range is what it is.
    pub why: &'static str,
}

/// Every check, in the report's order.
pub const RULES: [Rule; 13] = [
    spacing("spacing_x_mm"),
    spacing("spacing_y_mm"),
    spacing("spacing_z_mm"),
    Rule {
        name: "hu_min",
        unit: "HU",
        accepted: [-4096.0, -500.0],
        below: Outcome::Fail,
        above: Outcome::Fail,
        missing: Outcome::Fail,
        why: "air is −1000 HU and scanners pad outside the reconstruction circle down to −3024 \
              (lossy compression of that padding reaches about −4000); no air at all, or values \
              below −4096, mean the values are not scaled HU",
    },
    Rule {
        name: "hu_max",
        unit: "HU",
        accepted: [100.0, 32767.0],
        below: Outcome::Fail,
        above: Outcome::Fail,
        missing: Outcome::Fail,
        why: "bone is above 300 HU; nothing denser than water means no body in HU, and a CT pixel \
              holds at most 32767 (the extended metal scale ends near 30000)",
    },
    Rule {
        name: "identical_slices",
        unit: "share of adjacent slice pairs",
        accepted: [0.0, 0.5],
        below: Outcome::Pass,
        above: Outcome::Fail,
        missing: Outcome::Fail,
        why: "measured noise makes every real slice differ from its neighbours; repeated slices \
              are a copied image, not a scan",
    },
    Rule {
        name: "body_slices",
        unit: "share of slices",
        accepted: [0.5, 1.0],
        below: Outcome::Fail,
        above: Outcome::Pass,
        missing: Outcome::Fail,
        why: "a chest CT shows the body (above −500 HU) on every slice",
    },
    Rule {
        name: "lung_sides",
        unit: "lungs",
        accepted: [2.0, 2.0],
        below: Outcome::Fail,
        above: Outcome::Pass,
        missing: Outcome::Fail,
        why: "a chest CT shows air-filled lung on both sides of the body (after a pneumonectomy, \
              pass --force)",
    },
    Rule {
        name: "lung_volume_ml",
        unit: "mL",
        accepted: [2000.0, 10000.0],
        below: Outcome::Warning,
        above: Outcome::Fail,
        missing: Outcome::Warning,
        why: "adult lungs hold 2–8 L on CT; less is partial coverage (only the bases, say), a \
              child or a small phantom; more than 10 L is no human lung (a wrong spacing)",
    },
    Rule {
        name: "lung_body_fraction",
        unit: "lung / body in the lung slices",
        accepted: [0.10, 0.70],
        below: Outcome::Warning,
        above: Outcome::Fail,
        missing: Outcome::Warning,
        why: "lungs fill a quarter to a half of the chest's cross-section; less is partial \
              coverage or much dense disease, more than 70 % leaves no room for the chest wall, \
              heart and mediastinum",
    },
    Rule {
        name: "lobe_mean_hu",
        unit: "HU",
        accepted: [-1000.0, -100.0],
        below: Outcome::Fail,
        above: Outcome::Fail,
        missing: Outcome::Fail,
        why: "aerated lung is about −850 HU and even diffusely diseased lung stays below −100; \
              lobes outside this range lie on other tissue or on mis-scaled values",
    },
    Rule {
        name: "lobes_present",
        unit: "lobes",
        accepted: [5.0, 5.0],
        below: Outcome::Warning,
        above: Outcome::Pass,
        missing: Outcome::Warning,
        why: "the network labels five lobes; fewer is partial coverage, a lobectomy or a missed \
              lobe",
    },
    Rule {
        name: "lobes_to_lung_mask",
        unit: "lobe volume / lung-mask volume",
        accepted: [0.75, 1.25],
        below: Outcome::Warning,
        above: Outcome::Warning,
        missing: Outcome::Warning,
        why: "the lobes and the lung mask measured from the HU should agree within 25 %; more \
              lobe than mask is expected with much dense disease (consolidation is not air), \
              less means the network missed aerated lung",
    },
];

const fn spacing(name: &'static str) -> Rule {
    Rule {
        name,
        unit: "mm",
        accepted: [0.2, 10.0],
        below: Outcome::Fail,
        above: Outcome::Fail,
        missing: Outcome::Fail,
        why: "CT voxels are 0.2–1 mm in-plane and slices 0.5–10 mm apart; other spacings are a \
              broken header",
    }
}

/// What the gate measures on one volume (`None`: could not be measured).
#[derive(Clone, Debug, Default)]
pub struct Measurements {
    pub spacing_mm: [f64; 3],
    pub hu_min: f64,
    pub hu_max: f64,
    pub identical_slices: f64,
    pub body_slices: f64,
    pub lung_sides: usize,
    pub lung_volume_ml: f64,
    pub lung_body_fraction: Option<f64>,
    pub lobe_mean_hu: Option<f64>,
    pub lobes_present: usize,
    pub lobes_to_lung_mask: Option<f64>,
}

impl Measurements {
    /// The values in [`RULES`] order.
    fn values(&self) -> [Option<f64>; 13] {
        let s = self.spacing_mm;
        [
            Some(s[0]),
            Some(s[1]),
            Some(s[2]),
            Some(self.hu_min),
            Some(self.hu_max),
            Some(self.identical_slices),
            Some(self.body_slices),
            Some(self.lung_sides as f64),
            Some(self.lung_volume_ml),
            self.lung_body_fraction,
            self.lobe_mean_hu,
            Some(self.lobes_present as f64),
            self.lobes_to_lung_mask,
        ]
    }
}

/// One check's result in the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub measured: Option<f64>,
    pub accepted: [f64; 2],
    pub unit: String,
    pub result: Outcome,
    /// Why the range is what it is (shown for a check that did not pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl Check {
    /// `lung_volume_ml = 450 (accepted 2000 to 10000 mL)`, for messages.
    pub fn describe(&self) -> String {
        let value = match self.measured {
            Some(v) => format!("= {}", Fmt(v)),
            None => "not measured".to_string(),
        };
        format!(
            "{} {value} (accepted {} to {} {})",
            self.name,
            Fmt(self.accepted[0]),
            Fmt(self.accepted[1]),
            self.unit
        )
    }
}

/// A number for messages: integers as they are, others with 3 significant figures.
struct Fmt(f64);

impl std::fmt::Display for Fmt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0;
        if !v.is_finite() || v.abs() >= 1e6 || (v != 0.0 && v.abs() < 1e-3) {
            write!(f, "{v:.3e}")
        } else if v.fract() == 0.0 {
            write!(f, "{v:.0}")
        } else {
            write!(f, "{}", format!("{v:.3}").trim_end_matches('0'))
        }
    }
}

/// The report's `quality` section.
#[derive(Clone, Debug, Serialize)]
pub struct Quality {
    /// No check failed (warnings allowed).
    pub passed: bool,
    /// Names of the failed checks.
    pub failed: Vec<String>,
    /// Names of the checks that warn.
    pub warned: Vec<String>,
    pub checks: Vec<Check>,
}

impl Quality {
    /// The checks with result `outcome`.
    pub fn with(&self, outcome: Outcome) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(move |c| c.result == outcome)
    }
}

/// Judges the measurements by [`RULES`].
pub fn evaluate(m: &Measurements) -> Quality {
    let checks: Vec<Check> = RULES
        .iter()
        .zip(m.values())
        .map(|(rule, value)| {
            let result = match value {
                None => rule.missing,
                Some(v) if v.is_nan() => Outcome::Fail,
                Some(v) if v < rule.accepted[0] => rule.below,
                Some(v) if v > rule.accepted[1] => rule.above,
                Some(_) => Outcome::Pass,
            };
            Check {
                name: rule.name.to_string(),
                measured: value,
                accepted: rule.accepted,
                unit: rule.unit.to_string(),
                result,
                why: (result != Outcome::Pass).then(|| rule.why.to_string()),
            }
        })
        .collect();
    let names = |o: Outcome| -> Vec<String> {
        checks
            .iter()
            .filter(|c| c.result == o)
            .map(|c| c.name.clone())
            .collect()
    };
    let (failed, warned) = (names(Outcome::Fail), names(Outcome::Warning));
    Quality {
        passed: failed.is_empty(),
        failed,
        warned,
        checks,
    }
}

/// The share of adjacent axial slice pairs that are identical, value for value.
pub fn identical_slice_share(ct: &CanonicalCt) -> f64 {
    let nz = ct.dims[2];
    if nz < 2 {
        return 1.0;
    }
    let same = (0..nz - 1)
        .into_par_iter()
        .filter(|&z| {
            ct.slice(z)
                .iter()
                .zip(ct.slice(z + 1))
                .all(|(a, b)| a.to_bits() == b.to_bits())
        })
        .count();
    same as f64 / (nz - 1) as f64
}

/// The rules as text for `--help` and the README: one line per check.
pub fn rules_text() -> String {
    RULES
        .iter()
        .map(|r| {
            let kind = |o: Outcome| match o {
                Outcome::Pass => "-",
                Outcome::Warning => "warning",
                Outcome::Fail => "FAIL",
            };
            format!(
                "{} in {} to {} {} (below: {}, above: {})",
                r.name,
                Fmt(r.accepted[0]),
                Fmt(r.accepted[1]),
                r.unit,
                kind(r.below),
                kind(r.above)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chest() -> Measurements {
        Measurements {
            spacing_mm: [0.7, 0.7, 1.25],
            hu_min: -1024.0,
            hu_max: 2500.0,
            identical_slices: 0.0,
            body_slices: 1.0,
            lung_sides: 2,
            lung_volume_ml: 5200.0,
            lung_body_fraction: Some(0.35),
            lobe_mean_hu: Some(-820.0),
            lobes_present: 5,
            lobes_to_lung_mask: Some(0.97),
        }
    }

    #[test]
    fn a_chest_passes_and_each_broken_value_fails_or_warns_as_its_rule_says() {
        let q = evaluate(&chest());
        println!(
            "typical adult chest: failed {:?}, warned {:?}",
            q.failed, q.warned
        );
        assert!(q.passed && q.warned.is_empty());
        let cases: Vec<(&str, Measurements, &str, Outcome)> = vec![
            (
                "1e27 mm slices",
                Measurements {
                    spacing_mm: [0.7, 0.7, 1e27],
                    ..chest()
                },
                "spacing_z_mm",
                Outcome::Fail,
            ),
            (
                "scl_slope 1e30",
                Measurements {
                    hu_min: -1.024e33,
                    ..chest()
                },
                "hu_min",
                Outcome::Fail,
            ),
            (
                "only the bases",
                Measurements {
                    lung_volume_ml: 450.0,
                    ..chest()
                },
                "lung_volume_ml",
                Outcome::Warning,
            ),
            (
                "one lung",
                Measurements {
                    lung_sides: 1,
                    ..chest()
                },
                "lung_sides",
                Outcome::Fail,
            ),
            (
                "no lobe left",
                Measurements {
                    lobe_mean_hu: None,
                    ..chest()
                },
                "lobe_mean_hu",
                Outcome::Fail,
            ),
            (
                "NaN spacing",
                Measurements {
                    spacing_mm: [f64::NAN, 0.7, 1.0],
                    ..chest()
                },
                "spacing_x_mm",
                Outcome::Fail,
            ),
        ];
        for (what, m, name, want) in cases {
            let q = evaluate(&m);
            let check = q.checks.iter().find(|c| c.name == name).unwrap();
            println!("{what}: {} → {:?}", check.describe(), check.result);
            assert_eq!(check.result, want);
            assert_eq!(q.passed, want != Outcome::Fail);
            let others = q.checks.iter().filter(|c| c.name != name);
            assert!(others.into_iter().all(|c| c.result == Outcome::Pass));
        }
    }
}
