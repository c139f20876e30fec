// libtorch features that tch 0.24 does not bind. Every function catches C++ exceptions and returns
// them as a malloc'd message (nullptr on success), so nothing unwinds into Rust.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/headeronly/version.h>

#include <dlfcn.h>
#include <string>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace {
char *copy_message(const char *what) {
  size_t n = std::strlen(what);
  char *out = static_cast<char *>(std::malloc(n + 1));
  if (out) std::memcpy(out, what, n + 1);
  return out;
}
}  // namespace

#define GUARD(...)                                    \
  try {                                               \
    __VA_ARGS__;                                      \
    return nullptr;                                   \
  } catch (const std::exception &e) {                 \
    return copy_message(e.what());                    \
  } catch (...) {                                     \
    return copy_message("unknown C++ exception");     \
  }

extern "C" {

void flowmap_free_error(char *msg) { std::free(msg); }

// ---- forward-mode AD levels (torch/csrc/autograd/forward_grad.h) ----
char *flowmap_fwad_enter(int64_t *level) { GUARD(*level = static_cast<int64_t>(torch::autograd::ForwardADLevel::get_next_idx())) }
char *flowmap_fwad_exit(int64_t level) { GUARD(torch::autograd::ForwardADLevel::release_idx(static_cast<uint64_t>(level))) }

// ---- scaled-dot-product-attention backends (ATen/Context.h) ----
// which: 0 flash, 1 memory-efficient, 2 math, 3 cuDNN
char *flowmap_sdp_set(int which, bool on) {
  GUARD(auto &ctx = at::globalContext(); switch (which) {
    case 0: ctx.setSDPUseFlash(on); break;
    case 1: ctx.setSDPUseMemEfficient(on); break;
    case 2: ctx.setSDPUseMath(on); break;
    case 3: ctx.setSDPUseCuDNN(on); break;
    default: throw std::invalid_argument("unknown SDPA backend index");
  })
}
char *flowmap_sdp_get(int which, bool *on) {
  GUARD(auto &ctx = at::globalContext(); switch (which) {
    case 0: *on = ctx.userEnabledFlashSDP(); break;
    case 1: *on = ctx.userEnabledMemEfficientSDP(); break;
    case 2: *on = ctx.userEnabledMathSDP(); break;
    case 3: *on = ctx.userEnabledCuDNNSDP(); break;
    default: throw std::invalid_argument("unknown SDPA backend index");
  })
}

// ---- autocast (ATen/autocast_mode.h); device 0 = CPU, 1 = CUDA ----
static at::DeviceType autocast_device(int device) {
  if (device == 0) return at::kCPU;
  if (device == 1) return at::kCUDA;
  throw std::invalid_argument("autocast device must be 0 (CPU) or 1 (CUDA)");
}
char *flowmap_autocast_set(int device, bool enabled, int dtype) {
  GUARD(auto dev = autocast_device(device);
        at::autocast::set_autocast_dtype(dev, static_cast<at::ScalarType>(dtype));
        at::autocast::set_autocast_enabled(dev, enabled);
        if (!enabled) at::autocast::clear_cache();)
}
char *flowmap_autocast_get(int device, bool *enabled, int *dtype) {
  GUARD(auto dev = autocast_device(device); *enabled = at::autocast::is_autocast_enabled(dev);
        *dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));)
}

// ---- TF32 and determinism (ATen/Context.h) ----
char *flowmap_tf32_set(bool on) {
  GUARD(at::globalContext().setAllowTF32CuBLAS(on); at::globalContext().setAllowTF32CuDNN(on);)
}
char *flowmap_tf32_get(bool *on) { GUARD(*on = at::globalContext().allowTF32CuBLAS()) }
char *flowmap_deterministic_set(bool on, bool warn_only) {
  GUARD(at::globalContext().setDeterministicAlgorithms(on, warn_only))
}
char *flowmap_deterministic_get(bool *on) { GUARD(*on = at::globalContext().deterministicAlgorithms()) }

// ---- libtorch's fused multi-tensor AdamW (at::_fused_adamw_), CPU and CUDA ----
// params, grads, m, v, steps: arrays of n at::Tensor pointers (tch's C_tensor is at::Tensor).
char *flowmap_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **m, at::Tensor **v,
                          at::Tensor **steps, int64_t n, double lr, double beta1, double beta2,
                          double weight_decay, double eps) {
  GUARD(std::vector<at::Tensor> p, g, a, b, s; for (int64_t i = 0; i < n; ++i) {
    p.push_back(*params[i]);
    g.push_back(*grads[i]);
    a.push_back(*m[i]);
    b.push_back(*v[i]);
    s.push_back(*steps[i]);
  } at::NoGradGuard no_grad;
        // As torch.optim.AdamW(fused=True) does: the kernel reads the already-incremented step.
        at::_foreach_add_(s, 1);
        at::_fused_adamw_(p, g, a, b, {}, s, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                          /*maximize=*/false);)
}

