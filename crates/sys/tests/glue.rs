//! Every function of the shim, on CPU. The switches are process-global, so tests take a lock.
use flowmap_sys::*;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

static GLOBAL: Mutex<()> = Mutex::new(());
fn lock() -> std::sync::MutexGuard<'static, ()> {
    GLOBAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn dual_level_enters_leaves_and_refuses_nesting() {
    let _g = lock();
    assert!(!forward_ad_active());
    {
        let level = DualLevel::enter().unwrap();
        assert_eq!(level.index(), 0);
        assert!(forward_ad_active());
        // libtorch supports one level at a time: a second one is an error, not a crash.
        let err = DualLevel::enter().unwrap_err();
        assert!(err.0.to_lowercase().contains("nested"), "{err}");
        // d/dx (x * x) · v = 2 x v
        let x = Tensor::from_slice(&[1.0f64, -2.0, 3.0]);
        let v = Tensor::from_slice(&[0.5f64, 1.0, -1.0]);
        let y = level.make_dual(&x, &v) * level.make_dual(&x, &v);
        let (p, t) = level.unpack(&y);
        assert_eq!(Vec::<f64>::try_from(&p).unwrap(), vec![1.0, 4.0, 9.0]);
        assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![1.0, -4.0, -6.0]);
        // A tensor with no tangent unpacks to zeros.
        let (_, t0) = level.unpack(&x);
        assert_eq!(t0.abs().sum(Kind::Double).double_value(&[]), 0.0);
    }
    assert!(!forward_ad_active());
    // Released: the next level gets index 0 again.
    assert_eq!(DualLevel::enter().unwrap().index(), 0);
}

#[test]
fn level_is_left_when_a_panic_unwinds() {
    let _g = lock();
    let r = std::panic::catch_unwind(|| {
        let _level = DualLevel::enter().unwrap();
        panic!("boom");
    });
    assert!(r.is_err());
    assert!(!forward_ad_active());
    assert_eq!(DualLevel::enter().unwrap().index(), 0);
}

fn sdp_states() -> Vec<bool> {
    SdpBackend::ALL.iter().map(|b| b.enabled().unwrap()).collect()
}

#[test]
fn sdpa_backend_guard_sets_and_restores() {
    let _g = lock();
    let before = sdp_states();
    assert_eq!(before, vec![true, true, true, true], "libtorch enables every backend by default");
    {
        let _only = SdpBackendGuard::only(&[SdpBackend::Math]).unwrap();
        assert_eq!(sdp_states(), vec![false, false, true, false]);
        {
            let _flash = SdpBackendGuard::only(&[SdpBackend::Flash]).unwrap();
            assert_eq!(sdp_states(), vec![true, false, false, false]);
        }
        assert_eq!(sdp_states(), vec![false, false, true, false]);
    }
    assert_eq!(sdp_states(), before);
}

#[test]
fn fused_sdpa_has_no_forward_derivative_but_math_does() {
    let _g = lock();
    tch::manual_seed(0);
    let q = Tensor::randn([2, 2, 8, 16], (Kind::Float, Device::Cpu));
    let tq = Tensor::randn([2, 2, 8, 16], (Kind::Float, Device::Cpu));
    let attend = |backend: SdpBackend| {
        let _only = SdpBackendGuard::only(&[backend]).unwrap();
        let level = DualLevel::enter().unwrap();
        let qd = level.make_dual(&q, &tq);
        Tensor::f_scaled_dot_product_attention(&qd, &qd, &qd, None::<Tensor>, 0.0, false, None, false).map(|o| level.unpack(&o).1)
    };
    let flash = attend(SdpBackend::Flash);
    let err = flash.expect_err("the CPU flash kernel must refuse forward AD").to_string();
    assert!(err.contains("forward AD"), "{err}");
    let tangent = attend(SdpBackend::Math).unwrap();
    assert_eq!(tangent.size(), vec![2, 2, 8, 16]);
    assert!(tangent.abs().max().double_value(&[]) > 0.0);
}

