//! Exact fields for Gaussian data, used by tests and by the objectives' closed-form tests.
//!
//! Data x ~ N(mu, s² I), noise eps ~ N(0, I), any path x_t = alpha(t)·x + sigma(t)·eps. Then
//! x_t ~ N(m(t), S(t)² I) with m = alpha·mu and S² = alpha²·s² + sigma², and every quantity is
//! affine in x_t:
//!
//! * marginal velocity v(x_t, t) = E[d_alpha·x + d_sigma·eps | x_t]
//!   = d_alpha·mu + (S'/S)·(x_t − m(t)), with S·S' = alpha·d_alpha·s² + sigma·d_sigma
//!   (Cov(dx_t/dt, x_t) = S·S'·I, Var(x_t) = S²·I); for the linear path
//!   v = −mu + ((t − (1 − t)·s²)/S²)·(x_t − (1 − t)·mu) with S² = (1 − t)²·s² + t²;
//! * flow map (the ODE solution from t to r = t − h) Φ(x_t, t, h) = m(r) + (S(r)/S(t))·(x_t − m(t)):
//!   the solution of dx/dt = v is x_r − m(r) = (S(r)/S(t))·(x_t − m(t)), since both sides solve
//!   d/dt (x − m) = (S'/S)·(x − m);
//! * average velocity u(x_t, t, h) = (x_t − Φ(x_t, t, h))/h, and u(x_t, t, 0) = v(x_t, t).
//!
//! Shapes: `mu` has the data shape without the batch axis, e.g. (D,) or (C, H, W); x_t is
//! (B, ...) with that trailing shape; t and h are (B,). Use float64 for tight checks.
use tch::Tensor;

use crate::{per_sample, Interpolant, VelocityField};

/// Gaussian data N(mu, s² I).
#[derive(Debug)]
pub struct GaussianData {
    /// Mean, shaped like one sample (no batch axis).
    pub mu: Tensor,
    /// Standard deviation per coordinate, > 0.
    pub s: f64,
}

impl GaussianData {
    /// n samples mu + s·z, (n, ...), kind and device of `mu`; uses the global generator.
    pub fn sample(&self, n: i64) -> Tensor {
        let mut shape = vec![n];
        shape.extend(self.mu.size());
        Tensor::randn(shape.as_slice(), (self.mu.kind(), self.mu.device())) * self.s + &self.mu
    }

    /// Marginal mean m(t) = alpha(t)·mu, broadcast to `like` (B, ...).
    pub fn marginal_mean(&self, path: &dyn Interpolant, t: &Tensor, like: &Tensor) -> Tensor {
        per_sample(&path.alpha(t), like) * &self.mu
    }

    /// Marginal standard deviation S(t) = √(alpha²·s² + sigma²), (B,).
    pub fn marginal_std(&self, path: &dyn Interpolant, t: &Tensor) -> Tensor {
        (path.alpha(t).square() * (self.s * self.s) + path.sigma(t).square()).sqrt()
    }

    /// The exact marginal velocity v(x_t, t), (B, ...).
    pub fn velocity(&self, path: &dyn Interpolant, x_t: &Tensor, t: &Tensor) -> Tensor {
        let (alpha, sigma) = (path.alpha(t), path.sigma(t));
        let (d_alpha, d_sigma) = (path.d_alpha(t), path.d_sigma(t));
        let var = alpha.square() * (self.s * self.s) + sigma.square();
        let cov = &alpha * &d_alpha * (self.s * self.s) + &sigma * &d_sigma; // S·S'
        let m = per_sample(&alpha, x_t) * &self.mu;
        per_sample(&d_alpha, x_t) * &self.mu + per_sample(&(cov / var), x_t) * (x_t - m)
    }

    /// The exact flow map Φ(x_t, t, h) = x_r, r = t − h, (B, ...).
    pub fn flow_map(&self, path: &dyn Interpolant, x_t: &Tensor, t: &Tensor, h: &Tensor) -> Tensor {
        let r = t - h;
        let ratio = self.marginal_std(path, &r) / self.marginal_std(path, t);
        self.marginal_mean(path, &r, x_t) + per_sample(&ratio, x_t) * (x_t - self.marginal_mean(path, t, x_t))
    }