// ---- build and device facts for `flowmap doctor` ----
// The libtorch version of the headers this glue was compiled against ("2.11.0").
char *flowmap_torch_version(char *buf, int len) {
  GUARD(std::snprintf(buf, len, "%d.%d.%d", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH))
}
// The path of the libtorch_cpu.so actually loaded by this process.
char *flowmap_libtorch_path(char *buf, int len) {
  GUARD(Dl_info info; void *sym = reinterpret_cast<void *>(&at::globalContext);
        if (!dladdr(sym, &info) || !info.dli_fname) throw std::runtime_error("dladdr failed");
        std::snprintf(buf, len, "%s", info.dli_fname);)
}
// A CUDA device's name from NVML (the driver's libnvidia-ml.so.1, loaded on demand).
char *flowmap_cuda_device_name(int index, char *buf, int len) {
  GUARD(void *nvml = dlopen("libnvidia-ml.so.1", RTLD_LAZY);
        if (!nvml) throw std::runtime_error("libnvidia-ml.so.1 not found (no NVIDIA driver?)");
        using init_t = int (*)();
        using handle_t = int (*)(unsigned, void **);
        using name_t = int (*)(void *, char *, unsigned);
        auto init = reinterpret_cast<init_t>(dlsym(nvml, "nvmlInit_v2"));
        auto by_index = reinterpret_cast<handle_t>(dlsym(nvml, "nvmlDeviceGetHandleByIndex_v2"));
        auto get_name = reinterpret_cast<name_t>(dlsym(nvml, "nvmlDeviceGetName"));
        void *dev = nullptr;
        if (!init || !by_index || !get_name || init() != 0 || by_index(index, &dev) != 0 || get_name(dev, buf, len) != 0)
          throw std::runtime_error("NVML could not name device " + std::to_string(index));)
}

// The CUDA runtime version libtorch was compiled with (CUDART_VERSION: 1000*major + 10*minor, e.g.
// 13000), or 0 when libtorch has no CUDA: a CPU-only build, or libtorch_cuda.so not loaded (its
// hooks register on load). Compile-time facts only: touches neither the driver nor a GPU.
char *flowmap_torch_cuda_version(int *version) {
  GUARD(const auto &hooks = at::detail::getCUDAHooks();
        *version = hooks.hasCUDART() ? static_cast<int>(hooks.versionCUDART()) : 0;)
}
// The newest CUDA version the installed driver supports (cuDriverGetVersion, same encoding), or 0
// when the driver library libcuda.so.1 is absent. cuDriverGetVersion needs no cuInit and no GPU.
char *flowmap_cuda_driver_version(int *version) {
  GUARD(*version = 0;
        // Not closed again: libtorch may load the same library, and libcuda does not like unloading.
        void *cuda = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
        if (cuda) {
          using get_t = int (*)(int *);
          auto get = reinterpret_cast<get_t>(dlsym(cuda, "cuDriverGetVersion"));
          int v = 0;
          if (!get || get(&v) != 0) throw std::runtime_error("libcuda.so.1 is loaded but cuDriverGetVersion failed");
          *version = v;
        })
}

// ---- CUDA memory, stream state and host synchronisations, without CUDA headers ----
// Everything below goes through c10's device-generic interfaces (DeviceAllocator, DeviceGuardImpl)
// or symbols looked up at run time, so glue.cpp still compiles against a CPU-only libtorch; the
// Rust side calls these only when tch::Cuda::is_available().
static void check_cuda_device(int device) {
  const auto &hooks = at::detail::getCUDAHooks();
  if (!hooks.hasCUDA()) throw std::runtime_error("CUDA is not available to this libtorch");
  if (device < 0 || device >= hooks.deviceCount())
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (" +
                                std::to_string(hooks.deviceCount()) + " visible)");
}