#[test]
fn autocast_bf16_guard_changes_matmul_dtype_and_restores() {
    let _g = lock();
    let before = autocast_state(AutocastDevice::Cpu).unwrap();
    assert!(!before.0);
    let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
    {
        let _ac = AutocastGuard::new(AutocastDevice::Cpu, true, Kind::BFloat16).unwrap();
        assert_eq!(autocast_state(AutocastDevice::Cpu).unwrap(), (true, Kind::BFloat16));
        assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
    }
    assert_eq!(autocast_state(AutocastDevice::Cpu).unwrap(), before);
    assert_eq!(a.matmul(&a).kind(), Kind::Float);
    assert!(AutocastGuard::new(AutocastDevice::Cpu, true, Kind::Int64).is_err());
    // The CUDA autocast state can be set and read without a GPU.
    {
        let _ac = AutocastGuard::bf16_cuda().unwrap();
        assert_eq!(autocast_state(AutocastDevice::Cuda).unwrap(), (true, Kind::BFloat16));
    }
    assert!(!autocast_state(AutocastDevice::Cuda).unwrap().0);
}

#[test]
fn tf32_and_determinism_switches_round_trip() {
    let _g = lock();
    let tf32 = tf32_enabled().unwrap();
    set_tf32(true).unwrap();
    assert!(tf32_enabled().unwrap());
    set_tf32(false).unwrap();
    assert!(!tf32_enabled().unwrap());
    set_tf32(tf32).unwrap();

    let det = deterministic_enabled().unwrap();
    set_deterministic(true, false).unwrap();
    assert!(deterministic_enabled().unwrap());
    set_deterministic(false, false).unwrap();
    assert!(!deterministic_enabled().unwrap());
    set_deterministic(det, false).unwrap();
}

/// One plain AdamW step (PyTorch's formula), for comparison with the fused kernel.
fn adamw_reference(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, step: f64, hp: AdamWHyper) -> (Tensor, Tensor, Tensor) {
    let p = p * (1.0 - hp.lr * hp.weight_decay);
    let m = m * hp.beta1 + g * (1.0 - hp.beta1);
    let v = v * hp.beta2 + g * g * (1.0 - hp.beta2);
    let bc1 = 1.0 - hp.beta1.powf(step);
    let bc2 = 1.0 - hp.beta2.powf(step);
    let denom = (&v / bc2).sqrt() + hp.eps;
    let p = p - (&m / bc1) / denom * hp.lr;
    (p, m, v)
}

#[test]
fn fused_adamw_matches_the_plain_update() {
    let _g = lock();
    tch::manual_seed(1);
    let hp = AdamWHyper { lr: 1e-2, beta1: 0.9, beta2: 0.95, weight_decay: 0.1, eps: 1e-8 };
    let shapes: [&[i64]; 2] = [&[3, 4], &[5]];
    let params: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect();
    let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect();
    let m: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
    let v: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
    let steps: Vec<Tensor> = params.iter().map(|_| Tensor::zeros([], (Kind::Float, Device::Cpu))).collect();
    let mut expect: Vec<_> = params.iter().zip(&m).zip(&v).map(|((p, m), v)| (p.copy(), m.copy(), v.copy())).collect();
    for step in 1..=3 {
        match fused_adamw(&params, &grads, &m, &v, &steps, hp) {
            Ok(()) => {}
            // Older libtorch builds only have the CUDA kernel; 2.11 has the CPU one too.
            Err(e) => panic!("fused AdamW on CPU failed: {e}"),
        }
        for (i, e) in expect.iter_mut().enumerate() {
            *e = adamw_reference(&e.0, &grads[i], &e.1, &e.2, step as f64, hp);
        }
    }
    for (i, (p, mm, vv)) in expect.iter().enumerate() {
        assert_eq!(steps[i].double_value(&[]), 3.0);
        let dp = (&params[i] - p).abs().max().double_value(&[]);
        let dm = (&m[i] - mm).abs().max().double_value(&[]);
        let dv = (&v[i] - vv).abs().max().double_value(&[]);
        assert!(dp < 1e-6 && dm < 1e-6 && dv < 1e-6, "param {i}: |dp| {dp:e}, |dm| {dm:e}, |dv| {dv:e}");
    }
    // Mismatched lists are an error naming the lengths.
    let err = fused_adamw(&params, &grads[..1], &m, &v, &steps, hp).unwrap_err();
    assert!(err.0.contains("grads 1"), "{err}");
}

