//! Weights files: shape, offset, dtype, metadata and header-text lies in valid safetensors files.

use crate::{flip_bits, overwrite_bytes, root, truncate_or_extend, vm_hwm_kb, Tally, SERIAL};
use m2unet::config::ModelConfig;
use m2unet::io::weights::{load_model_bytes, model_tensors, WeightDtype};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// One tensor of a safetensors file as the mutations see it.
#[derive(Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub bytes: Vec<u8>,
}

fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// Splits a safetensors file into its tensors (in data order) and metadata.
pub fn split_safetensors(bytes: &[u8]) -> (Vec<Entry>, Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut entries = vec![];
    let mut metadata = Value::Null;
    for (name, v) in header.as_object().unwrap() {
        if name == "__metadata__" {
            metadata = v.clone();
            continue;
        }
        let offsets: Vec<usize> = serde_json::from_value(v["data_offsets"].clone()).unwrap();
        entries.push((
            offsets[0],
            Entry {
                name: name.clone(),
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: serde_json::from_value(v["shape"].clone()).unwrap(),
                bytes: data[offsets[0]..offsets[1]].to_vec(),
            },
        ));
    }
    entries.sort_by_key(|(start, _)| *start);
    (entries.into_iter().map(|(_, e)| e).collect(), metadata)
}

/// The header JSON of `entries` laid out back to back.
pub fn header_json(entries: &[Entry], metadata: &Value) -> Value {
    let mut header = serde_json::Map::new();
    if !metadata.is_null() {
        header.insert("__metadata__".into(), metadata.clone());
    }
    let mut at = 0;
    for e in entries {
        header.insert(
            e.name.clone(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [at, at + e.bytes.len()]}),
        );
        at += e.bytes.len();
    }
    Value::Object(header)
}

/// A safetensors file: u64 header length, the header text space-padded to 8 bytes, the data.
pub fn encode_safetensors(header: &str, entries: &[Entry]) -> Vec<u8> {
    let mut text = header.as_bytes().to_vec();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    entries.iter().for_each(|e| out.extend(&e.bytes));
    out
}

/// Resizes a tensor's bytes to what its dtype and shape need (when that is at most 1 MiB),
/// so that the file stays a well-formed safetensors file that lies about the model.
fn fit_bytes(e: &mut Entry, rng: &mut ChaCha8Rng) {
    let need = e
        .shape
        .iter()
        .try_fold(dtype_size(&e.dtype), |a, &d| a.checked_mul(d));
    if let Some(need) = need.filter(|&n| n <= 1 << 20) {
        let fill: u8 = rng.gen();
        e.bytes.resize(need as usize, fill);
    }
}

