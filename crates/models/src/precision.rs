//! Numeric precision of a model's forward pass: float32, TF32 matmuls, or bfloat16 autocast.
//! All three are CUDA features; on the CPU every request runs in plain float32.
use serde::{Deserialize, Serialize};
use tch::Device;

/// `precision = "bf16"` in a model table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Plain float32 (or whatever dtype the parameters have, e.g. float64 in tests).
    #[default]
    F32,
    /// float32 tensors, TF32 tensor-core matmuls and convolutions (CUDA only). The switch is on
    /// during the forward pass; a train loop that wants TF32 in backward too sets it process-wide
    /// (`flowmap_sys::set_tf32`).
    Tf32,
    /// bfloat16 autocast around the forward pass (CUDA only); outputs are cast back to the input dtype.
    Bf16,
}

impl Precision {
    /// The precision that actually runs on `device`: CPU requests for TF32 or bf16 fall back to
    /// float32 with a warning (libtorch's CPU bf16 matmuls are slow and TF32 is a CUDA format).
    pub fn effective(self, device: Device) -> Precision {
        if device.is_cuda() || self == Precision::F32 {
            return self;
        }
        tracing::warn!("precision {self:?} requested on {device:?}: running float32 instead");
        Precision::F32
    }

    /// Enters this precision for the duration of one forward pass. Under forward-mode AD bf16 is
    /// dropped to float32: bf16 autocast around a JVP followed by `backward()` fails in libtorch
    /// 2.11 ("expected input and grad types to match", toolchain.md), and the official MeanFlow
    /// code turns autocast off around its JVP for the same reason.
    pub(crate) fn enter(self) -> PrecisionGuard {
        match self {
            Precision::F32 => PrecisionGuard::None,
            Precision::Bf16 if flowmap_sys::forward_ad_active() => PrecisionGuard::None,
            Precision::Bf16 => PrecisionGuard::Autocast { _guard: flowmap_sys::AutocastGuard::bf16_cuda().expect("entering bf16 autocast") },
            Precision::Tf32 => {
                let previous = flowmap_sys::tf32_enabled().expect("reading the TF32 switch");
                flowmap_sys::set_tf32(true).expect("enabling TF32");
                PrecisionGuard::Tf32 { previous }
            }
        }
    }
}

/// Restores autocast or the TF32 switch when dropped.
pub(crate) enum PrecisionGuard {
    None,
    Autocast { _guard: flowmap_sys::AutocastGuard }, // held for its Drop
    Tf32 { previous: bool },
}

impl Drop for PrecisionGuard {
    fn drop(&mut self) {
        if let PrecisionGuard::Tf32 { previous } = self {
            if let Err(e) = flowmap_sys::set_tf32(*previous) {
                tracing::error!("restoring the TF32 switch: {e}");
            }
        }
    }
}
