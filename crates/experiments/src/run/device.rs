//! What `device = "auto"` means on this machine, and why it is the CPU when it is.
//!
//! `auto` takes CUDA device 0 when libtorch sees one. Otherwise the reason is one of: libtorch has
//! no CUDA (the cpu wheel), no NVIDIA driver or no visible device, or a driver older than the CUDA
//! version the wheel was built with (the PyPI wheel is CUDA 13.0 and needs driver >= 580). The
//! reason is logged once per process with what to do about it; `flowmap doctor` prints the facts.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;
use tch::Device;

/// Where the Linux kernel driver reports its version.
pub const PROC_DRIVER_VERSION: &str = "/proc/driver/nvidia/version";

/// Oldest Linux driver that runs applications built with any toolkit of a CUDA major version
/// (minor version compatibility). Source: NVIDIA, "CUDA Compatibility", Minor Version Compatibility,
/// Table 1 (docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html: 13.x >= 580,
/// 12.x >= 525, 11.x >= 450), with the exact 12.x and 11.x builds from the CUDA Toolkit release notes.
pub const MIN_DRIVER_FOR_CUDA_MAJOR: [(u32, &str); 3] = [(11, "450.80.02"), (12, "525.60.13"), (13, "580")];

/// A CUDA version major.minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion {
    pub major: u32,
    pub minor: u32,
}

impl CudaVersion {
    /// From CUDA's integer encoding, 1000·major + 10·minor (13000 is 13.0, 12080 is 12.8).
    pub fn from_code(code: i32) -> Option<Self> {
        (code > 0).then_some(Self { major: code as u32 / 1000, minor: (code as u32 % 1000) / 10 })
    }
}

impl fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// An NVIDIA driver version such as 580.65.06, compared number by number (missing parts are 0).
#[derive(Debug, Clone)]
pub struct DriverVersion {
    parts: Vec<u32>,
    text: String,
}

impl DriverVersion {
    /// "580.65.06" or "580"; `None` unless it is dot-separated numbers.
    pub fn parse(text: &str) -> Option<Self> {
        let parts = text.split('.').map(|p| p.parse::<u32>().ok()).collect::<Option<Vec<_>>>()?;
        Some(Self { parts, text: text.to_string() })
    }
    pub fn major(&self) -> u32 {
        self.parts[0]
    }
}

impl PartialEq for DriverVersion {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for DriverVersion {}
impl PartialOrd for DriverVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for DriverVersion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let n = self.parts.len().max(other.parts.len());
        let at = |v: &Self, i: usize| v.parts.get(i).copied().unwrap_or(0);
        (0..n).map(|i| at(self, i).cmp(&at(other, i))).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl fmt::Display for DriverVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The driver version in the text of `/proc/driver/nvidia/version`, whose first line reads
/// "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ..." (the open kernel
/// module: "... Open Kernel Module for x86_64  580.65.06  Release Build ...").
pub fn parse_proc_driver_version(text: &str) -> Option<DriverVersion> {
    let line = text.lines().find(|l| l.trim_start().starts_with("NVRM version:"))?;
    line.split_whitespace().filter(|w| w.contains('.')).find_map(DriverVersion::parse)
}

/// The oldest driver that runs libtorch built with `cuda`, when the table knows its major version.
pub fn min_driver_for(cuda: CudaVersion) -> Option<DriverVersion> {
    MIN_DRIVER_FOR_CUDA_MAJOR.iter().find(|(major, _)| *major == cuda.major).and_then(|(_, d)| DriverVersion::parse(d))
}

/// Whether `driver` runs libtorch built with `cuda`; `None` for a CUDA major the table lacks.
pub fn driver_supports(driver: &DriverVersion, cuda: CudaVersion) -> Option<bool> {
    min_driver_for(cuda).map(|min| *driver >= min)
}

/// What decides whether `auto` can use CUDA.
#[derive(Debug, Clone, Default)]
pub struct CudaFacts {
    /// The CUDA version libtorch was compiled with; `None`: libtorch without CUDA.
    pub torch_cuda: Option<CudaVersion>,
    /// `libtorch_cuda.so` lies next to the loaded `libtorch_cpu.so` (a CUDA wheel).
    pub torch_cuda_library: bool,
    /// The kernel driver's version (`/proc/driver/nvidia/version`).
    pub driver: Option<DriverVersion>,
    /// The newest CUDA the user-space driver `libcuda.so.1` supports (`cuDriverGetVersion`).
    pub driver_cuda: Option<CudaVersion>,
    /// CUDA devices libtorch sees.
    pub devices: i64,
    /// `CUDA_VISIBLE_DEVICES`, when set.
    pub visible_devices: Option<String>,
}

impl CudaFacts {
    /// Reads the facts of this process and machine. Never panics without a GPU or driver.
    pub fn probe() -> Self {
        let torch_cuda_library = flowmap_sys::libtorch_path().ok().and_then(|p| Path::new(&p).parent().map(|dir| dir.join("libtorch_cuda.so").exists())).unwrap_or(false);
        Self {
            torch_cuda: flowmap_sys::torch_cuda_version().ok().flatten().and_then(CudaVersion::from_code),
            torch_cuda_library,
            driver: std::fs::read_to_string(PROC_DRIVER_VERSION).ok().as_deref().and_then(parse_proc_driver_version),
            driver_cuda: flowmap_sys::cuda_driver_version().ok().flatten().and_then(CudaVersion::from_code),
            devices: tch::Cuda::device_count(),
            visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        }
    }