    /// The exact average velocity u(x_t, t, h) = (x_t − Φ)/h, with u = v where h = 0, (B, ...).
    pub fn average_velocity(&self, path: &dyn Interpolant, x_t: &Tensor, t: &Tensor, h: &Tensor) -> Tensor {
        let positive = h.gt(0.0);
        let h_safe = h.where_self(&positive, &h.ones_like()); // no 0/0 in the unused branch
        let u = (x_t - self.flow_map(path, x_t, t, h)) / per_sample(&h_safe, x_t);
        u.where_self(&per_sample(&positive, x_t), &self.velocity(path, x_t, t))
    }
}

/// The exact instantaneous velocity v(x_t, t) as a network; ignores h and the class.
#[derive(Debug)]
pub struct ExactVelocity<'a> {
    pub data: &'a GaussianData,
    pub path: &'a dyn Interpolant,
}

impl VelocityField for ExactVelocity<'_> {
    fn forward(&self, x_t: &Tensor, t: &Tensor, _h: &Tensor, _class: &Tensor) -> Tensor {
        self.data.velocity(self.path, x_t, t)
    }
    fn null_class(&self) -> i64 {
        0
    }
}

/// The exact average velocity u(x_t, t, h) as a network (h = 0 gives v); ignores the class.
#[derive(Debug)]
pub struct ExactAverageVelocity<'a> {
    pub data: &'a GaussianData,
    pub path: &'a dyn Interpolant,
}

impl VelocityField for ExactAverageVelocity<'_> {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, _class: &Tensor) -> Tensor {
        self.data.average_velocity(self.path, x_t, t, h)
    }
    fn null_class(&self) -> i64 {
        0
    }
}

/// The exact noise prediction E[eps | x_t] = sigma·(x_t − m)/S² as a network (what a DDPM model
/// learns); ignores h and the class.
#[derive(Debug)]
pub struct ExactEps<'a> {
    pub data: &'a GaussianData,
    pub path: &'a dyn Interpolant,
}

impl VelocityField for ExactEps<'_> {
    fn forward(&self, x_t: &Tensor, t: &Tensor, _h: &Tensor, _class: &Tensor) -> Tensor {
        let var = self.data.marginal_std(self.path, t).square();
        let m = self.data.marginal_mean(self.path, t, x_t);
        per_sample(&(self.path.sigma(t) / var), x_t) * (x_t - m)
    }
    fn null_class(&self) -> i64 {
        0
    }
}

/// The exact TrigFlow consistency output (sCM) as a network: it reads its input as
/// x_t/sigma(1) (TrigFlow's x_t/σ_d) and returns F = (alpha·x_t − Φ(x_t, t, t))/sigma, so that
/// alpha(t)·x_t − sigma(t)·F is the exact jump to data (the `trig_flow` rule's reading). Finite for
/// t > 0 (F → a finite limit as t → 0, where the formula is 0/0); ignores h and the class.
#[derive(Debug)]
pub struct ExactTrigFlowJump<'a> {
    pub data: &'a GaussianData,
    pub path: &'a dyn Interpolant,
}

impl VelocityField for ExactTrigFlowJump<'_> {
    fn forward(&self, x_in: &Tensor, t: &Tensor, _h: &Tensor, _class: &Tensor) -> Tensor {
        let scale = self.path.sigma(&t.ones_like().narrow(0, 0, 1)); // sigma(1), (1,): keeps AD tangents out
        let x_t = x_in * per_sample(&scale, x_in).detach();
        let x_hat = self.data.flow_map(self.path, &x_t, t, t);
        (per_sample(&self.path.alpha(t), &x_t) * &x_t - x_hat) / per_sample(&self.path.sigma(t), &x_t)
    }
    fn null_class(&self) -> i64 {
        0
    }
}
