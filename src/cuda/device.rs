//! The device layer: allocation, copies, kernel launches, synchronisation and step graphs,
//! either on a real GPU (cudarc's driver API, loaded at run time; one created stream; kernels
//! from the embedded fatbin or compiled by NVRTC) or on the CPU emulator (the same kernels
//! compiled by g++, called through FFI; a graph is the recorded launches, replayed in order).

use super::kernels::{kernels_prebuilt, KernelModule, KERNEL_MODULES};
use anyhow::{anyhow, bail, ensure, Context, Result};
use bytemuck::Pod;
use cudarc::driver::{result as cu, sys, CudaContext};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;
use std::time::Instant;

extern "C" {
    fn m2unet_emu_launch(
        name: *const std::ffi::c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        args: *mut *mut c_void,
    ) -> i32;
    fn m2unet_emu_workers() -> u32;
}

/// Where the CUDA engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The first CUDA GPU.
    Gpu,
    /// The CPU emulator (tests; no GPU needed).
    Emu,
}

/// An address in device memory (a host address on the emulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DevPtr(pub u64);

impl DevPtr {
    pub const NULL: DevPtr = DevPtr(0);
    /// The address `bytes` further on.
    pub fn offset(self, bytes: usize) -> DevPtr {
        DevPtr(self.0 + bytes as u64)
    }
}

struct Gpu {
    ctx: Arc<CudaContext>,
    /// The stream of every launch, memset, copy and event (the legacy null stream cannot be
    /// captured into a graph).
    stream: sys::CUstream,
    functions: HashMap<&'static str, sys::CUfunction>,
    name: String,
    cc: (i32, i32),
    from_fatbin: bool,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // A stream that cannot be destroyed at teardown leaves nothing to recover.
        let _ = self.ctx.bind_to_thread();
        let _ = unsafe { cu::stream::destroy(self.stream) };
    }
}

/// 128 bytes aligned as a TMA descriptor: the unit of a recorded parameter struct.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct ParamBlock([u8; 128]);

/// One launch or memset recorded by an emulator capture.
enum Op {
    Launch {
        name: &'static str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        /// A copy of the parameter struct (128-byte blocks keep any alignment it has).
        params: Vec<ParamBlock>,
    },
    Memset {
        dst: DevPtr,
        bytes: usize,
    },
}

/// The launches and memsets of a captured stream of work, replayed by `Device::launch_graph`:
/// an instantiated CUDA graph, or the emulator's recording.
pub struct Graph {
    inner: GraphInner,
}

enum GraphInner {
    Gpu {
        ctx: Arc<CudaContext>,
        graph: sys::CUgraph,
        exec: sys::CUgraphExec,
    },
    Emu(Vec<Op>),
}

impl Drop for Graph {
    fn drop(&mut self) {
        if let GraphInner::Gpu { ctx, graph, exec } = &self.inner {
            // A graph that cannot be destroyed at teardown leaves nothing to recover.
            let _ = ctx.bind_to_thread();
            let _ = unsafe { cu::graph::exec_destroy(*exec) };
            let _ = unsafe { cu::graph::destroy(*graph) };
        }
    }
}

/// A device: a GPU or the emulator. Allocations live until `free` or the device's drop.
pub struct Device {
    /// None on the emulator.
    gpu: Option<Gpu>,
    allocations: HashMap<u64, usize>,
    /// Some while a capture is open: the emulator's recorded work (empty on a GPU, whose
    /// driver records the stream).
    capture: RefCell<Option<Vec<Op>>>,
    conv_tier: Cell<ConvTier>,
    /// Some while `log_launches` is on: the names of the kernels launched since.
    launch_log: RefCell<Option<Vec<&'static str>>>,
}

/// Which kernels run the tensor-core 3×3 convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvTier {
    /// mma.sync + cp.async (sm_80 and newer): every GPU.
    Mma,
    /// wgmma + TMA (sm_90a, compute capability 9.0) where a conv's shape allows it
    /// (src/cuda/kernels/conv_wgmma.rs), the mma.sync tier elsewhere.
    Wgmma,
}

const EMU_ALIGN: usize = 256;