    /// The driver as one phrase: "580.65.06 (supports CUDA 13.0)".
    pub fn driver_text(&self) -> String {
        match (&self.driver, self.driver_cuda) {
            (Some(d), Some(c)) => format!("{d} (supports CUDA {c})"),
            (Some(d), None) => format!("{d} (kernel module; libcuda.so.1 not found)"),
            (None, Some(c)) => format!("libcuda.so.1 supports CUDA {c} ({PROC_DRIVER_VERSION} not readable)"),
            (None, None) => format!("none found (no {PROC_DRIVER_VERSION}, no libcuda.so.1)"),
        }
    }

    /// libtorch's CUDA as one phrase: "built with CUDA 13.0".
    pub fn torch_text(&self) -> String {
        match (self.torch_cuda, self.torch_cuda_library) {
            (Some(c), _) => format!("built with CUDA {c}"),
            (None, false) => "built without CUDA (cpu wheel)".into(),
            (None, true) => "libtorch_cuda.so present but not loaded into this process".into(),
        }
    }
}

/// Why `auto` resolves to the CPU.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuReason {
    /// The loaded libtorch has no CUDA. `library_present`: a CUDA wheel whose `libtorch_cuda.so` was
    /// not linked in (a binary built without crates/build's link arguments).
    NoCudaBuild { library_present: bool },
    /// Neither the kernel driver nor `libcuda.so.1`.
    NoDriver,
    /// The kernel driver is loaded but `libcuda.so.1` is not found (a container without GPU access).
    NoDriverLibrary { driver: String },
    /// The driver is older than the CUDA version libtorch was built with needs.
    DriverTooOld { driver: String, torch_cuda: CudaVersion, needed: String, cuda12_ok: bool },
    /// A working driver, but libtorch sees no device.
    NoDevice { driver: String, visible_devices: Option<String> },
}

/// The reason for `facts`, or `None` when libtorch sees a CUDA device.
pub fn fallback_reason(facts: &CudaFacts) -> Option<CpuReason> {
    if facts.devices > 0 {
        return None;
    }
    let Some(torch_cuda) = facts.torch_cuda else {
        return Some(CpuReason::NoCudaBuild { library_present: facts.torch_cuda_library });
    };
    if facts.driver.is_none() && facts.driver_cuda.is_none() {
        return Some(CpuReason::NoDriver);
    }
    let driver = facts.driver_text();
    let needed = min_driver_for(torch_cuda).map_or_else(|| format!("a driver for CUDA {}.x", torch_cuda.major), |d| format!("driver >= {d}"));
    let cuda12 = CudaVersion { major: 12, minor: 0 };
    // libcuda.so.1 is what CUDA runs against (a forward-compatibility package makes it newer than the
    // kernel module), so its CUDA version decides when it is there: a driver runs every toolkit of
    // the CUDA major versions up to its own (minor version compatibility).
    let (too_old, cuda12_ok) = match (facts.driver_cuda, &facts.driver) {
        (Some(c), _) => (c.major < torch_cuda.major, c.major >= 12),
        (None, Some(d)) => (driver_supports(d, torch_cuda) == Some(false), driver_supports(d, cuda12) == Some(true)),
        (None, None) => unreachable!("handled above"),
    };
    if too_old {
        return Some(CpuReason::DriverTooOld { driver, torch_cuda, needed, cuda12_ok });
    }
    if let (None, Some(d)) = (facts.driver_cuda, &facts.driver) {
        return Some(CpuReason::NoDriverLibrary { driver: d.to_string() });
    }
    Some(CpuReason::NoDevice { driver, visible_devices: facts.visible_devices.clone() })
}

