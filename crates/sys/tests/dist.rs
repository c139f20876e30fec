//! c10d process groups across real processes. The multi-rank tests start this test binary again as
//! the ranks: `<exe> --exact worker` with FLOWMAP_DIST_SCENARIO set (and RANK, WORLD_SIZE,
//! MASTER_ADDR, MASTER_PORT, or torchrun's variables). Without FLOWMAP_DIST_SCENARIO `worker` does
//! nothing. Every child runs in its own process group and is killed after CHILD_LIMIT, so a hang
//! fails the test instead of hanging CI.
use flowmap_sys::dist::{Backend, DistEnv, ProcessGroup};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const SCENARIO: &str = "FLOWMAP_DIST_SCENARIO";
const CHILD_LIMIT: Duration = Duration::from_secs(30);
/// The timeout given to ProcessGroup::init in the workers (store, rendezvous, collectives).
const TIMEOUT: Duration = Duration::from_secs(8);

/// The multi-process tests run one at a time: on two cores, timing tests must not compete.
static SERIAL: Mutex<()> = Mutex::new(());
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The worker: one rank
// ---------------------------------------------------------------------------------------------

#[test]
fn worker() {
    let Ok(scenario) = std::env::var(SCENARIO) else { return };
    // Also a limit from inside: torchrun's workers run in their own sessions, out of reach of the
    // parent's kill, and a stray rank would keep the output pipe (and so the parent) waiting.
    std::thread::spawn(|| {
        std::thread::sleep(CHILD_LIMIT);
        eprintln!("worker: still running after {CHILD_LIMIT:?}, exiting");
        std::process::exit(124);
    });
    if scenario == "sleep" {
        std::thread::sleep(Duration::from_secs(600));
    }
    let env = DistEnv::from_env().expect("reading the rank's variables").expect("a world of more than one");
    if std::env::var("FLOWMAP_DIST_EXPECT_AGENT_STORE").is_ok() {
        assert!(env.agent_store, "torchrun sets TORCHELASTIC_USE_AGENT_STORE=True: {env:?}");
    }
    match scenario.as_str() {
        "collectives" => collectives(&env),
        "peer_exits" => peer_exits(&env),
        "hung_peer" => hung_peer(&env),
        other => panic!("unknown scenario {other}"),
    }
    println!("rank {} done", env.rank);
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t).unwrap()
}
fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t).unwrap()
}
fn i64s(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t).unwrap()
}

