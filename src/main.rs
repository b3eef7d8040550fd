//! The `m2unet` command line.
fn main() {}
