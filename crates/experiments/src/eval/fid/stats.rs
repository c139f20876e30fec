//! Gaussian statistics of Inception features and the Fréchet distance, all in float64
//! (methods.md §18.3), plus the pytorch-fid `.npz` format (`mu`, `sigma`).
use anyhow::{bail, ensure, Context, Result};
use npyz::WriterBuilder;
use std::io::Write;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Running sums Σa, Σaaᵀ and N of feature rows, in Float64 on the CPU. Sums (not means) so that
/// batches, and ranks, combine by addition.
#[derive(Debug)]
pub struct FeatureStats {
    count: i64,
    /// (D,)
    sum: Tensor,
    sum_outer: Tensor, // (D, D)
}

impl FeatureStats {
    /// Empty statistics for `dim`-wide features.
    pub fn new(dim: i64) -> Self {
        let opts = (Kind::Double, Device::Cpu);
        Self { count: 0, sum: Tensor::zeros([dim], opts), sum_outer: Tensor::zeros([dim, dim], opts) }
    }

    /// Statistics of one (N, D) feature matrix.
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let mut s = Self::new(*features.size().last().context("features must be (N, D)")?);
        s.update(features)?;
        Ok(s)
    }

    /// Adds (N, D) feature rows (any float kind, any device).
    pub fn update(&mut self, features: &Tensor) -> Result<()> {
        let size = features.size();
        ensure!(size.len() == 2 && size[1] == self.dim(), "features must be (N, {}), got {size:?}", self.dim());
        let a = features.to_device(Device::Cpu).to_kind(Kind::Double);
        self.count += size[0];
        self.sum += a.sum_dim_intlist(0, false, Kind::Double);
        self.sum_outer += a.tr().matmul(&a);
        Ok(())
    }

    /// Adds another accumulator (e.g. from another rank).
    pub fn merge(&mut self, other: &FeatureStats) -> Result<()> {
        ensure!(other.dim() == self.dim(), "cannot merge {}-d statistics into {}-d ones", other.dim(), self.dim());
        self.count += other.count;
        self.sum += &other.sum;
        self.sum_outer += &other.sum_outer;
        Ok(())
    }

    pub fn count(&self) -> i64 {
        self.count
    }

    pub fn dim(&self) -> i64 {
        self.sum.size()[0]
    }

    /// μ and Σ with the N − 1 denominator (`np.cov(rowvar=False)`). Needs N ≥ 2.
    pub fn finish(&self) -> Result<GaussianStats> {
        ensure!(self.count >= 2, "a covariance needs at least 2 feature rows, got {}", self.count);
        let n = self.count as f64;
        let mu = &self.sum / n;
        let outer = mu.unsqueeze(1).matmul(&mu.unsqueeze(0));
        let sigma = (&self.sum_outer - outer * n) / (n - 1.0);
        let sigma = (&sigma + sigma.tr()) * 0.5; // exact symmetry for eigh
        Ok(GaussianStats { mu, sigma })
    }
}

/// μ (D,) and Σ (D, D), Float64 on the CPU.
#[derive(Debug)]
pub struct GaussianStats {
    pub mu: Tensor,
    pub sigma: Tensor,
}

impl Clone for GaussianStats {
    fn clone(&self) -> Self {
        Self { mu: self.mu.copy(), sigma: self.sigma.copy() }
    }
}

impl GaussianStats {
    /// Checks shapes and converts to Float64 on the CPU.
    pub fn new(mu: Tensor, sigma: Tensor) -> Result<Self> {
        let d = mu.size();
        ensure!(d.len() == 1, "mu must be 1-d, got {d:?}");
        ensure!(sigma.size() == [d[0], d[0]], "sigma must be ({0}, {0}), got {1:?}", d[0], sigma.size());
        Ok(Self { mu: mu.to_device(Device::Cpu).to_kind(Kind::Double), sigma: sigma.to_device(Device::Cpu).to_kind(Kind::Double) })
    }

    pub fn dim(&self) -> i64 {
        self.mu.size()[0]
    }

    /// FID between two Gaussians; see [`frechet_distance`].
    pub fn frechet_distance(&self, other: &GaussianStats) -> Result<f64> {
        frechet_distance(&self.mu, &self.sigma, &other.mu, &other.sigma)
    }