/// One mutation of a weights file; returns the new bytes and a description.
fn mutate_weights(rng: &mut ChaCha8Rng, seed: &[u8]) -> (Vec<u8>, String) {
    let (mut entries, mut metadata) = split_safetensors(seed);
    let k = rng.gen_range(0..entries.len());
    let tensor = entries[k].name.clone();
    let consistent = |entries: &[Entry], metadata: &Value| {
        encode_safetensors(&header_json(entries, metadata).to_string(), entries)
    };
    match rng.gen_range(0..10) {
        0 => {
            let e = &mut entries[k];
            let big = [
                0u64,
                1,
                2,
                3,
                1 << 20,
                1 << 31,
                1 << 40,
                u64::MAX / 2,
                u64::MAX,
            ];
            let what = match rng.gen_range(0..4) {
                0 if !e.shape.is_empty() => {
                    let i = rng.gen_range(0..e.shape.len());
                    e.shape[i] = *big.choose(rng).unwrap();
                    format!("shape[{i}] = {}", e.shape[i])
                }
                1 if !e.shape.is_empty() => {
                    let i = rng.gen_range(0..e.shape.len());
                    e.shape[i] = e.shape[i] * 2 + 1;
                    format!("shape[{i}] grown to {}", e.shape[i])
                }
                2 => {
                    e.shape.push(*big.choose(rng).unwrap());
                    format!("extra dim, shape {:?}", e.shape)
                }
                _ => {
                    e.shape.pop();
                    format!("dim dropped, shape {:?}", e.shape)
                }
            };
            fit_bytes(e, rng);
            (consistent(&entries, &metadata), format!("{tensor}: {what}"))
        }
        1 => {
            // The tensors whose shapes give the model config: a zero-element tensor with a
            // huge first dimension, or a huge width with real data behind it.
            let name = *[
                "enc1.conv1.weight",
                "enc5.conv1.weight",
                "mil_emb.concepts.weight",
                "mil_img.concepts.weight",
                "seg_head.weight",
                "classifier.weight",
            ]
            .choose(rng)
            .unwrap();
            let e = entries.iter_mut().find(|e| e.name == name).unwrap();
            let width = *[1u64 << 12, 1 << 20, 1 << 40, u64::MAX / 16]
                .choose(rng)
                .unwrap();
            if rng.gen_bool(0.7) {
                e.shape = vec![width, 1, 3, 0];
            } else {
                e.shape = vec![1 << 12, 1, 3, 3];
            }
            fit_bytes(e, rng);
            let what = format!("{name}: shape {:?}", e.shape);
            (consistent(&entries, &metadata), what)
        }
        2 => {
            let e = &mut entries[k];
            e.dtype = [
                "F32", "F16", "BF16", "F64", "I64", "I32", "U8", "I8", "BOOL", "U16", "F8_E4M3",
                "XYZ",
            ]
            .choose(rng)
            .unwrap()
            .to_string();
            let refit = rng.gen_bool(0.5);
            if refit {
                fit_bytes(e, rng);
            }
            let what = format!("{tensor}: dtype {} (bytes refitted: {refit})", e.dtype);
            (consistent(&entries, &metadata), what)
        }
        3 => {
            let what = match rng.gen_range(0..3) {
                0 => {
                    entries.remove(k);
                    format!("{tensor} removed")
                }
                1 => {
                    entries[k].name = format!("{tensor}.x");
                    format!("{tensor} renamed")
                }
                _ => {
                    let mut copy = entries[k].clone();
                    copy.name = "extra.weight".into();
                    entries.push(copy);
                    format!("{tensor} duplicated")
                }
            };
            (consistent(&entries, &metadata), what)
        }
        4 => {
            let key = *["patch", "gcp", "format", "depth"].choose(rng).unwrap();
            let value = *[
                "0",
                "-16",
                "16",
                "NaN",
                "inf",
                "1e308",
                "32.0",
                "",
                "1073741824",
                "18446744073709551600",
                "99999999999999999999999",
                "max",
                "bogus",
            ]
            .choose(rng)
            .unwrap();
            if !metadata.is_object() {
                metadata = json!({});
            }
            if rng.gen_bool(0.1) {
                metadata[key] = json!(12345);
            } else {
                metadata[key] = json!(value);
            }
            let what = format!("metadata {key} = {}", metadata[key]);
            (consistent(&entries, &metadata), what)
        }
        5 => {
            // Non-finite values in a float tensor.
            let e = &mut entries[k];
            let size = dtype_size(&e.dtype) as usize;
            if !e.bytes.is_empty() && e.dtype.starts_with('F') {
                let i = rng.gen_range(0..e.bytes.len() / size) * size;
                let v: &[u8] = match (e.dtype.as_str(), rng.gen_bool(0.5)) {
                    ("F16", true) => &[0x00, 0x7c],
                    ("F16", false) => &[0x00, 0x7e],
                    (_, true) => &[0x00, 0x00, 0x80, 0xff],
                    _ => &[0x00, 0x00, 0xc0, 0x7f],
                };
                e.bytes[i..i + size].copy_from_slice(&v[..size]);
            }
            let what = format!("{tensor}: a non-finite value");
            (consistent(&entries, &metadata), what)
        }
        6 => {
            // Offsets that lie about where the data is.
            let mut header = header_json(&entries, &metadata);
            let offsets = &mut header[&tensor]["data_offsets"];
            let (s, e) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
            *offsets = match rng.gen_range(0..5) {
                0 => json!([e, s]),
                1 => json!([s, e + 2]),
                2 => json!([s, u64::MAX]),
                3 => json!([s + 1, e + 1]),
                _ => json!([0, e - s]),
            };
            let what = format!("{tensor}: data_offsets {offsets}");
            (encode_safetensors(&header.to_string(), &entries), what)
        }
        7 => {
            // The header text itself: cut, garbage, invalid UTF-8, deep nesting.
            let mut text = header_json(&entries, &metadata).to_string().into_bytes();
            let what = match rng.gen_range(0..4) {
                0 => {
                    text.truncate(rng.gen_range(0..text.len()));
                    "header text cut"
                }
                1 => {
                    let i = rng.gen_range(0..text.len());
                    text[i] = *b"{}[],:\"0x".choose(rng).unwrap();
                    "header punctuation"
                }
                2 => {
                    let i = rng.gen_range(0..text.len());
                    text[i] = 0xff;
                    "header not UTF-8"
                }
                _ => {
                    text = vec![b'['; 100_000];
                    "header nested 100000 deep"
                }
            };
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend(text);
            entries.iter().for_each(|e| out.extend(&e.bytes));
            (out, what.into())
        }
        8 => {
            let mut out = seed.to_vec();
            let n = *[
                0u64,
                1,
                7,
                8,
                9,
                seed.len() as u64,
                1 << 27,
                1 << 40,
                u64::MAX,
            ]
            .choose(rng)
            .unwrap();
            out[..8].copy_from_slice(&n.to_le_bytes());
            (out, format!("header length {n}"))
        }
        _ => {
            let mut out = seed.to_vec();
            let header_end = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
            let len = out.len();
            let what = match rng.gen_range(0..4) {
                0 => {
                    flip_bits(rng, &mut out, 0..header_end);
                    "header bit flips"
                }
                1 => {
                    overwrite_bytes(rng, &mut out, 0..len);
                    "byte overwrites"
                }
                2 => {
                    flip_bits(rng, &mut out, header_end..len);
                    "data bit flips"
                }
                _ => {
                    truncate_or_extend(rng, &mut out);
                    "truncated or extended"
                }
            };
            (out, what.into())
        }
    }
}

