// c10d process groups driven from Rust: libtorch's own TCPStore, PrefixStore, ProcessGroupGloo (CPU
// tensors) and, when compiled with USE_C10D_NCCL, ProcessGroupNCCL (CUDA tensors). Same error style
// as glue.cpp: every function catches C++ exceptions and returns a malloc'd message (nullptr on
// success), so nothing unwinds into Rust.
//
// Build (crates/sys/build.rs): -DUSE_C10D_GLOO with the gloo headers of Debian's libgloo-dev (the
// wheel ships none; gloo's code is inside libtorch_cpu.so); -DUSE_C10D_NCCL only when the NCCL and
// CUDA headers are found (ProcessGroupNCCL's code is inside libtorch_cuda.so).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace {
char *dist_message(const char *what) {
  size_t n = std::strlen(what);
  char *out = static_cast<char *>(std::malloc(n + 1));
  if (out) std::memcpy(out, what, n + 1);
  return out;
}

// One TCPStore per (address, port, role) while any group of this process uses it: a rank-0 server
// cannot bind the port twice, so groups created while another lives share the connection and are
// kept apart by their PrefixStore.
std::mutex stores_mutex;
std::map<std::string, c10::weak_intrusive_ptr<c10d::Store>> stores;

c10::intrusive_ptr<c10d::Store> shared_tcp_store(const std::string &host, int port, bool server, int world,
                                                 std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(stores_mutex);
  std::string key = host + ":" + std::to_string(port) + (server ? ":server" : ":client");
  auto it = stores.find(key);
  if (it != stores.end()) {
    if (auto alive = it->second.lock()) return alive;
  }
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = server;
  if (server) opts.numWorkers = static_cast<std::size_t>(world);
  // waitWorkers = true hangs every rank until the timeout with plain variables (toolchain.md);
  // the ranks meet in the rank-info exchange below instead.
  opts.waitWorkers = false;
  opts.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(host, opts);
  stores.insert_or_assign(key, c10::weak_intrusive_ptr<c10d::Store>(store));
  return store;
}

std::string this_host() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "unknown-host";
  return buf;
}

std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices() {
  // As torch.distributed does: GLOO_SOCKET_IFNAME (comma-separated interfaces) when set, otherwise the
  // address this host's name resolves to (loopback if it does not resolve).
  std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
  const char *ifnames = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifnames && *ifnames) {
    std::stringstream list(ifnames);
    std::string name;
    while (std::getline(list, name, ','))
      if (!name.empty()) devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
  }
  if (devices.empty()) devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return devices;
}
}  // namespace

#define DIST_GUARD(...)                               \
  try {                                               \
    __VA_ARGS__;                                      \
    return nullptr;                                   \
  } catch (const c10::Error &e) {                     \
    return dist_message(e.what_without_backtrace());  \
  } catch (const std::exception &e) {                 \
    return dist_message(e.what());                    \
  } catch (...) {                                     \
    return dist_message("unknown C++ exception");     \
  }

struct flowmap_pg {
  c10::intrusive_ptr<c10d::Store> store;  // the group's PrefixStore over the shared TCPStore
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  std::vector<std::string> peer_hosts;
  std::vector<int64_t> peer_pids;
  bool failed = false;

  // Runs a collective and waits for it; a failure marks the group so Drop aborts instead of shutting down.
  void run(const std::function<c10::intrusive_ptr<c10d::Work>()> &start) {
    try {
      auto work = start();
      try {
        work->wait(timeout);
      } catch (const c10::Error &e) {
        if (work->isCompleted()) throw;
        throw std::runtime_error("not done within " + std::to_string(timeout.count()) + " ms (" + e.what_without_backtrace() + ")");
      }
    } catch (...) {
      failed = true;
      throw;
    }
  }
};