impl Device {
    pub fn new(kind: DeviceKind) -> Result<Self> {
        let gpu = match kind {
            DeviceKind::Gpu => Some(open_gpu(0)?),
            DeviceKind::Emu => None,
        };
        // The emulator defaults to the portable tier; tests choose the Hopper one.
        let hopper_gpu = gpu.as_ref().is_some_and(|g| g.cc == (9, 0));
        let conv_tier = match std::env::var("M2UNET_CONV_TIER").as_deref() {
            Ok("mma") => ConvTier::Mma,
            Ok("wgmma") => ConvTier::Wgmma,
            Ok(other) => bail!("M2UNET_CONV_TIER={other}: expected mma or wgmma"),
            Err(_) if hopper_gpu => ConvTier::Wgmma,
            Err(_) => ConvTier::Mma,
        };
        let dev = Device {
            gpu,
            allocations: HashMap::new(),
            capture: RefCell::new(None),
            conv_tier: Cell::new(ConvTier::Mma),
            launch_log: RefCell::new(None),
        };
        dev.set_conv_tier(conv_tier)
            .context("M2UNET_CONV_TIER=wgmma")?;
        Ok(dev)
    }

    /// The tier the tensor-core convolutions run on (default: wgmma on compute capability
    /// 9.0, mma.sync elsewhere and on the emulator; `M2UNET_CONV_TIER=mma|wgmma` overrides).
    pub fn conv_tier(&self) -> ConvTier {
        self.conv_tier.get()
    }

    /// Chooses the convolution tier; wgmma needs compute capability 9.0 or the emulator.
    pub fn set_conv_tier(&self, tier: ConvTier) -> Result<()> {
        if let (ConvTier::Wgmma, Some(g)) = (tier, &self.gpu) {
            ensure!(
                g.cc == (9, 0),
                "the wgmma tier needs compute capability 9.0; {} is {}.{}",
                g.name,
                g.cc.0,
                g.cc.1
            );
        }
        self.conv_tier.set(tier);
        Ok(())
    }

