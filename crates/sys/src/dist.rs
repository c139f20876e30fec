//! Distributed data parallelism from native code: libtorch's own c10d (TCPStore, PrefixStore,
//! ProcessGroupGloo for CPU tensors, ProcessGroupNCCL for CUDA tensors) behind `csrc/dist.cpp`.
//!
//! A process finds its place in the job with [`DistEnv::from_env`] (the variables torchrun sets, or
//! Slurm's), joins with [`ProcessGroup::init`] and then runs blocking single-tensor collectives.
//! Bucketing gradients into one flat buffer is the caller's job.
//!
//! ```no_run
//! use flowmap_sys::dist::{Backend, DistEnv, ProcessGroup};
//! # fn main() -> Result<(), flowmap_sys::dist::DistError> {
//! if let Some(env) = DistEnv::from_env()? {
//!     let pg = ProcessGroup::init(&env, Backend::Gloo, std::time::Duration::from_secs(300))?;
//!     let mut grads = tch::Tensor::ones([1024], (tch::Kind::Float, tch::Device::Cpu));
//!     pg.all_reduce_sum(&mut grads)?; // every element is now world_size
//! }
//! # Ok(()) }
//! ```
//!
//! Failures are errors, never hangs: each collective waits at most the group's timeout, and its error
//! names this rank, the world size, the operation and, when it can, the peer that died (every rank
//! publishes its host name and pid at init; peers on this host are checked with `kill(pid, 0)`).
use std::ffi::{c_char, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tch::{Kind, Tensor};

mod ffi {
    use std::ffi::c_char;
    /// The C++ group (`struct flowmap_pg` in dist.cpp): store, backend and the peers' pids.
    #[repr(C)]
    pub struct Pg {
        _private: [u8; 0],
    }
    extern "C" {
        pub fn flowmap_dist_has_nccl() -> i32;
        pub fn flowmap_pg_new(master_addr: *const c_char, port: i32, rank: i32, world: i32, agent_store: bool, backend: i32, timeout_ms: i64, prefix: *const c_char, out: *mut *mut Pg) -> *mut c_char;
        pub fn flowmap_pg_free(pg: *mut Pg);
        pub fn flowmap_pg_peer(pg: *mut Pg, rank: i32, host: *mut c_char, host_len: i32, pid: *mut i64) -> *mut c_char;
        pub fn flowmap_pg_all_reduce(pg: *mut Pg, t: *mut torch_sys::C_tensor, op: i32) -> *mut c_char;
        pub fn flowmap_pg_broadcast(pg: *mut Pg, t: *mut torch_sys::C_tensor, root: i32) -> *mut c_char;
        pub fn flowmap_pg_all_gather(pg: *mut Pg, input: *mut torch_sys::C_tensor, output: *mut torch_sys::C_tensor) -> *mut c_char;
        pub fn flowmap_pg_barrier(pg: *mut Pg) -> *mut c_char;
    }
}

/// A failed set-up or collective; the message says which rank, what and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DistError(pub String);

fn c_result(msg: *mut c_char) -> Result<(), String> {
    crate::check(msg).map_err(|e| e.0)
}

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors, over TCP.
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors (one GPU per rank).
    Nccl,
}

impl Backend {
    /// Whether this build of flowmap-sys can create the backend (NCCL needs headers at build time).
    pub fn compiled(self) -> bool {
        match self {
            Backend::Gloo => true,
            Backend::Nccl => (unsafe { ffi::flowmap_dist_has_nccl() }) != 0,
        }
    }
    fn code(self) -> i32 {
        match self {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        }
    }
}

/// What build.rs found about the NCCL headers (the reason when they were missing).
pub const NCCL_BUILD: &str = env!("FLOWMAP_SYS_NCCL");

/// Where a process sits in the job: read from the variables torchrun sets (RANK, WORLD_SIZE,
/// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE), with
/// Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE (and MASTER_ADDR/PORT,
/// or a clear error naming the missing variable) as a fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already runs the TCPStore at MASTER_ADDR:MASTER_PORT: every rank is a client.
    pub agent_store: bool,
    /// TORCHELASTIC_RESTART_COUNT (0 outside torchrun). Part of the store prefix, as in
    /// torch.distributed: keys of an earlier attempt in the agent's store must not be read again.
    pub restart_count: u32,
}

