//! Jacobian-vector products through libtorch's forward-mode AD.
//!
//! `jvp(f, primals, tangents)` evaluates `f` once on dual tensors and returns `(f(p), J_f(p)·v)`.
//! The primal output keeps its autograd graph, and so does the tangent, so a loss on either (or
//! both) back-propagates to the parameters `f` closes over (MeanFlow's full second-order gradient).
//! Fused SDPA kernels have no forward derivative: attention inside `f` must take the math path.
use anyhow::{bail, Context, Result};
use flowmap_sys::DualLevel;
use tch::Tensor;

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