    /// Starts (true) or stops (false) recording the names of launched kernels; stopping
    /// returns those recorded, in launch order (replayed graphs are not looked into).
    pub fn log_launches(&self, on: bool) -> Vec<&'static str> {
        let old = self.launch_log.replace(on.then(Vec::new));
        old.unwrap_or_default()
    }

    /// Whether this is the CPU emulator.
    pub fn is_emulator(&self) -> bool {
        self.gpu.is_none()
    }

    /// An error when a capture is open: `what` would be a host round trip (or an allocation)
    /// inside a graph.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capture.borrow().is_some() {
            bail!("{what} while a step graph is being captured");
        }
        Ok(())
    }

    /// One line: the GPU's name and compute capability and where its kernels came from, or
    /// the emulator and its worker threads.
    pub fn describe(&self) -> String {
        match &self.gpu {
            Some(g) => format!(
                "cuda: {} (sm_{}{}), kernels from {}, convolutions on the {} tier",
                g.name,
                g.cc.0,
                g.cc.1,
                if g.from_fatbin {
                    "the embedded fatbin"
                } else {
                    "NVRTC"
                },
                match self.conv_tier() {
                    ConvTier::Mma => "mma.sync",
                    ConvTier::Wgmma => "wgmma",
                }
            ),
            None => format!(
                "emu: CUDA kernels on the CPU emulator ({} worker threads)",
                emu_workers()
            ),
        }
    }

    /// `bytes` of zeroed device memory (256-byte aligned).
    pub fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        self.not_capturing("an allocation")?;
        let bytes = bytes.max(1);
        let ptr = match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                let p = unsafe { cu::malloc_sync(bytes) }
                    .map_err(|e| anyhow!("GPU allocation of {bytes} bytes failed: {e:?}"))?;
                unsafe { cu::memset_d8_async(p, 0, bytes, g.stream) }.map_err(drv)?;
                p
            }
            None => {
                let layout = Layout::from_size_align(bytes, EMU_ALIGN)?;
                let p = unsafe { alloc_zeroed(layout) };
                if p.is_null() {
                    bail!("emulator allocation of {bytes} bytes failed");
                }
                p as u64
            }
        };
        self.allocations.insert(ptr, bytes);
        Ok(DevPtr(ptr))
    }

    pub fn free(&mut self, p: DevPtr) -> Result<()> {
        self.not_capturing("freeing memory")?;
        let bytes = self
            .allocations
            .remove(&p.0)
            .context("freeing memory this device did not allocate")?;
        self.release(p.0, bytes)
    }

    fn release(&self, p: u64, bytes: usize) -> Result<()> {
        match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                unsafe { cu::stream::synchronize(g.stream) }.map_err(drv)?;
                unsafe { cu::free_sync(p) }.map_err(drv)
            }
            None => {
                unsafe { dealloc(p as *mut u8, Layout::from_size_align(bytes, EMU_ALIGN)?) };
                Ok(())
            }
        }
    }

    /// Copies `src` to device address `dst`, in order with the launches (`src` may be reused
    /// on return: pageable memory is staged before the call returns).
    pub fn upload<T: Pod>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        self.not_capturing("an upload")?;
        match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                unsafe { cu::memcpy_htod_async(dst.0, src, g.stream) }.map_err(drv)
            }
            None => {
                let bytes: &[u8] = bytemuck::cast_slice(src);
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.0 as *mut u8, bytes.len())
                };
                Ok(())
            }
        }
    }

    /// Bytes of device memory this device holds allocated now.
    pub fn allocated_bytes(&self) -> usize {
        self.allocations.values().sum()
    }

    /// Zeroes `bytes` of device memory at `dst`, in order with the launches.
    pub fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                unsafe { cu::memset_d8_async(dst.0, 0, bytes, g.stream) }.map_err(drv)
            }
            None => {
                if let Some(ops) = self.capture.borrow_mut().as_mut() {
                    ops.push(Op::Memset { dst, bytes });
                    return Ok(());
                }
                unsafe { std::ptr::write_bytes(dst.0 as *mut u8, 0, bytes) };
                Ok(())
            }
        }
    }

    /// Copies from device address `src` into `dst` (waits for earlier launches).
    pub fn download<T: Pod>(&self, src: DevPtr, dst: &mut [T]) -> Result<()> {
        self.not_capturing("a download")?;
        match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                unsafe { cu::memcpy_dtoh_async(dst, src.0, g.stream) }.map_err(drv)?;
                unsafe { cu::stream::synchronize(g.stream) }.map_err(drv)
            }
            None => {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.0 as *const u8,
                        bytes.as_mut_ptr(),
                        bytes.len(),
                    )
                };
                Ok(())
            }
        }
    }

    /// Launches kernel `name` with its parameter struct passed by value (during an emulator
    /// capture: records it, with a copy of the parameters).
    pub fn launch<P: Pod>(
        &self,
        name: &'static str,
        grid: [u32; 3],
        block: [u32; 3],
        params: &P,
    ) -> Result<()> {
        self.launch_smem(name, grid, block, 0, params)
    }

    /// As `launch`, with `shared_bytes` of dynamic shared memory per block.
    pub fn launch_smem<P: Pod>(
        &self,
        name: &'static str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        if grid.contains(&0) {
            return Ok(());
        }
        if let Some(log) = self.launch_log.borrow_mut().as_mut() {
            log.push(name);
        }
        if self.gpu.is_none() {
            if let Some(ops) = self.capture.borrow_mut().as_mut() {
                ensure!(
                    std::mem::align_of::<P>() <= 128,
                    "{name}: parameters aligned to more than 128 bytes"
                );
                let bytes = bytemuck::bytes_of(params);
                let mut blocks = vec![ParamBlock([0; 128]); bytes.len().div_ceil(128)];
                for (b, chunk) in blocks.iter_mut().zip(bytes.chunks(128)) {
                    b.0[..chunk.len()].copy_from_slice(chunk);
                }
                ops.push(Op::Launch {
                    name,
                    grid,
                    block,
                    shared_bytes,
                    params: blocks,
                });
                return Ok(());
            }
        }
        self.launch_raw(
            name,
            grid,
            block,
            shared_bytes,
            params as *const P as *mut c_void,
        )
    }

    /// Launches kernel `name` with the parameter struct at `params`.
    fn launch_raw(
        &self,
        name: &'static str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: *mut c_void,
    ) -> Result<()> {
        let mut args = [params];
        match &self.gpu {
            Some(g) => {
                let f = *g
                    .functions
                    .get(name)
                    .with_context(|| format!("no kernel named {name}"))?;
                g.ctx.bind_to_thread().map_err(drv)?;
                unsafe {
                    cu::launch_kernel(
                        f,
                        (grid[0], grid[1], grid[2]),
                        (block[0], block[1], block[2]),
                        shared_bytes,
                        g.stream,
                        &mut args,
                    )
                }
                .map_err(|e| anyhow!("launching {name}: {e:?}"))
            }
            None => {
                let cname = CString::new(name)?;
                let rc = unsafe {
                    m2unet_emu_launch(
                        cname.as_ptr(),
                        grid.as_ptr(),
                        block.as_ptr(),
                        shared_bytes,
                        args.as_mut_ptr(),
                    )
                };
                match rc {
                    0 => Ok(()),
                    -1 => bail!("the emulator has no kernel named {name}"),
                    _ => bail!("emulator launch of {name} failed: block {block:?} has more than 1024 threads"),
                }
            }
        }
    }

    /// Waits for every launched kernel to finish.
    pub fn synchronize(&self) -> Result<()> {
        self.not_capturing("a synchronisation")?;
        match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                unsafe { cu::stream::synchronize(g.stream) }.map_err(drv)
            }
            None => Ok(()),
        }
    }

    /// Starts capturing the launches and memsets that follow into a graph (uploads, downloads,
    /// allocations and synchronisations are errors until `end_capture`).
    pub fn begin_capture(&self) -> Result<()> {
        self.not_capturing("a capture")?;
        if let Some(g) = &self.gpu {
            g.ctx.bind_to_thread().map_err(drv)?;
            // Thread-local mode: other threads sharing the primary context may still allocate.
            let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
            unsafe { cu::stream::begin_capture(g.stream, mode) }.map_err(drv)?;
        }
        *self.capture.borrow_mut() = Some(vec![]);
        Ok(())
    }

    /// Ends the capture: the work launched since `begin_capture`, ready to replay.
    pub fn end_capture(&self) -> Result<Graph> {
        let ops = self
            .capture
            .borrow_mut()
            .take()
            .context("ending a capture that was not begun")?;
        let inner = match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                let graph = unsafe { cu::stream::end_capture(g.stream) }.map_err(drv)?;
                let flags = sys::CUgraphInstantiate_flags(0);
                match unsafe { cu::graph::instantiate(graph, flags) } {
                    Ok(exec) => GraphInner::Gpu {
                        ctx: g.ctx.clone(),
                        graph,
                        exec,
                    },
                    Err(e) => {
                        let _ = unsafe { cu::graph::destroy(graph) };
                        bail!("instantiating the captured graph: {e:?}");
                    }
                }
            }
            None => GraphInner::Emu(ops),
        };
        Ok(Graph { inner })
    }

    /// Replays a captured graph, in order with the launches.
    pub fn launch_graph(&self, graph: &Graph) -> Result<()> {
        self.not_capturing("a graph launch")?;
        match (&self.gpu, &graph.inner) {
            (Some(g), GraphInner::Gpu { exec, .. }) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                unsafe { cu::graph::launch(*exec, g.stream) }.map_err(drv)
            }
            (None, GraphInner::Emu(ops)) => {
                for op in ops {
                    match op {
                        Op::Launch {
                            name,
                            grid,
                            block,
                            shared_bytes,
                            params,
                        } => {
                            // The kernel reads its parameters through the pointer; the
                            // recording is not written.
                            let at = params.as_ptr() as *mut c_void;
                            self.launch_raw(name, *grid, *block, *shared_bytes, at)?
                        }
                        Op::Memset { dst, bytes } => self.memset_zero(*dst, *bytes)?,
                    }
                }
                Ok(())
            }
            _ => bail!("a graph captured on another kind of device"),
        }
    }

    /// Milliseconds `work` takes on the device: CUDA events on a GPU, wall clock on the emulator.
    pub fn time_ms(&self, mut work: impl FnMut() -> Result<()>) -> Result<f32> {
        match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
                let start = cu::event::create(flags).map_err(drv)?;
                let end = cu::event::create(flags).map_err(drv)?;
                let ms = (|| -> Result<f32> {
                    unsafe { cu::event::record(start, g.stream) }.map_err(drv)?;
                    work()?;
                    unsafe { cu::event::record(end, g.stream) }.map_err(drv)?;
                    unsafe { cu::event::synchronize(end) }.map_err(drv)?;
                    unsafe { cu::event::elapsed(start, end) }.map_err(drv)
                })();
                unsafe {
                    cu::event::destroy(start).map_err(drv)?;
                    cu::event::destroy(end).map_err(drv)?;
                }
                ms
            }
            None => {
                let t = Instant::now();
                work()?;
                Ok(t.elapsed().as_secs_f32() * 1e3)
            }
        }
    }
}

