// kvtile/bench/registry.hpp: the configurations kvtile_bench can measure, and how to add one.
//
// A configuration is what an instantiation fixes at compile time (kernel, device, element
// type, head dim, mask, tile); a problem is what stays runtime (batch, lengths, heads, page
// size, K/V layout). kvtile_bench picks the registered configuration that matches its command
// line and runs it on the problem; one that is not registered is an error listing those that
// are, never a substitute.
//
// Registering your own instantiation (one file linked into the CLI, see bench/README.md):
//
//   #include <kvtile/bench/cpu_runners.hpp>     // or <kvtile/bench/cuda_runners.cuh>
//   using namespace kvtile::attention;
//   static const bool mine = kvtile::bench::add_cpu_attention<float, 96, tile_shape<32, 64>, causal_mask>();
//   static const bool gpu = kvtile::bench::add_cuda_prefill<kvtile::bfloat16, 96, causal_mask, tile_shape<64, 64, 4, 2>>();
//
// Metrics: prefill and append report FLOP/s (4 * D * visible (query, key) pairs per query
// head; a causal prefill counts S * S / 2, as the PyTorch peers do), decode reports bytes/s
// (every K/V byte read plus queries and outputs). Units are decimal: TFLOP/s and TB/s on the
// GPU, GFLOP/s and GB/s on the CPU.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kvtile/core/config.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/paging/paged_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace bench {

enum class kernel_kind { prefill, decode, append };
enum class device_kind { cpu, cuda };

inline const char* to_string(kernel_kind k) {
  return k == kernel_kind::prefill ? "prefill" : k == kernel_kind::decode ? "decode" : "append";
}
inline const char* to_string(device_kind d) { return d == device_kind::cpu ? "cpu" : "cuda"; }

// What an instantiation fixes at compile time. block_q == 0: the kernel chooses its tile
// (the paged CUDA kernels' planner); warps / stages == 0: not a parameter of that kernel.
struct config {
  kernel_kind kernel = kernel_kind::prefill;
  device_kind device = device_kind::cpu;
  std::string dtype;  // "fp32", "fp16", "bf16"
  int head_dim = 0;
  std::string mask;  // "none", "causal"
  int block_q = 0, block_kv = 0, warps = 0, stages = 0;
  bool default_tile = true;  // picked when the command line names no tile

  std::string tile() const {
    if (block_q == 0) return "planned";
    std::string t = std::to_string(block_q) + "x" + std::to_string(block_kv);
    if (warps) t += " w" + std::to_string(warps);
    if (stages) t += " s" + std::to_string(stages);
    return t;
  }
  std::string name() const {
    return std::string(to_string(kernel)) + " " + to_string(device) + " " + dtype + " D" + std::to_string(head_dim) +
           " " + mask + " " + tile();
  }
};

// What stays runtime: one shape. kv_len is the cached prefix for append (the chunk comes on
// top), the key length for decode (it includes the new tokens) and the sequence length for
// prefill (q_len = kv_len there).
struct problem {
  kernel_kind kernel = kernel_kind::prefill;
  int batch = 1, kv_len = 2048, q_len = 0;
  int qo_heads = 32, kv_heads = 8, head_dim = 128, page_size = 16;
  bool causal = true;
  kv_layout layout = kv_layout::nhd;
  int elem_bytes = 2;

  int queries() const { return kernel == kernel_kind::prefill ? kv_len : q_len; }
  int keys() const { return kernel == kernel_kind::append ? kv_len + q_len : kv_len; }

  void check() const {
    KVTILE_REQUIRE(batch >= 1, errc::invalid_argument, "batch must be >= 1, got ", batch);
    KVTILE_REQUIRE(kv_len >= 1, errc::invalid_argument, "length must be >= 1, got ", kv_len);
    KVTILE_REQUIRE(kernel == kernel_kind::prefill || q_len >= 1, errc::invalid_argument,
                   "query tokens per request must be >= 1, got ", q_len);
    KVTILE_REQUIRE(kernel != kernel_kind::decode || q_len <= kv_len, errc::invalid_argument, "decode q_len ", q_len,
                   " exceeds the key length ", kv_len);
    KVTILE_REQUIRE(qo_heads >= 1 && kv_heads >= 1 && qo_heads % kv_heads == 0, errc::invalid_argument,
                   "query heads (", qo_heads, ") must be a positive multiple of KV heads (", kv_heads, ")");
    KVTILE_REQUIRE(page_size >= 1, errc::invalid_argument, "page size must be >= 1, got ", page_size);
  }

