//! libtorch features that tch 0.24 does not bind, through a small C++ shim (`csrc/glue.cpp`):
//! forward-mode AD levels, scaled-dot-product-attention backend switches, autocast with a chosen
//! dtype (bfloat16), TF32, deterministic algorithms, libtorch's fused AdamW kernel, CUDA
//! caching-allocator statistics (peak memory), stream state and a host-synchronisation counter; and, in
//! [`dist`], c10d process groups (`csrc/dist.cpp`: TCPStore, ProcessGroupGloo, ProcessGroupNCCL).
//!
//! Every switch has a guard that restores the previous state when dropped, so a panic or an early
//! return never leaves the process in a changed mode.
use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicI64, Ordering};
use tch::Tensor;

pub mod dist;

mod ffi {
    use std::ffi::c_char;
    extern "C" {
        pub fn flowmap_free_error(msg: *mut c_char);
        pub fn flowmap_fwad_enter(level: *mut i64) -> *mut c_char;
        pub fn flowmap_fwad_exit(level: i64) -> *mut c_char;
        pub fn flowmap_sdp_set(which: i32, on: bool) -> *mut c_char;
        pub fn flowmap_sdp_get(which: i32, on: *mut bool) -> *mut c_char;
        pub fn flowmap_autocast_set(device: i32, enabled: bool, dtype: i32) -> *mut c_char;
        pub fn flowmap_autocast_get(device: i32, enabled: *mut bool, dtype: *mut i32) -> *mut c_char;
        pub fn flowmap_tf32_set(on: bool) -> *mut c_char;
        pub fn flowmap_tf32_get(on: *mut bool) -> *mut c_char;
        pub fn flowmap_deterministic_set(on: bool, warn_only: bool) -> *mut c_char;
        pub fn flowmap_deterministic_get(on: *mut bool) -> *mut c_char;
        pub fn flowmap_torch_version(buf: *mut c_char, len: i32) -> *mut c_char;
        pub fn flowmap_libtorch_path(buf: *mut c_char, len: i32) -> *mut c_char;
        pub fn flowmap_cuda_device_name(index: i32, buf: *mut c_char, len: i32) -> *mut c_char;
        pub fn flowmap_torch_cuda_version(version: *mut i32) -> *mut c_char;
        pub fn flowmap_cuda_driver_version(version: *mut i32) -> *mut c_char;
        pub fn flowmap_cuda_memory(device: i32, out: *mut i64) -> *mut c_char;
        pub fn flowmap_cuda_reset_peak(device: i32) -> *mut c_char;
        pub fn flowmap_cuda_empty_cache() -> *mut c_char;
        pub fn flowmap_cuda_stream_idle(device: i32, idle: *mut bool) -> *mut c_char;
        pub fn flowmap_sync_count_begin() -> *mut c_char;
        pub fn flowmap_sync_count_read(syncs: *mut i64, others: *mut i64) -> *mut c_char;
        pub fn flowmap_sync_count_end() -> *mut c_char;
        pub fn flowmap_sync_debug_probe() -> *mut c_char;
        pub fn flowmap_fused_adamw(
            params: *const *mut torch_sys::C_tensor,
            grads: *const *mut torch_sys::C_tensor,
            m: *const *mut torch_sys::C_tensor,
            v: *const *mut torch_sys::C_tensor,
            steps: *const *mut torch_sys::C_tensor,
            n: i64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> *mut c_char;
    }
}

/// A C++ exception raised inside libtorch, with its message.
#[derive(Debug, thiserror::Error)]
#[error("libtorch: {0}")]
pub struct TorchError(pub String);

pub type Result<T> = std::result::Result<T, TorchError>;

fn check(msg: *mut c_char) -> Result<()> {
    if msg.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns either null or a NUL-terminated malloc'd string it hands to us.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    unsafe { ffi::flowmap_free_error(msg) };
    Err(TorchError(text))
}

// ---------------------------------------------------------------------------------------------
// Forward-mode AD
// ---------------------------------------------------------------------------------------------

/// An entered forward-AD level; leaving is done by `Drop`, on every path (errors, panics).
/// libtorch supports one level at a time, so entering a second one fails until this one is dropped.
#[derive(Debug)]
pub struct DualLevel {
    index: i64,
}

/// Number of forward-AD levels currently entered through `DualLevel` (libtorch levels are global).
static ACTIVE_LEVELS: AtomicI64 = AtomicI64::new(0);

/// True while a `DualLevel` is entered: tangents may flow, so modules must avoid kernels without a
/// forward derivative (fused SDPA). The DiT switches its attention to the math path on this.
pub fn forward_ad_active() -> bool {
    ACTIVE_LEVELS.load(Ordering::SeqCst) > 0
}

impl DualLevel {
    pub fn enter() -> Result<Self> {
        let mut index = -1;
        check(unsafe { ffi::flowmap_fwad_enter(&mut index) })?;
        ACTIVE_LEVELS.fetch_add(1, Ordering::SeqCst);
        Ok(Self { index })
    }
    /// The level index to pass to `Tensor::internal_make_dual` / `internal_unpack_dual`.
    pub fn index(&self) -> i64 {
        self.index
    }
    /// `primal` carrying `tangent` at this level. Shapes and dtypes must match.
    pub fn make_dual(&self, primal: &Tensor, tangent: &Tensor) -> Tensor {
        Tensor::internal_make_dual(primal, tangent, self.index)
    }
    /// (primal, tangent) of a tensor computed at this level; a tensor with no tangent gives zeros.
    pub fn unpack(&self, dual: &Tensor) -> (Tensor, Tensor) {
        let (primal, tangent) = Tensor::internal_unpack_dual(dual, self.index);
        let tangent = if tangent.defined() { tangent } else { primal.zeros_like() };
        (primal, tangent)
    }
}

impl Drop for DualLevel {
    fn drop(&mut self) {
        ACTIVE_LEVELS.fetch_sub(1, Ordering::SeqCst);
        // Releasing clears every tangent of this level; it cannot fail for a level we entered.
        if let Err(e) = check(unsafe { ffi::flowmap_fwad_exit(self.index) }) {
            tracing::error!("leaving forward-AD level {}: {e}", self.index);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scaled-dot-product attention backends
// ---------------------------------------------------------------------------------------------

/// The kernels behind `scaled_dot_product_attention`. Only `Math` has a forward derivative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpBackend {
    Flash = 0,
    MemEfficient = 1,
    Math = 2,
    CuDnn = 3,
}

impl SdpBackend {
    pub const ALL: [SdpBackend; 4] = [Self::Flash, Self::MemEfficient, Self::Math, Self::CuDnn];
    pub fn enabled(self) -> Result<bool> {
        let mut on = false;
        check(unsafe { ffi::flowmap_sdp_get(self as i32, &mut on) })?;
        Ok(on)
    }
    pub fn set_enabled(self, on: bool) -> Result<()> {
        check(unsafe { ffi::flowmap_sdp_set(self as i32, on) })
    }
}

/// Enables exactly the given SDPA backends until dropped, then restores the previous switches.
#[derive(Debug)]
pub struct SdpBackendGuard {
    previous: [bool; 4],
}

impl SdpBackendGuard {
    pub fn only(backends: &[SdpBackend]) -> Result<Self> {
        let mut previous = [false; 4];
        for (slot, b) in previous.iter_mut().zip(SdpBackend::ALL) {
            *slot = b.enabled()?;
        }
        for b in SdpBackend::ALL {
            b.set_enabled(backends.contains(&b))?;
        }
        Ok(Self { previous })
    }
}

impl Drop for SdpBackendGuard {
    fn drop(&mut self) {
        for (on, b) in self.previous.iter().zip(SdpBackend::ALL) {
            let _ = b.set_enabled(*on);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Autocast
// ---------------------------------------------------------------------------------------------

/// Device types autocast knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutocastDevice {
    Cpu = 0,
    Cuda = 1,
}

/// Current (enabled, dtype) of autocast on a device.
pub fn autocast_state(device: AutocastDevice) -> Result<(bool, tch::Kind)> {
    let (mut on, mut dtype) = (false, 0);
    check(unsafe { ffi::flowmap_autocast_get(device as i32, &mut on, &mut dtype) })?;
    Ok((on, kind_from_c_int(dtype)?))
}

fn set_autocast(device: AutocastDevice, enabled: bool, dtype: tch::Kind) -> Result<()> {
    let code = kind_to_c_int(dtype)?;
    check(unsafe { ffi::flowmap_autocast_set(device as i32, enabled, code) })
}

/// c10::ScalarType codes of the dtypes autocast can use.
const AUTOCAST_KINDS: [(tch::Kind, i32); 4] = [(tch::Kind::Half, 5), (tch::Kind::Float, 6), (tch::Kind::Double, 7), (tch::Kind::BFloat16, 15)];

fn kind_to_c_int(kind: tch::Kind) -> Result<i32> {
    AUTOCAST_KINDS.iter().find(|(k, _)| *k == kind).map(|(_, c)| *c).ok_or_else(|| TorchError(format!("autocast dtype must be Half, Float, Double or BFloat16, got {kind:?}")))
}

fn kind_from_c_int(v: i32) -> Result<tch::Kind> {
    AUTOCAST_KINDS.iter().find(|(_, c)| *c == v).map(|(k, _)| *k).ok_or_else(|| TorchError(format!("unexpected autocast dtype code {v}")))
}

/// Autocast on `device` with `dtype` (for example bfloat16) until dropped; the previous state is
/// restored afterwards. tch's own autocast helper only gives float16.
#[derive(Debug)]
pub struct AutocastGuard {
    device: AutocastDevice,
    previous: (bool, tch::Kind),
}

impl AutocastGuard {
    pub fn new(device: AutocastDevice, enabled: bool, dtype: tch::Kind) -> Result<Self> {
        let previous = autocast_state(device)?;
        set_autocast(device, enabled, dtype)?;
        Ok(Self { device, previous })
    }
    pub fn bf16_cuda() -> Result<Self> {
        Self::new(AutocastDevice::Cuda, true, tch::Kind::BFloat16)
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        let _ = set_autocast(self.device, self.previous.0, self.previous.1);
    }
}

// ---------------------------------------------------------------------------------------------
// TF32 and determinism
// ---------------------------------------------------------------------------------------------

/// Whether float32 matmuls and convolutions may use TF32 tensor cores (cuBLAS and cuDNN).
pub fn tf32_enabled() -> Result<bool> {
    let mut on = false;
    check(unsafe { ffi::flowmap_tf32_get(&mut on) })?;
    Ok(on)
}

pub fn set_tf32(on: bool) -> Result<()> {
    check(unsafe { ffi::flowmap_tf32_set(on) })
}

/// `torch.use_deterministic_algorithms(on, warn_only=warn_only)`.
pub fn set_deterministic(on: bool, warn_only: bool) -> Result<()> {
    check(unsafe { ffi::flowmap_deterministic_set(on, warn_only) })
}

pub fn deterministic_enabled() -> Result<bool> {
    let mut on = false;
    check(unsafe { ffi::flowmap_deterministic_get(&mut on) })?;
    Ok(on)
}

// ---------------------------------------------------------------------------------------------
// Fused AdamW
// ---------------------------------------------------------------------------------------------

/// Hyperparameters of one AdamW update (decoupled weight decay, no amsgrad).
#[derive(Debug, Clone, Copy)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// libtorch's fused multi-tensor AdamW (`at::_fused_adamw_`): updates `params`, `m`, `v` and
/// increments `steps` (float scalars, one per parameter) in place, in one kernel launch per group.
/// libtorch 2.11 implements it for CPU and CUDA tensors (matches the plain update: tests/glue.rs).
pub fn fused_adamw(params: &[Tensor], grads: &[Tensor], m: &[Tensor], v: &[Tensor], steps: &[Tensor], hp: AdamWHyper) -> Result<()> {
    let n = params.len();
    if [grads.len(), m.len(), v.len(), steps.len()].iter().any(|&l| l != n) {
        return Err(TorchError(format!("fused_adamw: list lengths differ (params {n}, grads {}, m {}, v {}, steps {})", grads.len(), m.len(), v.len(), steps.len())));
    }
    let ptrs = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as *mut torch_sys::C_tensor).collect::<Vec<_>>();
    let (p, g, a, b, s) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v), ptrs(steps));
    check(unsafe { ffi::flowmap_fused_adamw(p.as_ptr(), g.as_ptr(), a.as_ptr(), b.as_ptr(), s.as_ptr(), n as i64, hp.lr, hp.beta1, hp.beta2, hp.weight_decay, hp.eps) })
}

// ---------------------------------------------------------------------------------------------
// Build and device facts
// ---------------------------------------------------------------------------------------------

fn read_string(f: impl FnOnce(*mut c_char, i32) -> *mut c_char) -> Result<String> {
    let mut buf = vec![0 as c_char; 1024];
    check(f(buf.as_mut_ptr(), buf.len() as i32))?;
    // SAFETY: the shim writes a NUL-terminated string of at most len bytes (snprintf / NVML).
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// The libtorch version the glue was compiled against, e.g. "2.11.0".
pub fn torch_version() -> String {
    read_string(|b, l| unsafe { ffi::flowmap_torch_version(b, l) }).unwrap_or_else(|e| e.0)
}

/// The file of the libtorch_cpu.so this process loaded.
pub fn libtorch_path() -> Result<String> {
    read_string(|b, l| unsafe { ffi::flowmap_libtorch_path(b, l) })
}

/// A CUDA device's name, from the driver's NVML library.
pub fn cuda_device_name(index: i64) -> Result<String> {
    read_string(|b, l| unsafe { ffi::flowmap_cuda_device_name(index as i32, b, l) })
}

/// The CUDA version the loaded libtorch was compiled with, as CUDA encodes it (1000·major + 10·minor:
/// 13000 for the PyPI wheel), or `None` when this process's libtorch has no CUDA (the cpu wheel, or
/// `libtorch_cuda.so` not loaded). Safe on machines without a GPU or driver.
pub fn torch_cuda_version() -> Result<Option<i32>> {
    let mut v = 0;
    check(unsafe { ffi::flowmap_torch_cuda_version(&mut v) })?;
    Ok((v > 0).then_some(v))
}

/// The newest CUDA version the installed NVIDIA driver supports (`cuDriverGetVersion`, same
/// encoding: 12080 for a 570 driver), or `None` when the driver library `libcuda.so.1` is absent.
pub fn cuda_driver_version() -> Result<Option<i32>> {
    let mut v = 0;
    check(unsafe { ffi::flowmap_cuda_driver_version(&mut v) })?;
    Ok((v > 0).then_some(v))
}

// ---------------------------------------------------------------------------------------------
// CUDA memory, stream state and host synchronisations
// ---------------------------------------------------------------------------------------------

/// The CUDA caching allocator's byte counters of one device (`torch.cuda.memory_allocated`,
/// `max_memory_allocated`, `memory_reserved`, `max_memory_reserved`). Peaks count from the last
/// [`cuda_reset_peak_memory`] (or from the start of the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaMemory {
    pub allocated: i64,
    pub peak_allocated: i64,
    pub reserved: i64,
    pub peak_reserved: i64,
}

/// The CUDA device index of `device`, or None for the CPU (or when libtorch sees no CUDA device).
fn cuda_index(device: tch::Device) -> Option<i32> {
    match device {
        tch::Device::Cuda(i) if tch::Cuda::is_available() => Some(i as i32),
        _ => None,
    }
}

/// Allocator statistics of a CUDA device; `None` on the CPU or without CUDA (the CPU-safe
/// fallback: callers print "n/a"). Zeros before the first CUDA allocation.
pub fn cuda_memory(device: tch::Device) -> Result<Option<CudaMemory>> {
    let Some(i) = cuda_index(device) else { return Ok(None) };
    let mut out = [0i64; 4];
    check(unsafe { ffi::flowmap_cuda_memory(i, out.as_mut_ptr()) })?;
    Ok(Some(CudaMemory { allocated: out[0], peak_allocated: out[1], reserved: out[2], peak_reserved: out[3] }))
}

/// `torch.cuda.reset_peak_memory_stats(device)`; a no-op on the CPU.
pub fn cuda_reset_peak_memory(device: tch::Device) -> Result<()> {
    match cuda_index(device) {
        Some(i) => check(unsafe { ffi::flowmap_cuda_reset_peak(i) }),
        None => Ok(()),
    }
}

/// `torch.cuda.empty_cache()`: cached, unused blocks go back to the driver; a no-op without CUDA.
pub fn cuda_empty_cache() -> Result<()> {
    if !tch::Cuda::is_available() {
        return Ok(());
    }
    check(unsafe { ffi::flowmap_cuda_empty_cache() })
}

/// Whether all work queued on the device's current CUDA stream has finished (`cudaStreamQuery`,
/// no synchronisation); `None` on the CPU. A call that returns while this is `false` did not wait
/// for the GPU.
pub fn cuda_stream_idle(device: tch::Device) -> Result<Option<bool>> {
    let Some(i) = cuda_index(device) else { return Ok(None) };
    let mut idle = false;
    check(unsafe { ffi::flowmap_cuda_stream_idle(i, &mut idle) })?;
    Ok(Some(idle))
}

/// Counts the host synchronisations libtorch's CUDA code performs on this thread while alive
/// (device-to-host copies, `.item()`/`double_value`, stream and device synchronisation): the
/// mechanism of `torch.cuda.set_sync_debug_mode("warn")`, with the warnings counted instead of
/// printed. Dropping it restores the previous mode and warning handler. One counter per thread;
/// the debug mode itself is process-wide, so while a counter is active other threads' CUDA
/// synchronisations print libtorch's "called a synchronizing CUDA operation" warning.
/// Works wherever libtorch's CUDA library is loaded (it also loads with no GPU, where the count
/// stays 0); [`SyncCounter::start`] fails with a CPU-only libtorch.
#[derive(Debug)]
pub struct SyncCounter {
    _not_send: std::marker::PhantomData<*const ()>, // the handler is thread-local
}

impl SyncCounter {
    pub fn start() -> Result<Self> {
        check(unsafe { ffi::flowmap_sync_count_begin() })?;
        Ok(Self { _not_send: std::marker::PhantomData })
    }
    /// Synchronisations counted so far.
    pub fn syncs(&self) -> i64 {
        self.read().0
    }
    /// (synchronisations, other libtorch warnings) counted so far; other warnings are swallowed
    /// while the counter is active.
    pub fn read(&self) -> (i64, i64) {
        let (mut syncs, mut others) = (0, 0);
        match check(unsafe { ffi::flowmap_sync_count_read(&mut syncs, &mut others) }) {
            Ok(()) => (syncs, others),
            Err(e) => {
                tracing::error!("reading the host-sync counter: {e}");
                (-1, -1)
            }
        }
    }
    /// Calls the hook libtorch's CUDA code calls before a synchronising operation, as if one
    /// happened (for tests of the counter on machines without a GPU).
    pub fn probe() -> Result<()> {
        check(unsafe { ffi::flowmap_sync_debug_probe() })
    }
}

impl Drop for SyncCounter {
    fn drop(&mut self) {
        if let Err(e) = check(unsafe { ffi::flowmap_sync_count_end() }) {
            tracing::error!("stopping the host-sync counter: {e}");
        }
    }
}
