//! `device = "auto"`: the driver/CUDA version logic behind its CPU-fallback warning, and what it
//! resolves to on this machine.
use flowmap_experiments::run::device::DeviceChoice;
use flowmap_experiments::run::device::{self, CpuReason, CudaFacts, CudaVersion, DriverVersion};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tch::Device;

fn driver(s: &str) -> DriverVersion {
    DriverVersion::parse(s).unwrap()
}

fn cuda(major: u32, minor: u32) -> CudaVersion {
    CudaVersion { major, minor }
}

#[test]
fn parses_proc_driver_version_texts() {
    let proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:19 UTC 2025\n\
                       GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n";
    assert_eq!(device::parse_proc_driver_version(proprietary).unwrap().to_string(), "580.65.06");
    let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  575.57.08  Release Build  (dvs-builder@U16-I3-B03-4-3)  Sat May 24 07:21:13 UTC 2025\n\
                GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)\n";
    assert_eq!(device::parse_proc_driver_version(open).unwrap().to_string(), "575.57.08");
    let aarch64 = "NVRM version: NVIDIA UNIX aarch64 Kernel Module  550.54.15  Tue Mar  5 22:15:33 UTC 2024\n";
    assert_eq!(device::parse_proc_driver_version(aarch64).unwrap(), driver("550.54.15"));
    assert!(device::parse_proc_driver_version("").is_none());
    assert!(device::parse_proc_driver_version("GCC version:  gcc version 12.2.0\n").is_none());
    assert!(device::parse_proc_driver_version("NVRM version: garbled\n").is_none());
}

#[test]
fn versions_compare_number_by_number() {
    assert!(driver("580.65.06") > driver("575.57.08"));
    assert!(driver("580.65.06") >= driver("580"));
    assert!(driver("525.60.13") > driver("525.60.9")); // not a string comparison
    assert_eq!(driver("580.0"), driver("580"));
    assert!(DriverVersion::parse("580.x").is_none());
    assert_eq!(CudaVersion::from_code(13000), Some(cuda(13, 0)));
    assert_eq!(CudaVersion::from_code(12080), Some(cuda(12, 8)));
    assert_eq!(CudaVersion::from_code(12060).unwrap().to_string(), "12.6");
    assert_eq!(CudaVersion::from_code(0), None);
}

/// NVIDIA's minor-version-compatibility minimums (device.rs MIN_DRIVER_FOR_CUDA_MAJOR):
/// CUDA 13.x >= 580, 12.x >= 525.60.13, 11.x >= 450.80.02.
#[test]
fn driver_vs_cuda_table() {
    let cases = [
        ("575.57.08", cuda(13, 0), Some(false)),
        ("579.99", cuda(13, 0), Some(false)),
        ("580", cuda(13, 0), Some(true)),
        ("580.65.06", cuda(13, 0), Some(true)),
        ("590.44.01", cuda(13, 0), Some(true)),
        ("575.57.08", cuda(12, 8), Some(true)),
        ("570.86.15", cuda(12, 8), Some(true)),
        ("560.35.05", cuda(12, 6), Some(true)),
        ("550.54.15", cuda(12, 6), Some(true)), // minor version compatibility within 12.x
        ("525.60.13", cuda(12, 6), Some(true)),
        ("525.60.12", cuda(12, 8), Some(false)),
        ("520.61.05", cuda(12, 6), Some(false)),
        ("470.256.02", cuda(12, 6), Some(false)),
        ("470.256.02", cuda(11, 8), Some(true)),
        ("580.65.06", cuda(14, 0), None), // unknown major: no verdict from the table
    ];
    for (d, c, want) in cases {
        assert_eq!(device::driver_supports(&driver(d), c), want, "driver {d} with CUDA {c}");
    }
}

fn cuda_wheel() -> CudaFacts {
    CudaFacts { torch_cuda: Some(cuda(13, 0)), torch_cuda_library: true, ..Default::default() }
}

