//! Manifests: field, line and byte mutations of valid manifest CSVs.

use crate::{flip_bits, overwrite_bytes, root, truncate_or_extend, vm_hwm_kb, Tally, SERIAL};
use m2unet::data::dataset::read_manifest;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FIELD_VALUES: &[&str] = &[
    "",
    " ",
    "2",
    "-1",
    "1.0",
    "01",
    "NaN",
    "inf",
    "１",
    "0x1",
    "99999999999999999999999999",
    "\"a,b\"",
    "a\0b",
    "../../etc/passwd",
    "/",
    "case.nii.gz",
    "\u{feff}image",
];

/// One mutation of a manifest's text; returns its description.
fn mutate_manifest(rng: &mut ChaCha8Rng, text: &mut Vec<u8>) -> String {
    let s = String::from_utf8_lossy(text).into_owned();
    let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let r = rng.gen_range(0..lines.len());
    let what = match rng.gen_range(0..9) {
        0 | 1 => {
            let mut fields: Vec<String> = lines[r].split(',').map(str::to_string).collect();
            let f = rng.gen_range(0..fields.len());
            fields[f] = if rng.gen_bool(0.1) {
                "x".repeat(rng.gen_range(1000..20000))
            } else {
                FIELD_VALUES.choose(rng).unwrap().to_string()
            };
            lines[r] = fields.join(",");
            format!("line {r} field {f} mangled")
        }
        2 => {
            let extra = if rng.gen_bool(0.5) { "," } else { ",x,y" };
            lines[r].push_str(extra);
            format!("line {r} + {extra:?}")
        }
        3 => {
            let line = lines[r].clone();
            lines.truncate(rng.gen_range(0..=lines.len()));
            if rng.gen_bool(0.5) {
                lines.extend(std::iter::repeat_n(line, rng.gen_range(1..500)));
            }
            format!("{} lines", lines.len())
        }
        4 => {
            lines.swap(0, r);
            format!("line {r} first")
        }
        5 => {
            *text = lines.join("\r\n").into_bytes();
            return "CRLF".into();
        }
        6 => {
            let len = text.len();
            flip_bits(rng, text, 0..len);
            return "bit flips".into();
        }
        7 => {
            truncate_or_extend(rng, text);
            return format!("length {}", text.len());
        }
        _ => {
            let len = text.len();
            overwrite_bytes(rng, text, 0..len);
            return "byte overwrites".into();
        }
    };
    *text = lines.join("\n").into_bytes();
    what
}

/// Heap growth per byte of a manifest: the text (1×), and per row two paths joined to the
/// manifest's folder (~20 bytes here), a case id and a field vector: ~200 bytes for the
/// shortest (6-byte) row.
const MANIFEST_FACTOR: usize = 64;

#[test]
fn mutated_manifests_are_rejected_cleanly_within_bounded_memory() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let corpus = root().join("fuzz/corpus/manifest");
    let mut seeds: Vec<Vec<u8>> = ["seed-synth.csv", "seed-no-case-id.csv"]
        .iter()
        .map(|f| std::fs::read(corpus.join(f)).unwrap())
        .collect();
    let mut long = String::from("case_id,label,mask,image\n");
    for i in 0..100 {
        long += &format!("c{i},{},m{i}.nii.gz,i{i}.nii\n", i % 2);
    }
    seeds.push(long.into_bytes());
    for seed in &seeds {
        let path = dir.path().join("seed.csv");
        std::fs::write(&path, seed).unwrap();
        let rows = read_manifest(&path).unwrap();
        println!("seed manifest: {} rows accepted", rows.len());
    }
    let hwm = vm_hwm_kb();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut tally = Tally::default();
    for i in 0..3000 {
        let mut text = seeds.choose(&mut rng).unwrap().clone();
        let what: Vec<String> = (0..rng.gen_range(1..=3))
            .map(|_| mutate_manifest(&mut rng, &mut text))
            .collect();
        let name = format!("input{i}.csv");
        let path = dir.path().join(&name);
        std::fs::write(&path, &text).unwrap();
        // Independent count of the data rows: non-blank lines after the first non-blank one.
        let rows = std::str::from_utf8(&text).map(|t| {
            t.split('\n')
                .filter(|l| !l.trim().is_empty())
                .count()
                .saturating_sub(1)
        });
        let what = format!("#{i} {}", what.join(", "));
        tally.run(&what, &name, text.len(), MANIFEST_FACTOR, || {
            let entries = match read_manifest(&path) {
                Ok(e) => e,
                Err(e) => return Ok(Err(format!("{e:#}"))),
            };
            if rows != Ok(entries.len()) || entries.iter().any(|e| e.label > 1) {
                return Err(format!("accepted {} rows of {rows:?}", entries.len()));
            }
            Ok(Ok(()))
        });
        let _ = std::fs::remove_file(&path);
    }
    tally.report("manifest", vm_hwm_kb() - hwm, true);
}
