// kvtile/attention/cuda/dispatch.hpp: which kernel an entry point runs, and why.
//
// Entry points that choose among kernels (cuda::prefill's run on Hopper or not, the paged
// planner's kernel shapes) say what they chose: prefill<...>::dispatch(args) and
// paged_plan::kernel / paged_plan::reason answer before the run, and the dispatch log hears
// every run as it launches, so a fallback to a slower kernel is never silent.
//
//   kvtile::attention::cuda::set_dispatch_log([](const kernel_choice& c) {
//     std::fprintf(stderr, "%s -> %s (%s)\n", c.entry, c.kernel, c.reason.c_str());
//   });
//
// With no hook set, the environment variable KVTILE_LOG_DISPATCH=1 prints the same line to
// stderr. Plain C++: no CUDA needed.
#pragma once

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// A kernel an entry point chose: the entry point, the kernel, and why that one.
struct kernel_choice {
  const char* entry = "";
  const char* kernel = "";
  std::string reason;
};

using dispatch_log_fn = void (*)(const kernel_choice&);

namespace detail {
inline std::atomic<dispatch_log_fn>& dispatch_log_hook() {
  static std::atomic<dispatch_log_fn> hook{nullptr};
  return hook;
}
inline bool dispatch_log_env() {
  static const bool on = [] {
    const char* v = std::getenv("KVTILE_LOG_DISPATCH");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}
}  // namespace detail

// Install (or, with null, remove) the hook that hears every dispatch; it may be called from any
// thread that launches kvtile kernels, so it must be thread safe itself.
inline void set_dispatch_log(dispatch_log_fn fn) { detail::dispatch_log_hook().store(fn, std::memory_order_release); }

// Whether anything listens: entry points build the choice only then.
inline bool dispatch_log_enabled() {
  return detail::dispatch_log_hook().load(std::memory_order_acquire) != nullptr || detail::dispatch_log_env();
}

inline void log_dispatch(const kernel_choice& c) {
  if (dispatch_log_fn fn = detail::dispatch_log_hook().load(std::memory_order_acquire)) {
    fn(c);
  } else if (detail::dispatch_log_env()) {
    std::fprintf(stderr, "kvtile: %s -> %s (%s)\n", c.entry, c.kernel, c.reason.c_str());
  }
}

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