/// A point in the device's stream of work (a CUDA event, or the wall clock on the emulator).
pub struct Mark {
    event: Option<sys::CUevent>,
    at: Instant,
}

impl Drop for Mark {
    fn drop(&mut self) {
        if let Some(e) = self.event.take() {
            // Destroying an event cannot fail in a way worth reporting here.
            let _ = unsafe { cu::event::destroy(e) };
        }
    }
}

impl Device {
    /// Records a mark after the work launched so far.
    pub fn mark(&self) -> Result<Mark> {
        let event = match &self.gpu {
            Some(g) => {
                g.ctx.bind_to_thread().map_err(drv)?;
                let e = cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(drv)?;
                unsafe { cu::event::record(e, g.stream) }.map_err(drv)?;
                Some(e)
            }
            None => None,
        };
        Ok(Mark {
            event,
            at: Instant::now(),
        })
    }

    /// Milliseconds between two marks (waits for the later one).
    pub fn elapsed_ms(&self, from: &Mark, to: &Mark) -> Result<f32> {
        match (from.event, to.event) {
            (Some(a), Some(b)) => unsafe {
                cu::event::synchronize(b).map_err(drv)?;
                cu::event::elapsed(a, b).map_err(drv)
            },
            _ => Ok(to.at.duration_since(from.at).as_secs_f32() * 1e3),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let allocations: Vec<(u64, usize)> = self.allocations.drain().collect();
        for (p, bytes) in allocations {
            // A failure to free at teardown leaves nothing to recover.
            let _ = self.release(p, bytes);
        }
    }
}

fn drv(e: cu::DriverError) -> anyhow::Error {
    anyhow!("CUDA driver error: {e:?}")
}

fn emu_workers() -> u32 {
    unsafe { m2unet_emu_workers() }
}

/// Whether the CUDA driver library can be loaded (without it cudarc would panic).
fn driver_present() -> bool {
    unsafe { sys::is_culib_present() }
}

fn open_gpu(ordinal: usize) -> Result<Gpu> {
    if !driver_present() {
        bail!("no CUDA driver (libcuda.so) on this machine: use --device cpu, or --device emu to run the CUDA kernels on the CPU emulator");
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| {
        anyhow!("the CUDA driver found no usable GPU {ordinal} ({e:?}): use --device cpu or --device emu")
    })?;
    let name = ctx.name().map_err(drv)?;
    let cc = ctx.compute_capability().map_err(drv)?;
    if cc.0 < 8 {
        bail!("GPU {name} has compute capability {}.{}; the kernels need 8.0 or newer (mma.sync, cp.async)", cc.0, cc.1);
    }
    ctx.bind_to_thread().map_err(drv)?;
    let mut functions = HashMap::new();
    let mut from_fatbin = true;
    for m in KERNEL_MODULES {
        let module = match m.fatbin {
            Some(fb) => unsafe { cu::module::load_data(fb.as_ptr() as *const c_void) }
                .map_err(|e| anyhow!("loading the {} fatbin: {e:?}", m.name))?,
            None => {
                from_fatbin = false;
                load_nvrtc(m, cc)?
            }
        };
        for &k in m.kernels {
            let f = unsafe { cu::module::get_function(module, CString::new(k)?) }
                .map_err(|e| anyhow!("kernel {k} missing from module {}: {e:?}", m.name))?;
            if cc == (9, 0) && k.contains("wgmma") {
                // The Hopper tier's stages exceed the default 48 KiB of dynamic shared memory.
                let optin = ctx
                    .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                    .map_err(drv)?;
                unsafe {
                    cu::function::set_function_attribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        optin,
                    )
                }
                .map_err(|e| anyhow!("allowing {k} {optin} bytes of shared memory: {e:?}"))?;
            }
            functions.insert(k, f);
        }
    }
    // Non-blocking: no implicit synchronisation with the legacy null stream, which another
    // thread of the process may use while this stream is being captured.
    let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(drv)?;
    Ok(Gpu {
        ctx,
        stream,
        functions,
        name,
        cc,
        from_fatbin,
    })
}