impl DistEnv {
    /// None when no variables are set or WORLD_SIZE=1 (a world of one: no store, no cost).
    /// Bad values (RANK >= WORLD_SIZE, non-numbers, missing MASTER_ADDR with WORLD_SIZE>1) → error naming the variable and value.
    pub fn from_env() -> Result<Option<DistEnv>, DistError> {
        Self::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// [`from_env`](Self::from_env) over any source of variables (tests pass a map).
    ///
    /// Without LOCAL_RANK / LOCAL_WORLD_SIZE (plain variables, not torchrun) all ranks are taken to
    /// be on one host: local_rank = rank, local_world_size = world_size.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, DistError> {
        let torchrun = get("RANK").is_some() || get("WORLD_SIZE").is_some();
        if !torchrun && get("SLURM_PROCID").is_none() {
            return Ok(None);
        }
        let required = |name: &str| get(name).ok_or_else(|| DistError(format!("{name} is not set (needed when {} is set)", if torchrun { "RANK or WORLD_SIZE" } else { "SLURM_PROCID" })));
        let (rank_var, world_var) = if torchrun { ("RANK", "WORLD_SIZE") } else { ("SLURM_PROCID", "SLURM_NTASKS") };
        let world_size: usize = parse(world_var, &required(world_var)?)?;
        if world_size == 0 {
            return Err(DistError(format!("{world_var}=0: a job has at least one process")));
        }
        let rank: usize = parse(rank_var, &required(rank_var)?)?;
        if rank >= world_size {
            return Err(DistError(format!("{rank_var}={rank} is not below {world_var}={world_size}")));
        }
        if world_size == 1 {
            return Ok(None);
        }
        let (local_rank, local_world_size) = if torchrun {
            let local_rank = get("LOCAL_RANK").map(|v| parse("LOCAL_RANK", &v)).transpose()?.unwrap_or(rank);
            let local_world_size = get("LOCAL_WORLD_SIZE").map(|v| parse("LOCAL_WORLD_SIZE", &v)).transpose()?.unwrap_or(world_size);
            (local_rank, local_world_size)
        } else {
            (parse("SLURM_LOCALID", &required("SLURM_LOCALID")?)?, slurm_tasks_per_node(&get)?)
        };
        let local_world_var = if torchrun { "LOCAL_WORLD_SIZE" } else { "SLURM_NTASKS_PER_NODE" };
        if local_world_size == 0 || local_world_size > world_size {
            return Err(DistError(format!("{local_world_var}={local_world_size} must be between 1 and the world size {world_size}")));
        }
        if local_rank >= local_world_size {
            return Err(DistError(format!("{}={local_rank} is not below {local_world_var}={local_world_size}", if torchrun { "LOCAL_RANK" } else { "SLURM_LOCALID" })));
        }
        let missing = |name: &str| DistError(format!("{name} is not set, but {world_var}={world_size}: every rank needs the address of rank 0's store (MASTER_ADDR, MASTER_PORT)"));
        let master_addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty()).ok_or_else(|| missing("MASTER_ADDR"))?.trim().to_string();
        let port_text = get("MASTER_PORT").ok_or_else(|| missing("MASTER_PORT"))?;
        let master_port: u16 = parse("MASTER_PORT", &port_text)?;
        if master_port == 0 {
            return Err(DistError("MASTER_PORT=\"0\" is not a usable port".into()));
        }
        let agent_store = match get("TORCHELASTIC_USE_AGENT_STORE").as_deref().map(str::trim) {
            None | Some("False" | "false" | "0" | "") => false,
            Some("True" | "true" | "1") => true,
            Some(other) => return Err(DistError(format!("TORCHELASTIC_USE_AGENT_STORE={other:?} is neither True nor False"))),
        };
        let restart_count = get("TORCHELASTIC_RESTART_COUNT").map(|v| parse("TORCHELASTIC_RESTART_COUNT", &v)).transpose()?.unwrap_or(0);
        Ok(Some(DistEnv { rank, world_size, local_rank, local_world_size, master_addr, master_port, agent_store, restart_count }))
    }
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, DistError> {
    value.trim().parse().map_err(|_| DistError(format!("{name}={value:?} is not a valid non-negative integer in range")))
}

/// SLURM_NTASKS_PER_NODE (set with --ntasks-per-node), else SLURM_TASKS_PER_NODE when it is the
/// same on every node ("4" or "4(x2)").
fn slurm_tasks_per_node(get: &impl Fn(&str) -> Option<String>) -> Result<usize, DistError> {
    if let Some(v) = get("SLURM_NTASKS_PER_NODE") {
        return parse("SLURM_NTASKS_PER_NODE", &v);
    }
    if let Some(v) = get("SLURM_TASKS_PER_NODE") {
        let uniform = v.trim().split_once('(').map_or(v.trim(), |(n, _)| n);
        if !v.contains(',') {
            if let Ok(n) = uniform.parse() {
                return Ok(n);
            }
        }
        return Err(DistError(format!("SLURM_NTASKS_PER_NODE is not set and SLURM_TASKS_PER_NODE={v:?} differs between nodes: launch with --ntasks-per-node")));
    }
    Err(DistError("SLURM_NTASKS_PER_NODE is not set (launch with srun --ntasks-per-node)".into()))
}