fn collectives(env: &DistEnv) {
    let pg = ProcessGroup::init(env, Backend::Gloo, TIMEOUT).expect("init");
    let (rank, world) = (pg.rank(), pg.world_size());
    assert_eq!((rank, world), (env.rank, env.world_size));
    assert_eq!(world, 2, "the scenarios are written for two ranks");
    let r = rank as i64;

    // Sums: rank r holds (r + 1) * values, so the sum is 3 * values; all exact in each dtype.
    let mut a = Tensor::from_slice(&[1.0f32, -2.5, 0.125, 1e6]) * (r + 1) as f64;
    pg.all_reduce_sum(&mut a).unwrap();
    assert_eq!(f32s(&a), vec![3.0, -7.5, 0.375, 3e6]);
    // A large buffer (chunked by the ring algorithm); integers below 2^24 are exact in float32.
    let n = 1_000_003;
    let mut big = Tensor::arange(n, (Kind::Float, Device::Cpu)) * (r + 1) as f64;
    pg.all_reduce_sum(&mut big).unwrap();
    let want = Tensor::arange(n, (Kind::Float, Device::Cpu)) * 3.0;
    assert!(big.equal(&want), "large float32 sum differs");
    let mut d = Tensor::from_slice(&[0.1f64, 1e-300, -3.0]) * (r + 1) as f64;
    pg.all_reduce_sum(&mut d).unwrap();
    assert_eq!(f64s(&d), vec![0.1 + 0.2, 1e-300 + 2e-300, -9.0]);
    // int64 beyond 2^53: no detour through floating point.
    let mut i = Tensor::from_slice(&[(1i64 << 60) + r, -7 * (r + 1), i64::from(rank == 1)]);
    pg.all_reduce_sum(&mut i).unwrap();
    assert_eq!(i64s(&i), vec![(1i64 << 61) + 1, -21, 1]);

    // Maxima: each rank wins somewhere.
    let mut m = Tensor::from_slice(&[r as f32, -(r as f32), 0.5 * r as f32 - 0.25]);
    pg.all_reduce_max(&mut m).unwrap();
    assert_eq!(f32s(&m), vec![1.0, 0.0, 0.25]);
    let mut md = Tensor::from_slice(&[f64::from(rank as u8) * 1e300, -1e-300 * (r + 1) as f64]);
    pg.all_reduce_max(&mut md).unwrap();
    assert_eq!(f64s(&md), vec![1e300, -1e-300]);
    let mut mi = Tensor::from_slice(&[(1i64 << 62) + r, -r, i64::MIN + r]);
    pg.all_reduce_max(&mut mi).unwrap();
    assert_eq!(i64s(&mi), vec![(1i64 << 62) + 1, 0, i64::MIN + 1]);

    // Broadcast from rank 1, float32 (2-D) and int64.
    let mut b = Tensor::full([2, 3], r as f64 + 0.5, (Kind::Float, Device::Cpu));
    pg.broadcast(&mut b, 1).unwrap();
    assert_eq!(f32s(&b.view([-1])), vec![1.5; 6]);
    let mut bi = Tensor::from_slice(&[r * 1000, 42 + r]);
    pg.broadcast(&mut bi, 1).unwrap();
    assert_eq!(i64s(&bi), vec![1000, 43]);
    assert!(pg.broadcast(&mut bi, 2).unwrap_err().0.contains("there is no rank 2"));

    // All-gather, indexed by rank, shape kept; a non-contiguous input is gathered as its values.
    let g = Tensor::from_slice(&[10.0 * r as f32, 10.0 * r as f32 + 1.0, -(r as f32)]).view([3, 1]);
    let all = pg.all_gather(&g).unwrap();
    assert_eq!(all.len(), 2);
    for (k, t) in all.iter().enumerate() {
        assert_eq!(t.size(), vec![3, 1]);
        assert_eq!(f32s(&t.view([-1])), vec![10.0 * k as f32, 10.0 * k as f32 + 1.0, -(k as f32)]);
    }
    let gi = Tensor::from_slice(&[r, r + 100, r + 200, r + 300]).view([2, 2]).tr();
    let all = pg.all_gather(&gi).unwrap(); // gi = [[r, r + 200], [r + 100, r + 300]]
    assert_eq!(all[0].size(), vec![2, 2]);
    assert_eq!(i64s(&all[0].contiguous().view([-1])), vec![0, 200, 100, 300]);
    assert_eq!(i64s(&all[1].contiguous().view([-1])), vec![1, 201, 101, 301]);

    pg.barrier().unwrap();

    // A non-contiguous tensor is refused before any communication, with a message naming the rank.
    let mut nc = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).tr();
    let err = pg.all_reduce_sum(&mut nc).unwrap_err().0;
    assert!(err.contains(&format!("rank {rank} of 2: all_reduce_sum of 6 float32 values")) && err.contains("contiguous"), "{err}");

    // A second group alongside the first: the same store, another prefix; both keep working.
    let pg2 = ProcessGroup::init(env, Backend::Gloo, TIMEOUT).expect("second group");
    let mut x = Tensor::from_slice(&[r + 1]);
    let mut y = Tensor::from_slice(&[(r + 1) as f32]);
    pg2.all_reduce_sum(&mut x).unwrap();
    pg.all_reduce_max(&mut y).unwrap();
    assert_eq!((i64s(&x), f32s(&y)), (vec![3], vec![2.0]));
    drop(pg2);
    pg.barrier().unwrap();
}

/// Rank `victim` leaves (std::process::exit, so nothing is shut down) right after init; the other
/// rank's all_reduce must fail within the timeout and name it.
fn peer_exits(env: &DistEnv) {
    let victim: usize = std::env::var("FLOWMAP_DIST_VICTIM").unwrap().parse().unwrap();
    let pg = ProcessGroup::init(env, Backend::Gloo, TIMEOUT).expect("init");
    pg.barrier().unwrap();
    if env.rank == victim {
        std::process::exit(3);
    }
    let mut t = Tensor::ones([1_234_567], (Kind::Float, Device::Cpu));
    let started = Instant::now();
    let err = pg.all_reduce_sum(&mut t).expect_err("all_reduce with a dead peer must fail").0;
    let took = started.elapsed();
    println!("error after {:.2} s: {err}", took.as_secs_f64());
    assert!(took < TIMEOUT + Duration::from_secs(2), "took {took:?}");
    assert!(err.starts_with(&format!("rank {} of 2: all_reduce_sum of 1234567 float32 values failed: ", env.rank)), "{err}");
    assert!(err.contains(&format!("rank {victim} (pid ")) && err.contains("is gone"), "{err}");
}

