// examples/serving_backend.hpp: where the serving examples keep their K/V and run attention.
//
// Compiled as CUDA (CMake does so when a CUDA compiler is found) and with a GPU present, a
// cache's pools live in device memory: K/V writes and copy-on-write block copies run on the GPU,
// and attention steps run the paged kernels (cuda::paged_attention, the planner's choice, named).
// Otherwise everything runs on the CPU: the same cache in host memory, the CPU backend. An
// example is written once, as a template over the cache's memory policy:
//
//   return serving_example::run([]<class Memory>(serving_example::backend& where, std::type_identity<Memory>) { ... });
//
// The examples' K, V and queries are host vectors; write_kv and attention stage them to the
// device when the pools live there.
#pragma once

#include <kvtile/attention/cpu/forward.hpp>
#include <kvtile/kvtile.hpp>

#include <algorithm>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#if KVTILE_HAS_CUDA_COMPILER
#include <cuda_runtime.h>

#include <kvtile/attention/cuda/paged_attention.cuh>
#include <kvtile/memory/cuda/device_memory.cuh>
#endif

namespace serving_example {

using namespace kvtile;

// Where an example runs: a name to print and, on the GPU, device buffers reused across calls.
class backend {
 public:
  explicit backend(std::string name, bool gpu) : name_(std::move(name)), gpu_(gpu) {}
  backend(const backend&) = delete;
  backend& operator=(const backend&) = delete;
  ~backend() {
#if KVTILE_HAS_CUDA_COMPILER
    for (auto& b : buffers_) cudaFree(b.ptr);
#endif
  }

  const std::string& name() const { return name_; }
  bool gpu() const { return gpu_; }

  // The host values [src, src + count) copied into device buffer `slot` (grown as needed).
  template <class U>
  U* stage(int slot, const U* src, std::size_t count) {
    void* p = buffer(slot, count * sizeof(U));
#if KVTILE_HAS_CUDA_COMPILER
    if (count) KVTILE_CUDA_CHECK(cudaMemcpy(p, src, count * sizeof(U), cudaMemcpyHostToDevice));
#else
    (void)src;
#endif
    return static_cast<U*>(p);
  }
  void* buffer(int slot, std::size_t bytes) {
    if (buffers_.size() <= std::size_t(slot)) buffers_.resize(std::size_t(slot) + 1);
    auto& b = buffers_[std::size_t(slot)];
    if (b.bytes < bytes) {
#if KVTILE_HAS_CUDA_COMPILER
      cudaFree(b.ptr);
      b.ptr = nullptr;
      KVTILE_CUDA_CHECK(cudaMalloc(&b.ptr, bytes));
#endif
      b.bytes = bytes;
    }
    return b.ptr;
  }

  // The attention kernel the last GPU step ran (its planner's name), for the examples' output.
  std::string last_kernel = "CPU backend";