/// Groups made by this process so far: with the restart count, the store prefix of the next one.
/// Every rank creates its groups in the same order, so the numbers agree across ranks.
static GROUPS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
struct Peer {
    host: String,
    pid: i64,
}

/// A c10d process group (one backend, all ranks of the job). Dropping it ends the backend (abort
/// after a failure) and, on rank 0 without torchrun, the store server once no group uses it.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: std::ptr::NonNull<ffi::Pg>,
    rank: usize,
    world_size: usize,
    backend: Backend,
    peers: Vec<Peer>,
}

// SAFETY: the handle is owned by this value alone, and c10d's stores and backends may be used from
// any thread (PyTorch calls them from whichever thread runs the collective).
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the job: the store (torchrun's agent store as a client, or rank 0's own server), a
    /// PrefixStore for this group, the exchange of host names and pids, then the backend. `timeout`
    /// bounds the store, the rendezvous and every collective.
    pub fn init(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<ProcessGroup, DistError> {
        let who = format!("rank {} of {}", env.rank, env.world_size);
        if env.world_size == 0 || env.rank >= env.world_size || env.world_size > i32::MAX as usize {
            return Err(DistError(format!("{who}: not a valid place in a job")));
        }
        if !backend.compiled() {
            return Err(DistError(format!("{who}: flowmap-sys was built without NCCL headers: {NCCL_BUILD}")));
        }
        let addr = CString::new(env.master_addr.as_str()).map_err(|_| DistError(format!("{who}: MASTER_ADDR {:?} contains a NUL byte", env.master_addr)))?;
        let group = GROUPS.fetch_add(1, Ordering::SeqCst);
        let prefix = CString::new(format!("flowmap/attempt_{}/group_{group}/", env.restart_count)).expect("no NUL in a formatted prefix");
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX).max(1);
        let mut raw = std::ptr::null_mut();
        let started = std::time::Instant::now();
        c_result(unsafe { ffi::flowmap_pg_new(addr.as_ptr(), i32::from(env.master_port), env.rank as i32, env.world_size as i32, env.agent_store, backend.code(), timeout_ms, prefix.as_ptr(), &mut raw) }).map_err(|e| {
            let store = if env.agent_store {
                "torchrun's agent store"
            } else if env.rank == 0 {
                "its own store server"
            } else {
                "rank 0's store"
            };
            DistError(format!("{who}: joining the {backend:?} process group at {}:{} ({store}) failed: {e}", env.master_addr, env.master_port))
        })?;
        let raw = std::ptr::NonNull::new(raw).ok_or_else(|| DistError(format!("{who}: dist.cpp returned no group")))?;
        let mut pg = ProcessGroup { raw, rank: env.rank, world_size: env.world_size, backend, peers: Vec::with_capacity(env.world_size) };
        for r in 0..env.world_size {
            let mut host = vec![0 as c_char; 256];
            let mut pid = 0i64;
            c_result(unsafe { ffi::flowmap_pg_peer(pg.raw.as_ptr(), r as i32, host.as_mut_ptr(), host.len() as i32, &mut pid) }).map_err(|e| DistError(format!("{who}: reading rank {r}'s host and pid: {e}")))?;
            // SAFETY: snprintf wrote a NUL-terminated string into the buffer.
            let host = unsafe { CStr::from_ptr(host.as_ptr()) }.to_string_lossy().into_owned();
            pg.peers.push(Peer { host, pid });
        }
        tracing::debug!("{who}: {backend:?} process group {group} ready in {:.2} s", started.elapsed().as_secs_f64());
        Ok(pg)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Sums `t` over all ranks, in place. `t` must be contiguous, with the same shape and dtype everywhere.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        self.all_reduce(t, 0, "all_reduce_sum")
    }

    /// Element-wise maximum of `t` over all ranks, in place (contiguous, as for the sum).
    pub fn all_reduce_max(&self, t: &mut Tensor) -> Result<(), DistError> {
        self.all_reduce(t, 1, "all_reduce_max")
    }

    fn all_reduce(&self, t: &mut Tensor, op: i32, name: &str) -> Result<(), DistError> {
        let what = format!("{name} of {}", describe(t));
        self.require_contiguous(t, &what)?;
        self.collective(&what, || unsafe { ffi::flowmap_pg_all_reduce(self.raw.as_ptr(), t.as_mut_ptr(), op) })
    }

    /// Overwrites `t` on every rank with rank `root`'s `t` (contiguous, same shape and dtype everywhere).
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        let what = format!("broadcast from rank {root} of {}", describe(t));
        if root >= self.world_size {
            return Err(DistError(format!("rank {} of {}: {what}: there is no rank {root}", self.rank, self.world_size)));
        }
        self.require_contiguous(t, &what)?;
        self.collective(&what, || unsafe { ffi::flowmap_pg_broadcast(self.raw.as_ptr(), t.as_mut_ptr(), root as i32) })
    }

    /// Every rank's `t`, indexed by rank (shapes and dtypes must be equal on every rank). The results
    /// are views of one new buffer of world_size × numel elements.
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>, DistError> {
        let what = format!("all_gather of {}", describe(t));
        let input = t.contiguous().view([-1]); // (n,); no copy when already contiguous
        let mut output = Tensor::empty([self.world_size as i64 * input.numel() as i64], (input.kind(), input.device()));
        self.collective(&what, || unsafe { ffi::flowmap_pg_all_gather(self.raw.as_ptr(), input.as_ptr() as *mut torch_sys::C_tensor, output.as_mut_ptr()) })?;
        let mut shape = vec![self.world_size as i64];
        shape.extend(t.size());
        Ok(output.view(shape.as_slice()).unbind(0))
    }

    /// Returns once every rank has reached the barrier (and this rank's earlier collectives are done).
    pub fn barrier(&self) -> Result<(), DistError> {
        self.collective("barrier", || unsafe { ffi::flowmap_pg_barrier(self.raw.as_ptr()) })
    }

    fn require_contiguous(&self, t: &Tensor, what: &str) -> Result<(), DistError> {
        if t.is_contiguous() {
            Ok(())
        } else {
            Err(DistError(format!("rank {} of {}: {what}: the tensor must be contiguous (its strides are {:?})", self.rank, self.world_size, t.stride())))
        }
    }

    fn collective(&self, what: &str, run: impl FnOnce() -> *mut c_char) -> Result<(), DistError> {
        c_result(run()).map_err(|cause| DistError(format!("rank {} of {}: {what} failed: {cause}; {}", self.rank, self.world_size, self.peer_report())))
    }

    /// After a failure: which peers are gone. Only peers on this host can be checked. A dead peer's
    /// sockets close while its process is still exiting, so the check is repeated for up to a second.
    fn peer_report(&self) -> String {
        let here = &self.peers[self.rank].host;
        let others: Vec<usize> = (0..self.world_size).filter(|&r| r != self.rank).collect();
        let local: Vec<usize> = others.iter().copied().filter(|&r| &self.peers[r].host == here).collect();
        let remote: Vec<usize> = others.iter().copied().filter(|&r| &self.peers[r].host != here).collect();
        let name = |r: usize| format!("rank {r} (pid {} on host {})", self.peers[r].pid, self.peers[r].host);
        for attempt in 0..10 {
            let gone: Vec<String> = local.iter().copied().filter(|&r| !pid_alive(self.peers[r].pid)).map(|r| format!("{} is gone", name(r))).collect();
            if !gone.is_empty() {
                return gone.join(", ");
            }
            if local.is_empty() || attempt == 9 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match (others.as_slice(), remote.is_empty()) {
            ([r], true) => format!("the only peer, {}, is still running", name(*r)),
            ([r], false) => format!("the only peer, {}, is the suspect (on another host, so not checked)", name(*r)),
            (_, true) => "every peer is still running".to_string(),
            (_, false) => format!("the peers on this host are still running; ranks {remote:?} on other hosts were not checked"),
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { ffi::flowmap_pg_free(self.raw.as_ptr()) };
    }
}

/// "1234567 float32 values".
fn describe(t: &Tensor) -> String {
    let dtype = match t.kind() {
        Kind::Float => "float32".to_string(),
        Kind::Double => "float64".to_string(),
        Kind::Half => "float16".to_string(),
        Kind::BFloat16 => "bfloat16".to_string(),
        Kind::Int64 => "int64".to_string(),
        Kind::Int => "int32".to_string(),
        Kind::Int16 => "int16".to_string(),
        Kind::Int8 => "int8".to_string(),
        Kind::Uint8 => "uint8".to_string(),
        Kind::Bool => "bool".to_string(),
        other => format!("{other:?}").to_lowercase(),
    };
    format!("{} {dtype} values", t.numel())
}

/// Whether process `pid` (on this host) still runs: kill(pid, 0), and a zombie (exited, not yet
/// reaped by its parent) counts as gone.
fn pid_alive(pid: i64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return true; // never published by a live rank; nothing to say
    }
    // SAFETY: signal 0 delivers nothing; it only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        // EPERM: it exists but belongs to someone else.
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat.rsplit_once(')').is_none_or(|(_, rest)| !matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::pid_alive;

    #[test]
    fn a_zombie_counts_as_gone() {
        assert!(pid_alive(i64::from(std::process::id())));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300)); // exited, not reaped: a zombie
        assert!(!pid_alive(i64::from(child.id())));
        child.wait().unwrap();
        assert!(!pid_alive(i64::from(child.id())));
    }
}
