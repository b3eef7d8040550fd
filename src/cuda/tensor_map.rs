//! Tiled TMA descriptors for the Hopper tier: encoded by the driver on a GPU, and in the
//! emulator's own layout (emu::TensorMapDesc in emu/cuda_emu.h) on the CPU emulator.

use super::device::{DevPtr, Device};
use anyhow::{anyhow, ensure, Result};
use bytemuck::{Pod, Zeroable};
use cudarc::driver::sys;

/// A 128-byte tiled tensor map (CUtensorMap), passed to kernels by value.
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct TensorMap(pub [u64; 16]);

/// The emulator's layout of the 128 bytes (emu::TensorMapDesc).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmuDesc {
    base: u64,
    dims: [u64; 5],
    strides: [u64; 5],
    boxdim: [u32; 5],
    rank: u32,
    elem_bytes: u32,
    swizzle: u32,
}

const SWIZZLE_128B: u32 = 3;

impl TensorMap {
    /// An fp16 tensor at `base` with `dims` (innermost first) and the byte strides of
    /// dims 1.. (`strides`), loaded in boxes of `boxdim` elements into shared memory with the
    /// 128-byte swizzle; elements outside the tensor load as zeros.
    pub fn f16_tiled(
        dev: &Device,
        base: DevPtr,
        dims: &[u64],
        strides: &[u64],
        boxdim: &[u32],
    ) -> Result<TensorMap> {
        let rank = dims.len();
        ensure!(
            (1..=5).contains(&rank) && strides.len() + 1 == rank && boxdim.len() == rank,
            "tensor map: rank {rank} with {} strides and {} box sizes",
            strides.len(),
            boxdim.len()
        );
        ensure!(
            base.0.is_multiple_of(16),
            "tensor map: base address not 16-byte aligned"
        );
        ensure!(
            strides.iter().all(|s| s.is_multiple_of(16) && *s < 1 << 40),
            "tensor map: strides {strides:?} must be multiples of 16 bytes below 2^40"
        );
        ensure!(
            dims.iter().all(|d| (1..=1 << 32).contains(d)),
            "tensor map: dimensions {dims:?} out of range"
        );
        ensure!(
            boxdim.iter().all(|b| (1..=256).contains(b)) && boxdim[0] * 2 <= 128,
            "tensor map: box {boxdim:?} (each side 1..256, inner side at most 128 bytes)"
        );
        let mut map = TensorMap([0; 16]);
        if dev.is_emulator() {
            let mut d = EmuDesc {
                base: base.0,
                rank: rank as u32,
                elem_bytes: 2,
                swizzle: SWIZZLE_128B,
                ..Zeroable::zeroed()
            };
            d.dims[..rank].copy_from_slice(dims);
            d.strides[0] = 2;
            d.strides[1..rank].copy_from_slice(strides);
            d.boxdim[..rank].copy_from_slice(boxdim);
            bytemuck::bytes_of_mut(&mut map)[..std::mem::size_of::<EmuDesc>()]
                .copy_from_slice(bytemuck::bytes_of(&d));
            return Ok(map);
        }
        let ones = [1u32; 5];
        let rc = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map as *mut TensorMap as *mut sys::CUtensorMap,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                rank as u32,
                base.0 as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxdim.as_ptr(),
                ones.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(anyhow!(
                "cuTensorMapEncodeTiled failed ({rc:?}) for dims {dims:?}, strides {strides:?}, box {boxdim:?}"
            ));
        }
        Ok(map)
    }
}