  // (query, key) pairs each query head sees; causal prefill counts S * S / 2 like the peers.
  double visible_pairs() const {
    const double q = queries(), k = keys();
    if (!causal) return q * k;
    if (kernel == kernel_kind::prefill) return 0.5 * q * q;
    return q * (k - q) + q * (q + 1) / 2;  // bottom-right: query t sees the prefix and t + 1 keys
  }
  double flops() const { return 4.0 * head_dim * qo_heads * batch * visible_pairs(); }
  // K/V read once, queries read and outputs written once.
  double bytes() const {
    return double(elem_bytes) * head_dim * batch * (2.0 * keys() * kv_heads + 2.0 * queries() * qo_heads);
  }
  bool by_bytes() const { return kernel == kernel_kind::decode; }

  // Shape strings of the results protocol (bench/README.md), as the peer scripts print them.
  std::string label(const std::string& dtype) const {
    const std::string heads = " hq=" + std::to_string(qo_heads) + " hkv=" + std::to_string(kv_heads) +
                              " d=" + std::to_string(head_dim);
    const std::string paged = " page=" + std::to_string(page_size) + (layout == kv_layout::hnd ? " hnd" : "");
    switch (kernel) {
      case kernel_kind::prefill:
        return dtype + " D" + std::to_string(head_dim) + " S" + std::to_string(kv_len) + " B" + std::to_string(batch) +
               " H" + std::to_string(qo_heads) + (kv_heads != qo_heads ? "/" + std::to_string(kv_heads) : "") +
               (causal ? " causal" : " full");
      case kernel_kind::decode:
        return "b=" + std::to_string(batch) + " l=" + std::to_string(kv_len) +
               (q_len > 1 ? " q=" + std::to_string(q_len) : "") + heads + paged;
      case kernel_kind::append:
        return "prefix=" + std::to_string(kv_len) + " chunk=" + std::to_string(q_len) + " b=" + std::to_string(batch) +
               heads + paged + (causal ? "" : " full");
    }
    return "";
  }
};

// Which kernel the last run used, as its runner saw it (a fallback is never silent).
inline std::string& kernel_note() {
  static std::string note;
  return note;
}

// A runner sets the problem up, runs the timing loop (time_cpu / time_cuda) and returns.
using runner = std::function<void(benchmark::State&, const problem&)>;

struct entry {
  config cfg;
  runner run;
};

class registry {
 public:
  static registry& global() {
    static registry r;
    return r;
  }
  // Returns true so that a namespace-scope `static const bool x = add(...)` registers at start-up.
  bool add(entry e) {
    for (const entry& x : entries_)
      KVTILE_REQUIRE(x.cfg.name() != e.cfg.name(), errc::invalid_argument, "configuration '", e.cfg.name(),
                     "' is registered twice");
    entries_.push_back(std::move(e));
    return true;
  }
  const std::vector<entry>& entries() const { return entries_; }

 private:
  std::vector<entry> entries_;
};

// Sets the counters every kvtile_bench row carries from the seconds per run: `value` in the
// row's unit, `seconds`, and rates for Google Benchmark's own table.
inline void set_counters(benchmark::State& st, const problem& p, double seconds_per_run, bool gpu) {
  if (seconds_per_run <= 0) return;
  const double scale = gpu ? 1e12 : 1e9;
  st.counters["seconds"] = seconds_per_run;
  st.counters["value"] = (p.by_bytes() ? p.bytes() : p.flops()) / seconds_per_run / scale;
  st.counters["FLOP/s"] = benchmark::Counter(p.flops() / seconds_per_run);
  st.counters["bytes/s"] = benchmark::Counter(p.bytes() / seconds_per_run);
}

inline std::string unit_of(const problem& p, device_kind d) {
  if (d == device_kind::cuda) return p.by_bytes() ? "TB/s" : "TFLOP/s";
  return p.by_bytes() ? "GB/s" : "GFLOP/s";
}

}  // namespace bench
KVTILE_NAMESPACE_END
