//! NVTX ranges naming the CUDA engine's stages on an Nsight Systems timeline: nvtxRangePushA /
//! nvtxRangePop of the NVTX v2 library loaded at run time (nothing happens without it), and a
//! per-thread recorder of the ranges for tests.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::marker::PhantomData;
use std::sync::OnceLock;

/// Where the library is looked for first (a path); then the loader's search for its sonames.
pub const LIB_VAR: &str = "M2UNET_NVTX_LIB";
const SONAMES: [&str; 2] = ["libnvToolsExt.so.1", "libnvToolsExt.so"];

type PushFn = unsafe extern "C" fn(*const c_char) -> c_int;
type PopFn = unsafe extern "C" fn() -> c_int;

struct Nvtx {
    push: PushFn,
    pop: PopFn,
    path: String,
    /// Keeps the functions loaded.
    _lib: libloading::Library,
}

static NVTX: OnceLock<Option<Nvtx>> = OnceLock::new();

fn nvtx() -> Option<&'static Nvtx> {
    NVTX.get_or_init(load).as_ref()
}

fn load() -> Option<Nvtx> {
    let from_var = std::env::var(LIB_VAR).ok();
    let found = from_var
        .iter()
        .cloned()
        .chain(SONAMES.map(String::from))
        .find_map(|path| open(&path));
    if let (None, Some(p)) = (&found, &from_var) {
        eprintln!("warning: {LIB_VAR}={p}: no NVTX library with nvtxRangePushA there; NVTX ranges are off");
    }
    found
}

fn open(path: &str) -> Option<Nvtx> {
    // SAFETY: loading the NVTX library runs no initialiser with preconditions, and the two
    // symbols have the C signatures of nvToolsExt.h.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        let push = *lib.get::<PushFn>(b"nvtxRangePushA\0").ok()?;
        let pop = *lib.get::<PopFn>(b"nvtxRangePop\0").ok()?;
        Some(Nvtx {
            push,
            pop,
            path: path.to_string(),
            _lib: lib,
        })
    }
}

/// The NVTX library the ranges go to, if one was found.
pub fn library() -> Option<&'static str> {
    nvtx().map(|n| n.path.as_str())
}

/// A range opened or closed on this thread, as `record` saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Push(String),
    Pop,
}

thread_local! {
    static RECORDER: RefCell<Option<Vec<Event>>> = const { RefCell::new(None) };
}

/// Runs `work` and returns what it returned with the ranges it opened and closed on this thread.
pub fn record<T>(work: impl FnOnce() -> T) -> (T, Vec<Event>) {
    let outer = RECORDER.replace(Some(vec![]));
    let out = work();
    let events = RECORDER.replace(outer).unwrap_or_default();
    (out, events)
}

/// An open range, closed on drop (on the thread that opened it: NVTX ranges are per thread).
#[must_use = "the range closes when this is dropped"]
pub struct Range {
    pushed: bool,
    recorded: bool,
    _thread: PhantomData<*const ()>,
}

/// Opens the range `name` on this thread.
pub fn range(name: &str) -> Range {
    let recorded = RECORDER.with_borrow_mut(|r| {
        r.as_mut()
            .map(|events| events.push(Event::Push(name.to_string())))
            .is_some()
    });
    let pushed = match (nvtx(), CString::new(name)) {
        (Some(n), Ok(c)) => {
            // SAFETY: a NUL-terminated string that outlives the call (NVTX copies it).
            unsafe { (n.push)(c.as_ptr()) };
            true
        }
        _ => false,
    };
    Range {
        pushed,
        recorded,
        _thread: PhantomData,
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.recorded {
            RECORDER.with_borrow_mut(|r| {
                if let Some(events) = r.as_mut() {
                    events.push(Event::Pop);
                }
            });
        }
        if let (true, Some(n)) = (self.pushed, nvtx()) {
            // SAFETY: closes the range this guard pushed on this thread.
            unsafe { (n.pop)() };
        }
    }
}