#[test]
fn build_facts() {
    assert_eq!(torch_version(), "2.11.0");
    assert!(libtorch_path().unwrap().ends_with("libtorch_cpu.so"));
    if !tch::Cuda::is_available() {
        assert!(cuda_device_name(0).is_err());
    } else {
        assert!(!cuda_device_name(0).unwrap().is_empty());
    }
}

#[test]
fn cuda_memory_statistics_are_none_on_cpu_and_count_bytes_on_cuda() {
    let _g = lock();
    assert_eq!(cuda_memory(Device::Cpu).unwrap(), None);
    cuda_reset_peak_memory(Device::Cpu).unwrap();
    cuda_empty_cache().unwrap();
    assert_eq!(cuda_stream_idle(Device::Cpu).unwrap(), None);
    if !tch::Cuda::is_available() {
        // The CPU-safe fallback also covers a CUDA device index when no GPU is visible.
        assert_eq!(cuda_memory(Device::Cuda(0)).unwrap(), None);
        eprintln!("no CUDA device: only the CPU fallbacks were checked");
        return;
    }
    let dev = Device::Cuda(0);
    let before = cuda_memory(dev).unwrap().unwrap();
    let bytes = 64 << 20;
    let t = Tensor::ones([bytes / 4], (Kind::Float, dev));
    let during = cuda_memory(dev).unwrap().unwrap();
    assert!(during.allocated - before.allocated >= bytes, "{before:?} -> {during:?}");
    assert!(during.peak_allocated >= during.allocated && during.reserved >= during.allocated);
    drop(t);
    cuda_reset_peak_memory(dev).unwrap();
    let after = cuda_memory(dev).unwrap().unwrap();
    assert!(after.peak_allocated < during.peak_allocated, "reset lowers the peak: {during:?} -> {after:?}");
    cuda_empty_cache().unwrap();
    assert!(cuda_memory(dev).unwrap().unwrap().reserved <= after.reserved);
}

#[test]
fn sync_counter_counts_what_libtorch_reports_and_restores_the_mode() {
    let _g = lock();
    // With no counter active the hook is silent (the debug mode is off).
    SyncCounter::probe().unwrap();
    {
        let counter = SyncCounter::start().unwrap();
        assert!(SyncCounter::start().is_err(), "one counter per thread");
        assert_eq!(counter.syncs(), 0);
        SyncCounter::probe().unwrap();
        SyncCounter::probe().unwrap();
        assert_eq!(counter.syncs(), 2);
        // Host reads of CPU tensors are not CUDA synchronisations.
        let x = Tensor::from_slice(&[1.0f32, 2.0]);
        assert_eq!(x.sum(Kind::Float).double_value(&[]), 3.0);
        assert_eq!(counter.syncs(), 2);
        if tch::Cuda::is_available() {
            let y = x.to_device(Device::Cuda(0)).sum(Kind::Float);
            let before = counter.syncs();
            assert_eq!(y.double_value(&[]), 3.0); // device-to-host copy: one synchronisation
            assert!(counter.syncs() > before, "a CUDA .item() must count");
        }
    }
    // Dropped: the mode is restored, so the hook is silent again and a new counter starts at 0.
    SyncCounter::probe().unwrap();
    let again = SyncCounter::start().unwrap();
    assert_eq!(again.syncs(), 0);
}