/// Rank 1 stays alive but never joins the all_reduce: rank 0 must give up after the timeout.
fn hung_peer(env: &DistEnv) {
    let timeout = Duration::from_secs(3);
    let pg = ProcessGroup::init(env, Backend::Gloo, timeout).expect("init");
    pg.barrier().unwrap();
    if env.rank == 1 {
        std::thread::sleep(timeout + Duration::from_secs(2));
        return;
    }
    let mut t = Tensor::ones([1000], (Kind::Double, Device::Cpu));
    let started = Instant::now();
    let err = pg.all_reduce_max(&mut t).expect_err("all_reduce without the peer must time out").0;
    let took = started.elapsed();
    println!("error after {:.2} s: {err}", took.as_secs_f64());
    assert!(took >= timeout - Duration::from_millis(100) && took < timeout + Duration::from_secs(3), "took {took:?}");
    assert!(err.starts_with("rank 0 of 2: all_reduce_max of 1000 float64 values failed: "), "{err}");
    assert!(err.contains("the only peer, rank 1 (pid ") && err.contains("still running"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The parent: starting ranks with a hard limit
// ---------------------------------------------------------------------------------------------

struct Finished {
    pid: u32,
    status: Option<ExitStatus>, // None: killed at the limit
    out: String,
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "---- pid {} ({}) ----\n{}", self.pid, self.status.map_or("killed after the limit".to_string(), |s| s.to_string()), self.out)
    }
}

/// Runs the commands (each in its own process group, output captured) until all exit or `limit`
/// passes; then every remaining process group is killed.
fn run_all(mut commands: Vec<Command>, limit: Duration) -> Vec<Finished> {
    let started = Instant::now();
    let mut running: Vec<_> = commands
        .iter_mut()
        .map(|c| {
            let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn().expect("spawning a rank");
            let readers = [child.stdout.take().map(|mut s| read_all(move |b| s.read_to_end(b))), child.stderr.take().map(|mut s| read_all(move |b| s.read_to_end(b)))];
            (child, readers, None::<ExitStatus>)
        })
        .collect();
    // Reaped as soon as they exit, so a dead rank is never left as a zombie.
    while running.iter().any(|(_, _, s)| s.is_none()) && started.elapsed() < limit {
        for (child, _, status) in running.iter_mut().filter(|(_, _, s)| s.is_none()) {
            *status = child.try_wait().expect("waiting for a rank");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    running
        .into_iter()
        .map(|(mut child, readers, status)| {
            if status.is_none() {
                // SIGTERM first: torchrun then stops its workers (they run in sessions of their own).
                let group = -(child.id() as libc::pid_t);
                // SAFETY: signals the process group this child leads (process_group(0) above).
                unsafe { libc::kill(group, libc::SIGTERM) };
                let term = Instant::now();
                while child.try_wait().ok().flatten().is_none() && term.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                unsafe { libc::kill(group, libc::SIGKILL) };
                let _ = child.wait();
            }
            let out = readers.into_iter().flatten().map(|r| r.join().unwrap()).collect::<Vec<_>>().join("\n---- stderr ----\n");
            Finished { pid: child.id(), status, out }
        })
        .collect()
}

fn read_all(f: impl FnOnce(&mut Vec<u8>) -> std::io::Result<usize> + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = f(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// This binary as rank `rank` of `world` running `scenario`, with plain variables.
fn rank_command(scenario: &str, rank: usize, world: usize, port: u16, extra: &[(&str, String)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "worker", "--nocapture", "--test-threads=1"]);
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID"] {
        c.env_remove(var);
    }
    c.env(SCENARIO, scenario).env("RANK", rank.to_string()).env("WORLD_SIZE", world.to_string()).env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

fn run_ranks(scenario: &str, extra: &[(&str, String)]) -> Vec<Finished> {
    let port = free_port();
    run_all((0..2).map(|r| rank_command(scenario, r, 2, port, extra)).collect(), CHILD_LIMIT)
}

/// The worker's "error after ..." line (libtest prints "test worker ... " before it).
fn error_line(out: &str) -> &str {
    out.lines().find_map(|l| l.find("error after").map(|i| &l[i..])).unwrap_or("(no error line)")
}

fn all_output(ranks: &[Finished]) -> String {
    ranks.iter().map(|f| f.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Multi-process tests
// ---------------------------------------------------------------------------------------------

#[test]
fn two_ranks_sum_max_broadcast_gather_barrier() {
    let _g = serial();
    let started = Instant::now();
    let ranks = run_ranks("collectives", &[]);
    assert!(ranks.iter().all(|f| f.status.is_some_and(|s| s.success())), "{}", all_output(&ranks));
    for (r, f) in ranks.iter().enumerate() {
        assert!(f.out.contains(&format!("rank {r} done")), "{}", all_output(&ranks));
    }
    println!("two ranks, all collectives: {:.2} s", started.elapsed().as_secs_f64());
}

fn peer_exit_is_named(victim: usize) {
    let _g = serial();
    let started = Instant::now();
    let ranks = run_ranks("peer_exits", &[("FLOWMAP_DIST_VICTIM", victim.to_string())]);
    let survivor = 1 - victim;
    let text = all_output(&ranks);
    assert_eq!(ranks[victim].status.and_then(|s| s.code()), Some(3), "{text}");
    assert!(ranks[survivor].status.is_some_and(|s| s.success()), "{text}");
    // The survivor's error names the victim by the pid this test saw.
    assert!(ranks[survivor].out.contains(&format!("rank {victim} (pid {} on host ", ranks[victim].pid)), "{text}");
    println!("{}", error_line(&ranks[survivor].out));
    println!("peer exit (victim rank {victim}): {:.2} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_rank_that_exits_is_named_by_the_other() {
    peer_exit_is_named(1);
}

#[test]
fn rank_zero_exiting_is_named_too() {
    // Rank 0 ran the store server; the collective does not need it any more.
    peer_exit_is_named(0);
}

#[test]
fn a_hung_peer_gives_a_timeout_error_not_a_hang() {
    let _g = serial();
    let started = Instant::now();
    let ranks = run_ranks("hung_peer", &[]);
    assert!(ranks.iter().all(|f| f.status.is_some_and(|s| s.success())), "{}", all_output(&ranks));
    println!("{}", error_line(&ranks[0].out));
    println!("hung peer: {:.2} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_hung_rank_is_killed_at_the_limit() {
    let _g = serial();
    let started = Instant::now();
    let port = free_port();
    let ranks = run_all(vec![rank_command("sleep", 0, 2, port, &[])], Duration::from_secs(2));
    assert!(ranks[0].status.is_none(), "{}", all_output(&ranks));
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

/// The venv's torchrun (scripts/setup.sh: $FLOWMAP_VENV, else $FLOWMAP_CACHE/venv-torch-2.11.0).
fn torchrun() -> Option<std::path::PathBuf> {
    let venv = std::env::var_os("FLOWMAP_VENV").map(std::path::PathBuf::from).or_else(|| {
        let cache = std::env::var_os("FLOWMAP_CACHE").map(std::path::PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/flowmap")))?;
        Some(cache.join("venv-torch-2.11.0"))
    })?;
    Some(venv.join("bin/torchrun")).filter(|p| p.exists())
}

#[test]
fn the_worker_runs_under_torchrun() {
    let Some(torchrun) = torchrun() else {
        println!("SKIPPED: no torchrun in the venv (FLOWMAP_VENV / FLOWMAP_CACHE); run `make setup`");
        return;
    };
    let _g = serial();
    let started = Instant::now();
    let mut c = Command::new(torchrun);
    c.args(["--no-python", "--standalone", "--nproc-per-node=2"]).arg(std::env::current_exe().unwrap()).args(["--exact", "worker", "--nocapture", "--test-threads=1"]);
    for var in ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"] {
        c.env_remove(var);
    }
    c.env(SCENARIO, "collectives").env("FLOWMAP_DIST_EXPECT_AGENT_STORE", "1").env("OMP_NUM_THREADS", "1");
    let run = run_all(vec![c], CHILD_LIMIT).pop().unwrap();
    assert!(run.status.is_some_and(|s| s.success()), "{run}");
    for r in 0..2 {
        assert!(run.out.contains(&format!("rank {r} done")), "{run}");
    }
    println!("torchrun, two ranks: {:.2} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// In-process tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_world_of_one_works_in_process() {
    let _g = serial();
    let env = DistEnv { rank: 0, world_size: 1, local_rank: 0, local_world_size: 1, master_addr: "127.0.0.1".into(), master_port: free_port(), agent_store: false, restart_count: 0 };
    let pg = ProcessGroup::init(&env, Backend::Gloo, Duration::from_secs(5)).unwrap();
    let mut t = Tensor::from_slice(&[1.5f32, -2.0]);
    pg.all_reduce_sum(&mut t).unwrap();
    pg.all_reduce_max(&mut t).unwrap();
    pg.broadcast(&mut t, 0).unwrap();
    assert_eq!(f32s(&t), vec![1.5, -2.0]);
    let all = pg.all_gather(&t).unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].equal(&t));
    pg.barrier().unwrap();
    // The group may move to another thread.
    std::thread::spawn(move || pg.barrier().unwrap()).join().unwrap();
}

#[test]
fn nccl_without_a_gpu_is_an_error_not_a_crash() {
    let _g = serial();
    let env = DistEnv { rank: 0, world_size: 1, local_rank: 0, local_world_size: 1, master_addr: "127.0.0.1".into(), master_port: free_port(), agent_store: false, restart_count: 0 };
    println!("NCCL compiled: {} ({})", Backend::Nccl.compiled(), flowmap_sys::dist::NCCL_BUILD);
    match ProcessGroup::init(&env, Backend::Nccl, Duration::from_secs(5)) {
        Err(e) if !Backend::Nccl.compiled() => assert!(e.0.contains("flowmap-sys was built without NCCL headers: "), "{e}"),
        Err(e) => {
            assert!(!tch::Cuda::is_available(), "NCCL failed with a GPU present: {e}");
            assert!(e.0.starts_with("rank 0 of 1: joining the Nccl process group"), "{e}");
            println!("as expected without a GPU: {e}");
        }
        Ok(pg) => {
            assert!(tch::Cuda::is_available(), "NCCL group without a GPU");
            let mut t = Tensor::from_slice(&[1.0f32, 2.0]).to_device(Device::Cuda(0));
            pg.all_reduce_sum(&mut t).unwrap();
            pg.all_reduce_max(&mut t).unwrap();
            pg.broadcast(&mut t, 0).unwrap();
            assert_eq!(f32s(&t.to_device(Device::Cpu)), vec![1.0, 2.0]);
            assert!(pg.all_gather(&t).unwrap()[0].to_device(Device::Cpu).equal(&t.to_device(Device::Cpu)));
            pg.barrier().unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DistEnv parsing (a map instead of the process environment)
// ---------------------------------------------------------------------------------------------

fn parse(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, String> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    DistEnv::from_lookup(|k| map.get(k).cloned()).map_err(|e| e.0)
}

fn parse_err(vars: &[(&str, &str)]) -> String {
    parse(vars).expect_err("should be rejected")
}

const MASTER: [(&str, &str); 2] = [("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")];

#[test]
fn env_without_variables_or_with_a_world_of_one_is_none() {
    assert_eq!(parse(&[]), Ok(None));
    assert_eq!(parse(&[("LOCAL_RANK", "0"), ("MASTER_ADDR", "x")]), Ok(None));
    assert_eq!(parse(&[("RANK", "0"), ("WORLD_SIZE", "1")]), Ok(None), "no MASTER_ADDR needed for one process");
    assert_eq!(parse(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]), Ok(None));
}

#[test]
fn env_from_torchrun_variables() {
    let env = parse(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", " node7 "), ("MASTER_PORT", "29400"), ("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "2")])
        .unwrap()
        .unwrap();
    assert_eq!(env, DistEnv { rank: 3, world_size: 8, local_rank: 1, local_world_size: 2, master_addr: "node7".into(), master_port: 29400, agent_store: true, restart_count: 2 });
    // Plain variables: one host assumed, rank 0 serves the store.
    let env = parse(&[("RANK", "1"), ("WORLD_SIZE", "2"), MASTER[0], MASTER[1]]).unwrap().unwrap();
    assert_eq!((env.local_rank, env.local_world_size, env.agent_store, env.restart_count), (1, 2, false, 0));
    let env = parse(&[("RANK", "1"), ("WORLD_SIZE", "2"), MASTER[0], MASTER[1], ("TORCHELASTIC_USE_AGENT_STORE", "False")]).unwrap().unwrap();
    assert!(!env.agent_store);
}

#[test]
fn env_from_slurm_variables() {
    let env = parse(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS_PER_NODE", "4"), MASTER[0], MASTER[1]]).unwrap().unwrap();
    assert_eq!((env.rank, env.world_size, env.local_rank, env.local_world_size, env.agent_store), (5, 8, 1, 4, false));
    let env = parse(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "0"), ("SLURM_TASKS_PER_NODE", "2(x2)"), MASTER[0], MASTER[1]]).unwrap().unwrap();
    assert_eq!(env.local_world_size, 2);
    // torchrun's variables win over Slurm's (torchrun launched by srun).
    let env = parse(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("RANK", "1"), ("WORLD_SIZE", "2"), MASTER[0], MASTER[1]]).unwrap().unwrap();
    assert_eq!((env.rank, env.world_size), (1, 2));
}

#[test]
fn env_errors_name_the_variable_and_value() {
    let e = parse_err(&[("RANK", "2"), ("WORLD_SIZE", "2"), MASTER[0], MASTER[1]]);
    assert!(e.contains("RANK=2") && e.contains("WORLD_SIZE=2"), "{e}");
    let e = parse_err(&[("RANK", "one"), ("WORLD_SIZE", "2"), MASTER[0], MASTER[1]]);
    assert!(e.contains("RANK=\"one\""), "{e}");
    let e = parse_err(&[("RANK", "0"), ("WORLD_SIZE", "-2"), MASTER[0], MASTER[1]]);
    assert!(e.contains("WORLD_SIZE=\"-2\""), "{e}");
    let e = parse_err(&[("RANK", "0"), ("WORLD_SIZE", "0")]);
    assert!(e.contains("WORLD_SIZE=0"), "{e}");
    let e = parse_err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29500")]);
    assert!(e.contains("MASTER_ADDR is not set") && e.contains("WORLD_SIZE=2"), "{e}");
    let e = parse_err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]);
    assert!(e.contains("MASTER_PORT is not set"), "{e}");
    let e = parse_err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")]);
    assert!(e.contains("MASTER_PORT=\"70000\""), "{e}");
    let e = parse_err(&[("WORLD_SIZE", "2"), MASTER[0], MASTER[1]]);
    assert!(e.contains("RANK is not set"), "{e}");
    let e = parse_err(&[("RANK", "1"), MASTER[0], MASTER[1]]);
    assert!(e.contains("WORLD_SIZE is not set"), "{e}");
    let e = parse_err(&[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "2"), ("LOCAL_WORLD_SIZE", "2"), MASTER[0], MASTER[1]]);
    assert!(e.contains("LOCAL_RANK=2") && e.contains("LOCAL_WORLD_SIZE=2"), "{e}");
    let e = parse_err(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_USE_AGENT_STORE", "yes"), MASTER[0], MASTER[1]]);
    assert!(e.contains("TORCHELASTIC_USE_AGENT_STORE=\"yes\""), "{e}");
    let e = parse_err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0"), ("SLURM_NTASKS_PER_NODE", "2")]);
    assert!(e.contains("MASTER_ADDR is not set") && e.contains("SLURM_NTASKS=2"), "{e}");
    let e = parse_err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_NTASKS_PER_NODE", "2"), MASTER[0], MASTER[1]]);
    assert!(e.contains("SLURM_LOCALID is not set"), "{e}");
    let e = parse_err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "3"), ("SLURM_LOCALID", "0"), ("SLURM_TASKS_PER_NODE", "2,1"), MASTER[0], MASTER[1]]);
    assert!(e.contains("SLURM_TASKS_PER_NODE=\"2,1\""), "{e}");
    let e = parse_err(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")]);
    assert!(e.contains("SLURM_PROCID=4 is not below SLURM_NTASKS=4"), "{e}");
}