extern "C" {

// 1 when ProcessGroupNCCL support was compiled in.
int flowmap_dist_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// backend: 0 Gloo, 1 NCCL. agent_store: connect as a client to the store torchrun's agent runs;
// otherwise rank 0 runs the server. prefix: this group's key prefix (distinct per group).
char *flowmap_pg_new(const char *master_addr, int port, int rank, int world, bool agent_store, int backend,
                     int64_t timeout_ms, const char *prefix, flowmap_pg **out) {
  DIST_GUARD(
      *out = nullptr; auto timeout = std::chrono::milliseconds(timeout_ms);
      auto tcp = shared_tcp_store(master_addr, port, !agent_store && rank == 0, world, timeout);
      auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, tcp);
      auto pg = std::make_unique<flowmap_pg>(); pg->store = store; pg->timeout = timeout;

      // Every rank publishes "<pid> <hostname>", so a failed collective can name a rank that died.
      // Reading them all is also where the ranks first meet (get waits up to the store's timeout).
      std::string me = std::to_string(static_cast<long long>(getpid())) + " " + this_host();
      store->set("flowmap/rank/" + std::to_string(rank), std::vector<uint8_t>(me.begin(), me.end()));
      for (int r = 0; r < world; ++r) {
        std::vector<uint8_t> v;
        try {
          v = store->get("flowmap/rank/" + std::to_string(r));
        } catch (const std::exception &e) {
          throw std::runtime_error("rank " + std::to_string(r) + " did not join within " + std::to_string(timeout_ms) +
                                   " ms (" + e.what() + ")");
        }
        std::string s(v.begin(), v.end());
        auto space = s.find(' ');
        pg->peer_pids.push_back(std::stoll(s.substr(0, space)));
        pg->peer_hosts.push_back(space == std::string::npos ? "" : s.substr(space + 1));
      }

      if (backend == 0) {
        auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
        opts->devices = gloo_devices();
        pg->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
      } else if (backend == 1) {
#ifdef USE_C10D_NCCL
        auto opts = c10d::ProcessGroupNCCL::Options::create();
        opts->timeout = timeout;
        pg->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
        throw std::runtime_error("flowmap-sys was built without NCCL headers (see build.rs)");
#endif
      } else {
        throw std::invalid_argument("unknown backend code " + std::to_string(backend));
      } *out = pg.release();)
}

void flowmap_pg_free(flowmap_pg *pg) {
  if (!pg) return;
  try {
    // NCCL wants an explicit end (abort after an error: a shutdown would wait for the broken comm).
    if (pg->failed)
      pg->backend->abort();
    else
      pg->backend->shutdown();
  } catch (...) {
  }
  pg->backend.reset();
  pg->store.reset();
  delete pg;
}

// The host name and pid rank `r` published at init (host_len bytes at most, NUL-terminated).
char *flowmap_pg_peer(flowmap_pg *pg, int r, char *host, int host_len, int64_t *pid) {
  DIST_GUARD(if (r < 0 || r >= static_cast<int>(pg->peer_pids.size())) throw std::out_of_range("no such rank");
             std::snprintf(host, host_len, "%s", pg->peer_hosts[r].c_str()); *pid = pg->peer_pids[r];)
}

// op: 0 sum, 1 max. In place on a contiguous tensor.
char *flowmap_pg_all_reduce(flowmap_pg *pg, at::Tensor *t, int op) {
  DIST_GUARD(c10d::AllreduceOptions opts; opts.timeout = pg->timeout;
             if (op == 0) opts.reduceOp = c10d::ReduceOp::SUM; else if (op == 1) opts.reduceOp = c10d::ReduceOp::MAX;
             else throw std::invalid_argument("unknown reduce op");
             std::vector<at::Tensor> tensors{*t}; pg->run([&] { return pg->backend->allreduce(tensors, opts); });)
}

char *flowmap_pg_broadcast(flowmap_pg *pg, at::Tensor *t, int root) {
  DIST_GUARD(c10d::BroadcastOptions opts; opts.rootRank = root; opts.timeout = pg->timeout;
             std::vector<at::Tensor> tensors{*t}; pg->run([&] { return pg->backend->broadcast(tensors, opts); });)
}

// output: a contiguous tensor of world * input.numel() elements, filled rank after rank.
char *flowmap_pg_all_gather(flowmap_pg *pg, at::Tensor *input, at::Tensor *output) {
  DIST_GUARD(c10d::AllgatherOptions opts; opts.timeout = pg->timeout; at::Tensor in = *input; at::Tensor out = *output;
             pg->run([&] { return pg->backend->_allgather_base(out, in, opts); });)
}

char *flowmap_pg_barrier(flowmap_pg *pg) {
  DIST_GUARD(c10d::BarrierOptions opts; opts.timeout = pg->timeout; pg->run([&] { return pg->backend->barrier(opts); });)
}

}  // extern "C"