/// Compiles a module's embedded source with NVRTC for this GPU.
fn load_nvrtc(m: &KernelModule, cc: (i32, i32)) -> Result<sys::CUmodule> {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("this binary was built without nvcc and NVRTC (libnvrtc.so) is not on the library path: rebuild with nvcc or set LD_LIBRARY_PATH");
    }
    // Compute capability 9.0 gets sm_90a, the target the wgmma tier is written for.
    let suffix = if cc == (9, 0) { "a" } else { "" };
    let arch: &'static str = Box::leak(format!("sm_{}{}{suffix}", cc.0, cc.1).into_boxed_str());
    let mut include_paths = vec![];
    for var in ["M2UNET_CUDA_INCLUDE", "CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            include_paths.push(if var == "M2UNET_CUDA_INCLUDE" {
                v
            } else {
                format!("{v}/include")
            });
        }
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        include_paths,
        options: vec!["-std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(m.source, opts).map_err(|e| {
        anyhow!(
            "NVRTC failed on {}: {e:?} (set M2UNET_CUDA_INCLUDE to the folder holding cuda_fp16.h)",
            m.name
        )
    })?;
    let src = CString::new(ptx.to_src())?;
    unsafe { cu::module::load_data(src.as_ptr() as *const c_void) }
        .map_err(|e| anyhow!("loading NVRTC PTX of {}: {e:?}", m.name))
}