#[test]
fn fallback_reasons() {
    // A visible device: no fallback, whatever else.
    assert_eq!(device::fallback_reason(&CudaFacts { devices: 1, ..cuda_wheel() }), None);

    // (c) the cpu wheel.
    let cpu = CudaFacts { driver: Some(driver("580.65.06")), driver_cuda: Some(cuda(13, 0)), ..Default::default() };
    let r = device::fallback_reason(&cpu).unwrap();
    assert_eq!(r, CpuReason::NoCudaBuild { library_present: false });
    assert!(r.to_string().contains("built without CUDA") && r.to_string().contains("FLOWMAP_TORCH_CUDA=cu130"), "{r}");
    // A CUDA wheel whose libtorch_cuda.so was not linked in.
    let unlinked = CudaFacts { torch_cuda_library: true, ..Default::default() };
    assert!(device::fallback_reason(&unlinked).unwrap().to_string().contains("not loaded"));

    // (a) no driver at all.
    let r = device::fallback_reason(&cuda_wheel()).unwrap();
    assert_eq!(r, CpuReason::NoDriver);
    assert!(r.to_string().contains("no NVIDIA driver found"), "{r}");

    // (b) a 575 driver (CUDA 12.9) under the CUDA 13.0 wheel: too old; a CUDA 12 wheel would run.
    let old = CudaFacts { driver: Some(driver("575.57.08")), driver_cuda: Some(cuda(12, 9)), ..cuda_wheel() };
    let r = device::fallback_reason(&old).unwrap();
    assert!(matches!(r, CpuReason::DriverTooOld { cuda12_ok: true, .. }), "{r:?}");
    let text = r.to_string();
    for want in ["575.57.08", "too old", "CUDA 13.0", "driver >= 580", "FLOWMAP_TORCH_CUDA=cu126 make setup"] {
        assert!(text.contains(want), "{want:?} missing from: {text}");
    }
    // The same judged from /proc alone (libcuda's answer unavailable).
    let proc_only = CudaFacts { driver_cuda: None, ..old.clone() };
    assert!(matches!(device::fallback_reason(&proc_only).unwrap(), CpuReason::DriverTooOld { cuda12_ok: true, .. }));
    // Too old even for CUDA 12: advise a driver upgrade or the cpu wheel.
    let ancient = CudaFacts { driver: Some(driver("470.256.02")), driver_cuda: Some(cuda(11, 4)), ..cuda_wheel() };
    let text = device::fallback_reason(&ancient).unwrap().to_string();
    assert!(text.contains("upgrade the driver") && text.contains("FLOWMAP_TORCH_CUDA=cpu"), "{text}");
    let cu126_on_470 = CudaFacts { torch_cuda: Some(cuda(12, 6)), ..ancient };
    assert!(device::fallback_reason(&cu126_on_470).unwrap().to_string().contains("driver >= 525.60.13"));

    // A CUDA 12 wheel on a 550 driver is fine (minor version compatibility): the device is missing.
    let cu126 = CudaFacts { torch_cuda: Some(cuda(12, 6)), driver: Some(driver("550.54.15")), driver_cuda: Some(cuda(12, 4)), ..cuda_wheel() };
    assert!(matches!(device::fallback_reason(&cu126).unwrap(), CpuReason::NoDevice { .. }));
    // A forward-compatibility libcuda (CUDA 13.0) over a 535 kernel module: libcuda decides.
    let compat = CudaFacts { driver: Some(driver("535.247.01")), driver_cuda: Some(cuda(13, 0)), ..cuda_wheel() };
    assert!(matches!(device::fallback_reason(&compat).unwrap(), CpuReason::NoDevice { .. }));
    // A new enough driver but no device; CUDA_VISIBLE_DEVICES is named when set.
    let hidden = CudaFacts { driver: Some(driver("580.65.06")), driver_cuda: Some(cuda(13, 0)), visible_devices: Some(String::new()), ..cuda_wheel() };
    let text = device::fallback_reason(&hidden).unwrap().to_string();
    assert!(text.contains("no CUDA device") && text.contains("CUDA_VISIBLE_DEVICES"), "{text}");
    // The kernel module without its user-space library (a container without GPU access).
    let no_lib = CudaFacts { driver: Some(driver("580.65.06")), ..cuda_wheel() };
    let r = device::fallback_reason(&no_lib).unwrap();
    assert!(matches!(r, CpuReason::NoDriverLibrary { .. }) && r.to_string().contains("libcuda.so.1"), "{r}");
}

/// Collects what tracing writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// On this machine: `auto` is CUDA exactly when libtorch sees a device; otherwise it is the CPU, with
/// a reason, warned once. On the CPU-only CI machine the reason is the missing driver.
#[test]
fn auto_on_this_machine() {
    let facts = CudaFacts::probe();
    // The glue reports libtorch's CUDA: a CUDA wheel whose libtorch_cuda.so our build links in.
    if facts.torch_cuda_library {
        assert!(facts.torch_cuda.is_some(), "libtorch_cuda.so is installed but libtorch reports no CUDA: {facts:?}");
    }
    let log = Captured::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).finish();
    let auto = tracing::subscriber::with_default(subscriber, || {
        let first = device::resolve(DeviceChoice::Auto).unwrap();
        assert_eq!(device::resolve(DeviceChoice::Auto).unwrap(), first);
        first
    });
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert_eq!(device::resolve(DeviceChoice::Cpu).unwrap(), Device::Cpu);
    if tch::Cuda::is_available() {
        assert_eq!(auto, Device::Cuda(0));
        assert_eq!(device::cpu_fallback_reason(), None);
        assert!(log.is_empty(), "{log}");
        return;
    }
    assert_eq!(auto, Device::Cpu);
    let reason = device::cpu_fallback_reason().expect("CUDA is unavailable, so there is a reason");
    eprintln!("cpu_fallback_reason: {reason}");
    eprintln!("doctor: libtorch {}; driver {}", facts.torch_text(), facts.driver_text());
    assert!(reason.contains("driver") || reason.contains("device") || reason.contains("without CUDA"), "{reason}");
    if facts.torch_cuda.is_some() && facts.driver.is_none() && facts.driver_cuda.is_none() {
        assert!(reason.contains("no NVIDIA driver found") && reason.contains("no CUDA device"), "{reason}");
    }
    // Warned once, with the reason and how to silence it.
    assert_eq!(log.matches("device = \"auto\" is using the CPU").count(), 1, "{log}");
    assert!(log.contains("WARN") && log.contains(&reason) && log.contains("run.device = \"cpu\""), "{log}");
    // `cuda` without CUDA is an error that carries the reason.
    let err = device::resolve(DeviceChoice::Cuda).unwrap_err().to_string();
    assert!(err.contains("CUDA is not available") && err.contains(&reason), "{err}");
}
