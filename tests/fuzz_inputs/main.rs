//! Seeded structured mutations of valid NIfTI, weights and manifest files: no panic, bounded memory, every rejection an error naming the file.

mod found;
mod manifest;
mod nifti;
mod weights;

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The system allocator, counting live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new);
        if !q.is_null() {
            if new >= layout.size() {
                grew(new - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests take turns: the allocation counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Fixed heap allowance per input on top of the per-byte factor: header structs, error
/// strings, the gzip inflater's window and buffers, rayon's job bookkeeping.
const FIXED_ALLOWANCE: usize = 1 << 20;

/// Largest accepted growth of the process's resident high-water mark over one test. The
/// largest input is ~100 KB and the per-input heap bound is a few MiB; the rest is allocator
/// caching and the rayon workers' stacks.
const MAX_HWM_GROWTH_KB: u64 = 64 * 1024;

fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// The bytes a reader sees after inflating (at most `cap`; undecodable streams give what
/// inflated before the error).
fn inflated_len(bytes: &[u8], cap: u64) -> usize {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        let _ = MultiGzDecoder::new(bytes).take(cap).read_to_end(&mut out);
        out.len()
    } else {
        bytes.len()
    }
}

/// What one family of inputs did.
#[derive(Default)]
struct Tally {
    tried: usize,
    accepted: usize,
    rejected: usize,
    /// Largest heap growth during one input, and that input's size.
    max_growth: usize,
    max_growth_input: usize,
    failures: Vec<String>,
}

impl Tally {
    /// Runs `parse` on one input of `size` bytes (as the parser sees them), allowing
    /// `factor` × size + [`FIXED_ALLOWANCE`] of heap growth. `parse` returns Ok(Ok(())) for an
    /// accepted input, Ok(Err(message)) for a rejection and Err(what) for a broken invariant
    /// of an accepted input; that, a panic, a rejection whose message lacks `name` or too much
    /// memory is a failure.
    fn run(
        &mut self,
        what: &str,
        name: &str,
        size: usize,
        factor: usize,
        parse: impl FnOnce() -> Result<Result<(), String>, String>,
    ) {
        self.tried += 1;
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let outcome = catch_unwind(AssertUnwindSafe(parse));
        let growth = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        if growth > self.max_growth {
            self.max_growth = growth;
            self.max_growth_input = size;
        }
        let bound = factor * size + FIXED_ALLOWANCE;
        if growth > bound {
            self.failures.push(format!(
                "{what}: heap grew by {growth} bytes for a {size}-byte input (bound {bound})"
            ));
        }
        match outcome {
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failures.push(format!("{what}: panicked: {msg}"));
            }
            Ok(Err(broken)) => self.failures.push(format!("{what}: {broken}")),
            Ok(Ok(Ok(()))) => self.accepted += 1,
            Ok(Ok(Err(message))) => {
                self.rejected += 1;
                if !message.contains(name) {
                    self.failures
                        .push(format!("{what}: the error does not name {name}: {message}"));
                }
            }
        }
    }

    /// Prints the counts and fails on any failure, on too much resident growth, and, for
    /// random mutations (`mixed`), when the inputs were all accepted or all rejected.
    fn report(&self, family: &str, hwm_growth_kb: u64, mixed: bool) {
        println!(
            "{family}: {} inputs tried, {} accepted, {} rejected; max heap growth {} bytes \
             (for a {}-byte input); VmHWM growth {hwm_growth_kb} kB",
            self.tried, self.accepted, self.rejected, self.max_growth, self.max_growth_input
        );
        for f in self.failures.iter().take(20) {
            println!("  FAIL {f}");
        }
        assert!(
            self.failures.is_empty(),
            "{family}: {} of {} inputs failed (listed above)",
            self.failures.len(),
            self.tried
        );
        assert!(
            hwm_growth_kb < MAX_HWM_GROWTH_KB,
            "{family}: VmHWM grew by {hwm_growth_kb} kB"
        );
        if mixed {
            assert!(
                self.accepted > 0 && self.rejected > 0,
                "{family}: one-sided"
            );
        }
    }
}

fn flip_bits(rng: &mut ChaCha8Rng, b: &mut [u8], range: std::ops::Range<usize>) {
    if b.is_empty() {
        return;
    }
    let end = range.end.min(b.len());
    let start = range.start.min(end.saturating_sub(1));
    for _ in 0..rng.gen_range(1..=8) {
        let i = rng.gen_range(start..end);
        b[i] ^= 1 << rng.gen_range(0..8);
    }
}

fn overwrite_bytes(rng: &mut ChaCha8Rng, b: &mut [u8], range: std::ops::Range<usize>) {
    if b.is_empty() {
        return;
    }
    let end = range.end.min(b.len());
    let start = range.start.min(end.saturating_sub(1));
    for _ in 0..rng.gen_range(1..=4) {
        let i = rng.gen_range(start..end);
        b[i] = *[0x00, 0xff, 0x7f, 0x80, rng.gen()].choose(rng).unwrap();
    }
}

fn truncate_or_extend(rng: &mut ChaCha8Rng, b: &mut Vec<u8>) {
    if rng.gen_bool(0.5) {
        let n = rng.gen_range(0..b.len().max(1));
        b.truncate(n);
    } else {
        let n = rng.gen_range(1..=b.len().max(1));
        let zeros = rng.gen_bool(0.5);
        b.extend((0..n).map(|_| if zeros { 0 } else { rng.gen::<u8>() }));
    }
}
