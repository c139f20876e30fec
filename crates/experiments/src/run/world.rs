//! The processes of a data-parallel job: which rank this process is, and the collectives the
//! trainer and the evaluator need, over libtorch's c10d ([`flowmap_sys::dist`]: Gloo for CPU
//! tensors, NCCL for CUDA tensors).
//!
//! A process started without the launcher's variables (RANK, WORLD_SIZE, … or Slurm's) is a world
//! of one: every collective is a no-op and nothing is initialised. `torchrun --no-python flowmap
//! train CONFIG`, `flowmap launch --nproc N -- train CONFIG` and `srun flowmap train CONFIG` all
//! set the variables.
use anyhow::{ensure, Context, Result};
use flowmap_sys::dist::{Backend, DistEnv, ProcessGroup};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tch::{nn, Device, Tensor};

/// Gradients are all-reduced in buckets of at most this many bytes (one flat buffer each), so a
/// large model does not need a second copy of all its gradients at once.
pub const BUCKET_BYTES: usize = 64 << 20;

/// Default time a collective may wait for the other ranks (`FLOWMAP_DIST_TIMEOUT_S` overrides):
/// torch.distributed's 30 minutes, as ranks wait while rank 0 alone computes a run's first
/// reference statistics (cached afterwards) or writes a checkpoint.
pub const DEFAULT_TIMEOUT_S: u64 = 1800;

/// This process's place in the job, and the process group when there is more than one.
pub struct World {
    /// c10d process groups are thread-safe, but the handle is only `Send`: one collective at a time.
    group: Option<Mutex<ProcessGroup>>,
    rank: usize,
    size: usize,
    local_rank: usize,
}

impl World {
    /// A world of one (no process group).
    pub fn single() -> Self {
        Self { group: None, rank: 0, size: 1, local_rank: 0 }
    }

    /// The world the launcher's environment describes, with the backend `device` needs (Gloo for
    /// the CPU, NCCL for CUDA). A world of one when no launcher variables are set.
    pub fn from_env(device: Device) -> Result<Self> {
        let Some(env) = DistEnv::from_env()? else { return Ok(Self::single()) };
        let backend = if device.is_cuda() { Backend::Nccl } else { Backend::Gloo };
        let timeout = timeout_from_env()?;
        tracing::info!("rank {} of {} (local rank {}), {:?} via {}:{} (timeout {} s)", env.rank, env.world_size, env.local_rank, backend, env.master_addr, env.master_port, timeout.as_secs());
        let group = ProcessGroup::init(&env, backend, timeout).with_context(|| format!("joining the process group as rank {} of {}", env.rank, env.world_size))?;
        Ok(Self { rank: env.rank, size: env.world_size, local_rank: env.local_rank, group: Some(Mutex::new(group)) })
    }