// The CUDA caching allocator's byte counters of one device (what torch.cuda.memory_allocated,
// max_memory_allocated, memory_reserved and max_memory_reserved return): out[0..4] =
// allocated, peak allocated, reserved, peak reserved (the AGGREGATE pool).
char *flowmap_cuda_memory(int device, int64_t *out) {
  GUARD(check_cuda_device(device);
        auto *alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
        if (!alloc->initialized()) { for (int i = 0; i < 4; ++i) out[i] = 0; return nullptr; }
        auto stats = alloc->getDeviceStats(static_cast<c10::DeviceIndex>(device));
        const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
        out[0] = stats.allocated_bytes[agg].current; out[1] = stats.allocated_bytes[agg].peak;
        out[2] = stats.reserved_bytes[agg].current; out[3] = stats.reserved_bytes[agg].peak;)
}
// torch.cuda.reset_peak_memory_stats(device).
char *flowmap_cuda_reset_peak(int device) {
  GUARD(check_cuda_device(device); auto *alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
        if (alloc->initialized()) alloc->resetPeakStats(static_cast<c10::DeviceIndex>(device));)
}
// torch.cuda.empty_cache(): returns cached, unused blocks to the driver.
char *flowmap_cuda_empty_cache() {
  GUARD(auto *alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA); if (alloc->initialized()) alloc->emptyCache();)
}
// Whether every kernel queued on the device's current stream has finished (cudaStreamQuery),
// torch.cuda.current_stream(device).query().
char *flowmap_cuda_stream_idle(int device, bool *idle) {
  GUARD(check_cuda_device(device);
        const auto *impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
        c10::Stream s = impl->getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
        *idle = impl->queryStream(s);)
}

// Host-synchronisation counting, as torch.cuda.set_sync_debug_mode("warn") does it: libc10_cuda
// checks c10::cuda::warning_state() before every synchronising call (cudaStreamSynchronize after a
// device-to-host copy, .item(), cudaDeviceSynchronize, ...) and then calls
// c10::cuda::warn_or_error_on_sync(), which raises a TORCH_WARN. A warning handler of this thread
// counts those warnings. The state object is the function-local static of the inline
// c10::cuda::warning_state() (c10/cuda/CUDAFunctions.h), exported by libc10_cuda.so as a unique
// symbol; its only member is `SyncDebugMode sync_debug_mode` (L_DISABLED = 0, L_WARN = 1,
// L_ERROR = 2), so it is read and written as an int. Looked up at run time: no CUDA headers needed.
namespace {
const char *kWarningStateSymbol = "_ZZN3c104cuda13warning_stateEvE14warning_state_";
const char *kWarnOnSyncSymbol = "_ZN3c104cuda21warn_or_error_on_syncEv";
const char *kSyncMessage = "called a synchronizing CUDA operation";

int *sync_debug_mode_slot() {
  void *sym = dlsym(RTLD_DEFAULT, kWarningStateSymbol);
  if (!sym) throw std::runtime_error("libc10_cuda.so's c10::cuda::warning_state() is not loaded (a CPU-only libtorch?)");
  return static_cast<int *>(sym);
}

struct SyncCountingHandler : public c10::WarningHandler {
  int64_t syncs = 0;
  int64_t others = 0;
  void process(const c10::Warning &w) override {
    if (w.msg().find(kSyncMessage) != std::string::npos) ++syncs; else ++others;
  }
};
thread_local SyncCountingHandler *active_counter = nullptr;
thread_local c10::WarningHandler *previous_handler = nullptr;
thread_local int previous_mode = 0;
}  // namespace

// Starts counting on this thread (sync debug mode "warn" plus the counting handler).
char *flowmap_sync_count_begin() {
  GUARD(if (active_counter) throw std::runtime_error("host-sync counting is already active on this thread");
        int *mode = sync_debug_mode_slot(); previous_mode = *mode;
        active_counter = new SyncCountingHandler();
        previous_handler = c10::WarningUtils::get_warning_handler();
        c10::WarningUtils::set_warning_handler(active_counter); *mode = 1;)
}
// The synchronisations (and other warnings) counted since begin, without stopping.
char *flowmap_sync_count_read(int64_t *syncs, int64_t *others) {
  GUARD(if (!active_counter) throw std::runtime_error("host-sync counting is not active on this thread");
        *syncs = active_counter->syncs; *others = active_counter->others;)
}
// Stops counting and restores the previous mode and handler.
char *flowmap_sync_count_end() {
  GUARD(if (!active_counter) return nullptr; *sync_debug_mode_slot() = previous_mode;
        c10::WarningUtils::set_warning_handler(previous_handler); delete active_counter;
        active_counter = nullptr; previous_handler = nullptr;)
}
// What libc10_cuda calls before a synchronising operation; for tests of the counter without a GPU.
char *flowmap_sync_debug_probe() {
  GUARD(void *sym = dlsym(RTLD_DEFAULT, kWarnOnSyncSymbol);
        if (!sym) throw std::runtime_error("c10::cuda::warn_or_error_on_sync is not loaded");
        reinterpret_cast<void (*)()>(sym)();)
}

}  // extern "C"