/// `m2unet info`: the GPUs the driver sees (name, compute capability, memory, kernel
/// source) and the emulator.
pub fn describe_devices() -> String {
    let mut out = String::new();
    let kernels = if kernels_prebuilt() {
        "embedded fatbin (sm_80, sm_90a SASS + compute_80 PTX)"
    } else {
        "embedded source, compiled by NVRTC at run time (built without nvcc)"
    };
    if !driver_present() {
        out.push_str("cuda: no CUDA driver (libcuda.so) found\n");
    } else {
        match cu::init().and_then(|_| cu::device::get_count()) {
            Err(e) => out.push_str(&format!("cuda: driver present but no usable GPU ({e:?})\n")),
            Ok(0) => out.push_str("cuda: driver present, no GPU\n"),
            Ok(n) => {
                for i in 0..n {
                    let line = (|| -> Result<String, cu::DriverError> {
                        let d = cu::device::get(i)?;
                        let name = cu::device::get_name(d)?;
                        let major = unsafe {
                            cu::device::get_attribute(d, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                        }?;
                        let minor = unsafe {
                            cu::device::get_attribute(d, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                        }?;
                        let mem = unsafe { cu::device::total_mem(d) }?;
                        Ok(format!(
                            "cuda:{i}: {name}, compute capability {major}.{minor}, {:.1} GiB",
                            mem as f64 / (1u64 << 30) as f64
                        ))
                    })();
                    match line {
                        Ok(l) => out.push_str(&format!("{l}\n")),
                        Err(e) => out.push_str(&format!("cuda:{i}: unreadable ({e:?})\n")),
                    }
                }
            }
        }
    }
    out.push_str(&format!("kernels: {kernels}\n"));
    out.push_str(&format!(
        "emu: CPU emulator of the same kernels, {} worker threads\n",
        emu_workers()
    ));
    out.push_str(&match super::nvtx::library() {
        Some(lib) => format!("nvtx: ranges named by stage through {lib}\n"),
        None => format!(
            "nvtx: no libnvToolsExt.so.1 (set {} to its path for named ranges in nsys)\n",
            super::nvtx::LIB_VAR
        ),
    });
    out
}
