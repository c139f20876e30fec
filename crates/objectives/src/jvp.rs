//! Jacobian-vector products through libtorch's forward-mode AD.
//!
//! `jvp(f, primals, tangents)` evaluates `f` once on dual tensors and returns `(f(p), J_f(p)·v)`.
//! The primal output keeps its autograd graph, and so does the tangent, so a loss on either (or
//! both) back-propagates to the parameters `f` closes over (MeanFlow's full second-order gradient).
//! Fused SDPA kernels have no forward derivative: attention inside `f` must take the math path.
use anyhow::{bail, ensure, Context, Result};
use flowmap_sys::DualLevel;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How an objective computes its JVP (`jvp_mode` in every JVP objective's `[objective]` table).
/// All run in the network's dtype with CUDA autocast off around the JVP (the DiT also drops its
/// bf16 autocast while a forward-AD level is active).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JvpMode {
    /// One forward pass on dual numbers gives F and J·w; F keeps its graph and is the primal the
    /// gradient flows through (math attention for the whole pass).
    #[default]
    OnePass,
    /// J·w from a JVP under no_grad (no graph: less memory), then an ordinary forward for the
    /// gradient (which may use fused attention). One extra forward. Needs a stop-gradient on the
    /// JVP term.
    GraphFree,
    /// J·w ≈ (F(p + δw) − F(p − δw)) / 2δ under no_grad (as NVIDIA FastGen's finite-difference
    /// JVP), then an ordinary forward for the gradient: three forwards and no forward-mode AD, so
    /// it works for modules without forward derivatives (fused attention) and cross-checks the
    /// other two modes. δ is `jvp_fd_step` (default [`default_fd_step`] of the network's dtype).
    /// Needs a stop-gradient on the JVP term.
    FiniteDifference,
}

impl JvpMode {
    /// `(F(p) with its autograd graph, J_F(p)·v)`. The tangent keeps a graph only in `one_pass`
    /// (the only mode a loss on the JVP term can back-propagate through). `fd_step` is read by
    /// `finite_difference` only (`None`: [`default_fd_step`]).
    pub fn primal_and_jvp<F>(self, f: F, primals: &[Tensor], tangents: &[Tensor], fd_step: Option<f64>) -> Result<(Tensor, Tensor)>
    where
        F: Fn(&[Tensor]) -> Result<Tensor>,
    {
        match self {
            JvpMode::OnePass => jvp(f, primals, tangents),
            JvpMode::GraphFree => {
                let (_, tangent) = jvp_graph_free(&f, primals, tangents)?;
                Ok((f(primals)?, tangent))
            }
            JvpMode::FiniteDifference => {
                let tangent = jvp_finite_difference(&f, primals, tangents, fd_step)?;
                Ok((f(primals)?, tangent))
            }
        }
    }

    /// Whether the JVP term can carry a gradient (a loss without stop-gradient on it needs this).
    pub fn differentiable(self) -> bool {
        self == JvpMode::OnePass
    }

    /// The TOML spelling.
    pub fn name(self) -> &'static str {
        match self {
            JvpMode::OnePass => "one_pass",
            JvpMode::GraphFree => "graph_free",
            JvpMode::FiniteDifference => "finite_difference",
        }
    }
}

/// The central-difference step for a dtype, near the optimum (3·rounding)^(1/3) for unit-scale
/// inputs: 1e-4 in float64 (truncation ~1e-8·|F'''|, rounding ~1e-12), 5e-3 in float32.
pub fn default_fd_step(kind: Kind) -> f64 {
    match kind {
        Kind::Double => 1e-4,
        _ => 5e-3,
    }
}

/// Checks a configured finite-difference step (`key` names it in the error).
pub fn validate_fd_step(step: Option<f64>, key: &str) -> Result<()> {
    if let Some(d) = step {
        ensure!(d.is_finite() && d > 0.0 && d < 1.0, "{key} = {d}: the finite-difference step must be in (0, 1)");
    }
    Ok(())
}

/// `J_f(primals)·tangents` by central differences under no_grad, (f(p + δv) − f(p − δv)) / 2δ with
/// δ = `step` or [`default_fd_step`] of the first primal's dtype: two evaluations of `f`.
pub fn jvp_finite_difference<F>(f: F, primals: &[Tensor], tangents: &[Tensor], step: Option<f64>) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    check_pairs(primals, tangents)?;
    ensure!(!primals.is_empty(), "jvp: no primals");
    validate_fd_step(step, "jvp_fd_step")?;
    let delta = step.unwrap_or_else(|| default_fd_step(primals[0].kind()));
    tch::no_grad(|| {
        let shifted = |sign: f64| -> Vec<Tensor> { primals.iter().zip(tangents).map(|(p, v)| p.detach() + v.detach() * (sign * delta)).collect() };
        let plus = f(&shifted(1.0))?;
        let minus = f(&shifted(-1.0))?;
        Ok((plus - minus) / (2.0 * delta))
    })
}

fn check_pairs(primals: &[Tensor], tangents: &[Tensor]) -> Result<()> {
    if primals.len() != tangents.len() {
        bail!("jvp: {} primals but {} tangents", primals.len(), tangents.len());
    }
    for (i, (p, v)) in primals.iter().zip(tangents).enumerate() {
        if p.size() != v.size() || p.kind() != v.kind() {
            bail!("jvp: input {i}: primal {:?} {:?} but tangent {:?} {:?}", p.size(), p.kind(), v.size(), v.kind());
        }
    }
    Ok(())
}

/// `(f(primals), J_f(primals)·tangents)` in one forward pass. The level is left on every path,
/// including an error or a panic inside `f`.
pub fn jvp<F>(f: F, primals: &[Tensor], tangents: &[Tensor]) -> Result<(Tensor, Tensor)>
where
    F: FnOnce(&[Tensor]) -> Result<Tensor>,
{
    check_pairs(primals, tangents)?;
    let level = DualLevel::enter().context("jvp: entering a forward-AD level")?;
    let duals: Vec<Tensor> = primals.iter().zip(tangents).map(|(p, v)| level.make_dual(p, v)).collect();
    let out = f(&duals)?;
    let (primal, tangent) = level.unpack(&out);
    // Shallow copies survive the level's release (which clears tangents attached to `out`).
    Ok((primal.shallow_clone(), tangent.shallow_clone()))
}

/// The JVP alone, with no autograd graph (under `no_grad`): less memory, and the caller runs an
/// ordinary forward for the gradient (which may then use fused attention).
pub fn jvp_graph_free<F>(f: F, primals: &[Tensor], tangents: &[Tensor]) -> Result<(Tensor, Tensor)>
where
    F: FnOnce(&[Tensor]) -> Result<Tensor>,
{
    let (primal, tangent) = tch::no_grad(|| jvp(f, primals, tangents))?;
    Ok((primal.detach(), tangent.detach()))
}

/// CUDA autocast off while alive (the JVP objectives run their JVP in the network's dtype,
/// methods.md §12.7). A no-op on the CPU.
pub(crate) fn fp32_scope(device: tch::Device) -> Option<flowmap_sys::AutocastGuard> {
    match device {
        tch::Device::Cuda(_) => Some(flowmap_sys::AutocastGuard::new(flowmap_sys::AutocastDevice::Cuda, false, Kind::Float).expect("switching autocast off for the JVP")),
        _ => None,
    }
}