 private:
  struct device_buffer {
    void* ptr = nullptr;
    std::size_t bytes = 0;
  };
  std::string name_;
  bool gpu_;
  std::vector<device_buffer> buffers_;
};

// Runs body(backend&, std::type_identity<Memory>{}) with the device memory policy when this file
// was compiled as CUDA and a GPU is present, with host memory otherwise; returns its result, or
// 1 after printing a kvtile::error.
template <class Body>
int run(Body&& body) {
  try {
#if KVTILE_HAS_CUDA_COMPILER
    int n = 0;
    if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0) {
      cudaDeviceProp prop{};
      KVTILE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
      backend where(std::string("GPU: ") + prop.name, true);
      std::printf("running on the %s\n", where.name().c_str());
      return body(where, std::type_identity<memory::cuda::device_memory>{});
    }
    cudaGetLastError();  // no device: clear the error and run on the CPU
#endif
    backend where("CPU (no GPU found)", false);
    std::printf("running on the %s\n", where.name().c_str());
    return body(where, std::type_identity<memory::host_memory>{});
  } catch (const kvtile::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}

// cache.write(layer, k, v, ...) from host vectors, wherever the cache's pools live.
template <class Cache, class T>
void write_kv(Cache& cache, backend& where, std::int32_t layer, const T* k, const T* v, std::int64_t token_stride,
              const std::int64_t* slots, std::int32_t num_tokens) {
  if constexpr (Cache::storage_type::memory_type::is_device) {
    const std::size_t n = std::size_t(num_tokens) * std::size_t(token_stride);
    cache.write(layer, where.stage(0, k, n), where.stage(1, v, n), token_stride,
                where.stage(2, slots, std::size_t(num_tokens)), num_tokens);
  } else {
    cache.write(layer, k, v, token_stride, slots, num_tokens);
  }
}

// Attention of the queries q ([tokens, num_qo_heads, HeadDim], q_indptr[batch + 1] tokens per
// sequence) over layer `layer` of the sequences of `table` (cache.to_csr), into o. On the GPU:
// cuda::paged_attention planned for this batch; on the CPU: the CPU backend.
template <int HeadDim, class Variant, class Cache, class T>
void attention(Cache& cache, backend& where, std::int32_t layer, const paging::csr_page_table_host& table,
               const std::vector<std::int32_t>& q_indptr, std::int32_t num_qo_heads, const std::vector<T>& q,
               typename Variant::params params, float scale, std::vector<T>& o) {
  const std::int32_t batch = table.batch();
  o.assign(q.size(), T(0.f));
  if constexpr (Cache::storage_type::memory_type::is_device) {
#if KVTILE_HAS_CUDA_COMPILER
    namespace kc = attention::cuda;
    using attn = kc::paged_attention<T, HeadDim, Variant>;
    const auto pool = cache.layer(layer);
    const kc::paged_problem problem{num_qo_heads,   pool.num_kv_heads, HeadDim,
                                    pool.page_size, pool.num_blocks,   int(sizeof(T))};
    static const kc::device_limits device = kc::query_device_limits();
    const typename attn::plan_arguments pa{q_indptr.data(), table.view(), problem, device, {}};
    const kc::paged_plan plan = attn::plan(pa, params);
    void* ws = where.buffer(3, std::max<std::size_t>(attn::workspace_size(plan), 256));
    attn::initialize(plan, ws);
    const paging::csr_page_table d_table{where.stage(4, table.indptr.data(), table.indptr.size()),
                                         where.stage(5, table.indices.data(), table.indices.size()),
                                         where.stage(6, table.last_page_len.data(), table.last_page_len.size()), batch};
    const auto layout = attention::ragged_layout::varlen(where.stage(7, q_indptr.data(), q_indptr.size()), batch,
                                                         num_qo_heads, HeadDim);
    T* d_o = static_cast<T*>(where.buffer(8, o.size() * sizeof(T)));
    const typename attn::arguments args{attention::dense_tensor<T>{where.stage(9, q.data(), q.size()), layout},
                                        paging::paged_kv<T, paging::csr_page_table>{pool, d_table},
                                        attention::dense_tensor<T>{d_o, layout},
                                        nullptr,
                                        params,
                                        scale};
    attn::run(plan, args, ws);
    KVTILE_CUDA_CHECK(cudaMemcpy(o.data(), d_o, o.size() * sizeof(T), cudaMemcpyDeviceToHost));
    where.last_kernel = plan.kernel();
#endif
  } else {
    const auto layout = attention::ragged_layout::varlen(q_indptr.data(), batch, num_qo_heads, HeadDim);
    attention::cpu::attention_forward<attention::tile_shape<16, 64>, HeadDim, Variant>(
        attention::dense_tensor<const T>{q.data(), layout}, paging::bind(cache.layer(layer), table),
        cache.layer(layer).num_kv_heads, params, scale, attention::dense_tensor<T>{o.data(), layout});
  }
}

}  // namespace serving_example