    /// This process's world, joined on first use (one process group per process, whatever asks:
    /// training, evaluation, `table`). `device` chooses the backend the first time.
    pub fn global(device: Device) -> Result<&'static World> {
        static WORLD: OnceLock<World> = OnceLock::new();
        if let Some(w) = WORLD.get() {
            return Ok(w);
        }
        let world = World::from_env(device)?;
        Ok(WORLD.get_or_init(|| world))
    }

    fn group(&self) -> Option<std::sync::MutexGuard<'_, ProcessGroup>> {
        self.group.as_ref().map(|g| g.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }
    /// Rank 0: the process that writes checkpoints, metrics, grids and logs.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
    /// The CUDA device of this rank (its local rank) in place of `cuda:0`; other devices unchanged.
    pub fn device(&self, device: Device) -> Device {
        match device {
            Device::Cuda(0) if self.size > 1 => {
                let visible = tch::Cuda::device_count().max(1) as usize;
                Device::Cuda(if self.local_rank < visible { self.local_rank } else { 0 })
            }
            d => d,
        }
    }

    /// In-place sum over the ranks.
    pub fn sum(&self, t: &mut Tensor) -> Result<()> {
        match self.group() {
            Some(g) => Ok(g.all_reduce_sum(t)?),
            None => Ok(()),
        }
    }

    /// In-place maximum over the ranks.
    pub fn max(&self, t: &mut Tensor) -> Result<()> {
        match self.group() {
            Some(g) => Ok(g.all_reduce_max(t)?),
            None => Ok(()),
        }
    }

    /// Every rank's `t` (equal shapes), indexed by rank.
    pub fn gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        match self.group() {
            Some(g) => Ok(g.all_gather(t)?),
            None => Ok(vec![t.shallow_clone()]),
        }
    }

    pub fn barrier(&self) -> Result<()> {
        match self.group() {
            Some(g) => Ok(g.barrier()?),
            None => Ok(()),
        }
    }

    /// Rank 0's `t` on every rank, in place.
    pub fn broadcast(&self, t: &mut Tensor) -> Result<()> {
        match self.group() {
            Some(g) => Ok(g.broadcast(t, 0)?),
            None => Ok(()),
        }
    }

    /// Sums `tensors` over the ranks in place, through flat buffers of at most [`BUCKET_BYTES`]
    /// (one collective per bucket, not one per tensor). Tensors of one kind and device.
    pub fn sum_flat(&self, tensors: &[Tensor]) -> Result<()> {
        if self.group.is_none() || tensors.is_empty() {
            return Ok(());
        }
        for bucket in buckets(tensors) {
            let mut flat = flatten(&bucket);
            self.sum(&mut flat)?;
            unflatten_into(&flat, &bucket);
        }
        Ok(())
    }

    /// Rank 0's values of every variable of `vs` on every rank (initial weights, so that ranks
    /// start equal whatever their own initialisation drew).
    pub fn broadcast_vars(&self, vs: &nn::VarStore) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| -> Result<()> {
            for bucket in buckets(&vars.iter().map(|(_, t)| t.detach()).collect::<Vec<_>>()) {
                let mut flat = flatten(&bucket);
                self.broadcast(&mut flat)?;
                unflatten_into(&flat, &bucket);
            }
            Ok(())
        })
    }

    /// Rank 0's `value` on every rank.
    pub fn broadcast_i64(&self, value: i64) -> Result<i64> {
        let mut t = Tensor::from_slice(&[value]).to_device(self.collective_device());
        self.broadcast(&mut t)?;
        Ok(t.int64_value(&[0]))
    }

    /// True on every rank when any rank's `flag` is true.
    pub fn any(&self, flag: bool) -> Result<bool> {
        if self.group.is_none() {
            return Ok(flag);
        }
        let mut t = Tensor::from_slice(&[flag as i64]).to_device(self.collective_device());
        self.max(&mut t)?;
        Ok(t.int64_value(&[0]) != 0)
    }

    /// Where small coordination tensors live: the backend's device (NCCL needs CUDA tensors).
    fn collective_device(&self) -> Device {
        match self.group() {
            Some(g) if g.backend() == Backend::Nccl => Device::Cuda(self.local_rank.min(tch::Cuda::device_count().max(1) as usize - 1)),
            _ => Device::Cpu,
        }
    }
}

/// One flat buffer holding `bucket`'s tensors one after another.
fn flatten(bucket: &[Tensor]) -> Tensor {
    Tensor::cat(&bucket.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0)
}

/// Copies the pieces of `flat` back into `bucket`'s tensors (in place; the inverse of [`flatten`]).
fn unflatten_into(flat: &Tensor, bucket: &[Tensor]) {
    let mut offset = 0;
    for t in bucket {
        let n = t.numel() as i64;
        let mut t = t.shallow_clone();
        t.copy_(&flat.narrow(0, offset, n).view_as(&t));
        offset += n;
    }
}

/// Consecutive groups of tensors of one kind and device, each at most [`BUCKET_BYTES`] (a larger
/// tensor is a bucket of its own).
fn buckets(tensors: &[Tensor]) -> Vec<Vec<Tensor>> {
    let mut out: Vec<Vec<Tensor>> = Vec::new();
    let mut bytes = 0;
    for t in tensors {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = out.last().is_some_and(|b| {
            let first = &b[0];
            bytes + size <= BUCKET_BYTES && first.kind() == t.kind() && first.device() == t.device()
        });
        if fits {
            out.last_mut().expect("a bucket").push(t.shallow_clone());
            bytes += size;
        } else {
            out.push(vec![t.shallow_clone()]);
            bytes = size;
        }
    }
    out
}

/// `FLOWMAP_DIST_TIMEOUT_S` (seconds a collective waits for the other ranks), default
/// [`DEFAULT_TIMEOUT_S`].
fn timeout_from_env() -> Result<Duration> {
    match std::env::var("FLOWMAP_DIST_TIMEOUT_S") {
        Ok(v) => {
            let s: u64 = v.trim().parse().with_context(|| format!("FLOWMAP_DIST_TIMEOUT_S = {v:?}: expected whole seconds"))?;
            ensure!(s >= 1, "FLOWMAP_DIST_TIMEOUT_S = {s}: must be >= 1");
            Ok(Duration::from_secs(s))
        }
        Err(_) => Ok(Duration::from_secs(DEFAULT_TIMEOUT_S)),
    }
}

/// The slice of `n` items (rows, samples) that `rank` of `size` takes: contiguous, the first
/// `n % size` ranks one more.
pub fn shard(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}