impl fmt::Display for CpuReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuReason::NoCudaBuild { library_present: false } => write!(
                f,
                "libtorch was built without CUDA (the cpu wheel); to use an NVIDIA GPU run \
                 `FLOWMAP_TORCH_CUDA=cu130 make setup` (cu128 or cu126 for drivers older than 580) and rebuild"
            ),
            CpuReason::NoCudaBuild { library_present: true } => write!(
                f,
                "libtorch_cuda.so is installed but was not loaded into this binary, so libtorch has no CUDA; \
                 build the binary with cargo in this workspace (crates/build links it with --no-as-needed)"
            ),
            CpuReason::NoDriver => write!(
                f,
                "no NVIDIA driver found (no {PROC_DRIVER_VERSION}, no libcuda.so.1), so no CUDA device; \
                 in a container, start it with GPU access (e.g. `docker run --gpus all`)"
            ),
            CpuReason::NoDriverLibrary { driver } => write!(
                f,
                "the NVIDIA kernel driver {driver} is loaded but its library libcuda.so.1 was not found; \
                 in a container, start it with GPU access (e.g. `docker run --gpus all`)"
            ),
            CpuReason::DriverTooOld { driver, torch_cuda, needed, cuda12_ok } => {
                write!(f, "NVIDIA driver {driver} is too old for this libtorch, built with CUDA {torch_cuda}, which needs {needed}; ")?;
                if *cuda12_ok && torch_cuda.major > 12 {
                    write!(f, "upgrade the driver, or install a CUDA 12 build of torch: `FLOWMAP_TORCH_CUDA=cu126 make setup` (or cu128) and rebuild")
                } else {
                    write!(f, "upgrade the driver (CUDA 12 builds need >= 525.60.13), or use `FLOWMAP_TORCH_CUDA=cpu make setup`")
                }
            }
            CpuReason::NoDevice { driver, visible_devices } => {
                write!(f, "NVIDIA driver {driver} is installed but libtorch sees no CUDA device")?;
                match visible_devices {
                    Some(v) => write!(f, "; CUDA_VISIBLE_DEVICES={v:?} is set: check that it names existing devices, and `nvidia-smi`"),
                    None => write!(f, "; check `nvidia-smi`"),
                }
            }
        }
    }
}

/// Why `auto` would use the CPU here, or `None` when CUDA is available.
pub fn cpu_fallback_reason() -> Option<String> {
    if tch::Cuda::is_available() {
        return None;
    }
    // libtorch sees no device, whatever the facts say about the driver.
    let facts = CudaFacts { devices: 0, ..CudaFacts::probe() };
    fallback_reason(&facts).map(|r| r.to_string())
}

/// `run.device`: where a run trains and evaluates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// `auto` without CUDA warns once with the reason; `cuda` without CUDA is an error.
    pub fn device(self) -> Result<Device> {
        resolve(self)
    }
}

/// The device for a `run.device` (or `--device`) choice. `auto` without CUDA warns once per process
/// with the reason; `cuda` without CUDA is an error with the reason.
pub fn resolve(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => match cpu_fallback_reason() {
            None => Ok(Device::Cuda(0)),
            Some(reason) => {
                static WARNED: OnceLock<()> = OnceLock::new();
                WARNED.get_or_init(|| {
                    tracing::warn!("device = \"auto\" is using the CPU: {reason}. Set run.device = \"cpu\" (or --device cpu) to silence this warning.");
                });
                Ok(Device::Cpu)
            }
        },
        DeviceChoice::Cuda => match cpu_fallback_reason() {
            None => Ok(Device::Cuda(0)),
            Some(reason) => bail!("run.device = \"cuda\" but CUDA is not available: {reason} (see `flowmap doctor`)"),
        },
    }
}