/// Float values a safetensors file holds, by its header (0 when the header does not parse).
fn float_values(bytes: &[u8]) -> u64 {
    let header = bytes
        .get(..8)
        .map(|n| u64::from_le_bytes(n.try_into().unwrap()) as usize)
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
        .and_then(|h| serde_json::from_slice::<Value>(h).ok());
    let Some(Value::Object(map)) = header else {
        return 0;
    };
    map.values()
        .filter(|v| matches!(v["dtype"].as_str(), Some("F16" | "BF16" | "F32" | "F64")))
        .filter_map(|v| {
            v["shape"]
                .as_array()?
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(d.as_u64()?))
        })
        .fold(0, u64::saturating_add)
}

/// Heap growth per byte of a weights file: u8 tensors widen to i64 (8×), f16 ones to f32
/// (2×), and the model the shapes describe holds at most the file's float values again (≤ 2×
/// for f16); the parsed header's names and shapes, with margin.
pub const WEIGHTS_FACTOR: usize = 16;

/// The largest patch side an accepted weights file may declare.
const MAX_PATCH: usize = 1024;

#[test]
fn mutated_weights_files_are_rejected_cleanly_within_bounded_memory() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f16 = std::fs::read(root().join("fuzz/corpus/weights/seed-tiny-f16.safetensors")).unwrap();
    let model = load_model_bytes(&f16, "seed").unwrap();
    assert_eq!(*model.config(), ModelConfig::tiny());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f32.safetensors");
    model_tensors(&model, WeightDtype::F32)
        .write(&path)
        .unwrap();
    let seeds = [f16, std::fs::read(&path).unwrap()];
    println!(
        "seeds: tiny preset, {} parameters, f16 {} bytes and f32 {} bytes, both accepted",
        model.params.len(),
        seeds[0].len(),
        seeds[1].len()
    );
    let hwm = vm_hwm_kb();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut tally = Tally::default();
    for i in 0..2000 {
        let seed = seeds.choose(&mut rng).unwrap();
        let (bytes, what) = mutate_weights(&mut rng, seed);
        let name = format!("input{i}.safetensors");
        let floats = float_values(&bytes);
        tally.run(
            &format!("#{i} {what}"),
            &name,
            bytes.len(),
            WEIGHTS_FACTOR,
            || {
                let model = match load_model_bytes(&bytes, &name) {
                    Ok(m) => m,
                    Err(e) => return Ok(Err(format!("{e:#}"))),
                };
                let (n, cfg) = (model.table.n_params + model.table.n_buffers, model.config());
                if n as u64 > floats {
                    return Err(format!("accepted {n} values from a file holding {floats}"));
                }
                if cfg.patch > MAX_PATCH || model.params.iter().any(|v| !v.is_finite()) {
                    return Err(format!(
                        "accepted patch {} or non-finite weights",
                        cfg.patch
                    ));
                }
                Ok(Ok(()))
            },
        );
    }
    tally.report("weights", vm_hwm_kb() - hwm, true);
}