    /// Reads `mu` and `sigma` (float64 or float32, C or Fortran order) from a pytorch-fid / ADM
    /// style `.npz`; other arrays in the archive are ignored.
    pub fn read_npz(path: &Path) -> Result<Self> {
        let mut npz = npyz::npz::NpzArchive::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mu = read_array(&mut npz, "mu", path)?.with_context(|| format!("{} holds no `mu` array", path.display()))?;
        let sigma = read_array(&mut npz, "sigma", path)?.with_context(|| format!("{} holds no `sigma` array", path.display()))?;
        Self::new(mu, sigma).with_context(|| format!("reading {}", path.display()))
    }

    /// Writes `mu` (D,) and `sigma` (D, D) as float64 into a new `.npz` (readable by `np.load`).
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        write_npz(path, &[("mu", &self.mu), ("sigma", &self.sigma)])
    }
}

/// Reads one float array of an `.npz` as a Float64 tensor of its shape; `Ok(None)` when absent.
pub fn read_array<R: std::io::Read + std::io::Seek>(npz: &mut npyz::npz::NpzArchive<R>, name: &str, path: &Path) -> Result<Option<Tensor>> {
    let Some(arr) = npz.by_name(name).with_context(|| format!("reading `{name}` in {}", path.display()))? else {
        return Ok(None);
    };
    let shape: Vec<i64> = arr.shape().iter().map(|&d| d as i64).collect();
    let order = arr.order();
    let values: Vec<f64> = match arr.try_data::<f64>() {
        Ok(reader) => reader.collect::<std::io::Result<Vec<f64>>>().with_context(|| format!("reading `{name}` in {}", path.display()))?,
        Err(arr) => match arr.try_data::<f32>() {
            Ok(reader) => reader.collect::<std::io::Result<Vec<f32>>>().with_context(|| format!("reading `{name}` in {}", path.display()))?.into_iter().map(f64::from).collect(),
            Err(arr) => bail!("`{name}` in {} has dtype {:?}; expected float64 or float32", path.display(), arr.dtype()),
        },
    };
    let t = Tensor::from_slice(&values);
    let t = match order {
        npyz::Order::C => t.reshape(&shape),
        npyz::Order::Fortran => {
            let rev: Vec<i64> = shape.iter().rev().copied().collect();
            let perm: Vec<i64> = (0..shape.len() as i64).rev().collect();
            t.reshape(&rev).permute(&perm).contiguous()
        }
    };
    Ok(Some(t))
}

/// Writes named tensors as float64 (Double) or float32 (anything else, cast) arrays into a new
/// `.npz` atomically ([`crate::run::atomic_file`]: a unique temporary file, renamed), so neither a
/// reader nor a concurrent writer ever sees half a file.
pub fn write_npz(path: &Path, arrays: &[(&str, &Tensor)]) -> Result<()> {
    crate::run::atomic_file::write_atomic_with(path, |file| {
        let mut npz = npyz::npz::NpzWriter::new(std::io::BufWriter::new(file));
        for (name, t) in arrays {
            let shape: Vec<u64> = t.size().iter().map(|&d| d as u64).collect();
            let t = t.to_device(Device::Cpu).contiguous();
            // zip64 entries past 4 GiB (feature matrices of large reference sets)
            let options = npyz::zip::write::FileOptions::default().large_file(t.numel() * 8 >= u32::MAX as usize);
            if t.kind() == Kind::Double {
                let v: Vec<f64> = Vec::try_from(t.reshape([-1]))?;
                let mut w = npz.array::<f64>(name, options)?.default_dtype().shape(&shape).begin_nd()?;
                w.extend(v)?;
                w.finish()?;
            } else {
                let v: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).reshape([-1]))?;
                let mut w = npz.array::<f32>(name, options)?.default_dtype().shape(&shape).begin_nd()?;
                w.extend(v)?;
                w.finish()?;
            }
        }
        let mut out = npz.zip_writer().finish()?; // the zip directory
        out.flush()?;
        Ok(())
    })
}

/// Eigenvalues of a symmetric PSD A (Float64) with rounding noise set to 0: values below
/// d·ε·λ_max are indistinguishable from 0 in float64, and their square roots (≈ √(ε‖A‖) each,
/// times up to d of them) would otherwise dominate the error for rank-deficient covariances.
fn clean_eigenvalues(lambda: &Tensor) -> Tensor {
    let d = lambda.size()[0] as f64;
    let top = lambda.max().double_value(&[]).max(0.0);
    let tol = d * f64::EPSILON * top;
    lambda.where_self(&lambda.gt(tol), &lambda.zeros_like())
}

