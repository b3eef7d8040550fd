//! CT data: preprocessing, the physical lung mask, synthetic chest phantoms, and the training dataset.

pub mod dataset;
pub mod lobe_order;
pub mod lung_mask;
pub mod phantom;
pub mod preprocess;

/// Lobe names by label (lungmask order): label `l` (1–5) is `LOBE_NAMES[l - 1]`.
pub const LOBE_NAMES: [&str; 5] = ["LUL", "LLL", "RUL", "RML", "RLL"];

/// Number of lobe labels (1–5; 0 is background).
pub const NUM_LOBES: usize = 5;

/// The slices (ascending canonical z) of a label volume `dims` in which some voxel holds a
/// lobe.
pub fn lobe_slices(labels: &[u8], dims: [usize; 3]) -> Vec<usize> {
    let n = dims[0] * dims[1];
    (0..dims[2])
        .filter(|&z| labels[z * n..(z + 1) * n].iter().any(|&l| l > 0))
        .collect()
}

/// The CT severity grade of an involvement fraction: CT-0 none, CT-1 < 25 %, CT-2 25–50 %,
/// CT-3 50–75 %, CT-4 ≥ 75 %. A case is severe when its grade is 2 or more.
pub fn ct_grade(involvement: f64) -> u8 {
    if involvement <= 0.0 {
        0
    } else if involvement < 0.25 {
        1
    } else if involvement < 0.5 {
        2
    } else if involvement < 0.75 {
        3
    } else {
        4
    }
}