/// tr √A for a symmetric positive semi-definite A (Float64).
fn trace_sqrt_psd(a: &Tensor) -> f64 {
    clean_eigenvalues(&a.linalg_eigvalsh("L")).sqrt().sum(Kind::Double).double_value(&[])
}

/// √A = V diag(√λ) Vᵀ for a symmetric positive semi-definite A (Float64).
fn sqrt_psd(a: &Tensor) -> Tensor {
    let (lambda, v) = a.linalg_eigh("L");
    (&v * clean_eigenvalues(&lambda).sqrt().unsqueeze(0)).matmul(&v.tr())
}

/// Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) in Float64:
/// ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2·tr √(Σ₁Σ₂).
///
/// libtorch has no `sqrtm`. Σ₁Σ₂ is similar to the symmetric PSD M = √Σ₁ Σ₂ √Σ₁, so
/// tr √(Σ₁Σ₂) = Σ √λ(M); both eigen-decompositions are symmetric (`eigh`), and eigenvalues at
/// rounding level (below d·ε·λ_max, including negative ones) count as 0, so rank-deficient
/// covariances from few samples give a self-distance of ~1e-10, not ~1e-3. This stays finite
/// where `scipy.linalg.sqrtm` needs pytorch-fid's 1e-6·I fallback.
pub fn frechet_distance(mu1: &Tensor, sigma1: &Tensor, mu2: &Tensor, sigma2: &Tensor) -> Result<f64> {
    let f64_cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    let sigma1 = symmetric(&f64_cpu(sigma1));
    let root1 = sqrt_psd(&sigma1);
    frechet_with_root(&f64_cpu(mu1), &sigma1, &root1, mu2, sigma2)
}

fn symmetric(s: &Tensor) -> Tensor {
    (s + s.tr()) * 0.5
}

/// [`frechet_distance`] with √Σ₁ given (Float64 on the CPU, Σ₁ symmetric).
fn frechet_with_root(mu1: &Tensor, sigma1: &Tensor, root1: &Tensor, mu2: &Tensor, sigma2: &Tensor) -> Result<f64> {
    let f64_cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    let (mu2, sigma2) = (f64_cpu(mu2), symmetric(&f64_cpu(sigma2)));
    let d = mu1.size();
    ensure!(d.len() == 1 && mu2.size() == d, "mu shapes differ or are not 1-d: {d:?} vs {:?}", mu2.size());
    ensure!(sigma1.size() == [d[0], d[0]] && sigma2.size() == [d[0], d[0]], "sigma shapes {:?} and {:?} do not match mu {d:?}", sigma1.size(), sigma2.size());
    let diff = mu1 - &mu2;
    let mean_term = diff.dot(&diff).double_value(&[]);
    let trace_term = (sigma1.trace() + sigma2.trace()).double_value(&[]);
    let m = symmetric(&root1.matmul(&sigma2).matmul(root1));
    let cross = trace_sqrt_psd(&m);
    let fid = mean_term + trace_term - 2.0 * cross;
    ensure!(fid.is_finite(), "the Fréchet distance is not finite (non-finite statistics?)");
    Ok(fid)
}

/// Reference statistics with √Σ computed once (one symmetric eigendecomposition, on first use),
/// so that each sample set scored against them costs one eigenvalue problem instead of two.
#[derive(Debug)]
pub struct RootedStats {
    pub stats: GaussianStats,
    root: std::cell::OnceCell<Tensor>,
}

impl RootedStats {
    pub fn new(stats: GaussianStats) -> Self {
        let sigma = symmetric(&stats.sigma);
        Self { stats: GaussianStats { mu: stats.mu, sigma }, root: std::cell::OnceCell::new() }
    }

    /// The Fréchet distance between these statistics and `other` (see [`frechet_distance`]).
    pub fn frechet_distance(&self, other: &GaussianStats) -> Result<f64> {
        let root = self.root.get_or_init(|| sqrt_psd(&self.stats.sigma));
        frechet_with_root(&self.stats.mu, &self.stats.sigma, root, &other.mu, &other.sigma)
    }
}
