// kvtile/attention/cuda/paged/launch.cuh: plan upload and the run of a paged_plan.
//
// run_paged_attention is CUDA-graph safe: it checks its arguments against the plan (host
// values only), then launches plan.ctas() attention CTAs and, for split plans,
// plan.merges.size() merge CTAs on `stream`. No allocation, no synchronisation.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/dispatch.hpp"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/cuda/paged/append_kernel.cuh"
#include "kvtile/attention/cuda/paged/append_sm90_kernel.cuh"
#include "kvtile/attention/cuda/paged/append_sm90_ws_kernel.cuh"
#include "kvtile/attention/cuda/paged/decode_fp8_kernel.cuh"
#include "kvtile/attention/cuda/paged/decode_sm90_kernel.cuh"
#include "kvtile/attention/cuda/paged/kernel.cuh"
#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// The planner's view of a device (SM count, shared memory).
inline device_limits query_device_limits(int device = -1) {
  if (device < 0) KVTILE_CUDA_CHECK(cudaGetDevice(&device));
  device_limits d;
  int v = 0;
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  d.num_sms = v;
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  d.smem_per_sm = std::size_t(v);
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  d.smem_per_cta = std::size_t(v);
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxBlocksPerMultiprocessor, device));
  d.max_ctas_per_sm = v;
  d.wgmma = detail::sm90_kernels_available(device);
  return d;
}

// Copy the plan's work lists into the caller's device workspace (plan.workspace_bytes() bytes,
// 256-byte aligned). Done once per plan, before the (possibly captured) runs.
inline void upload_plan(const paged_plan& plan, void* workspace, cudaStream_t stream = nullptr) {
  KVTILE_REQUIRE(workspace != nullptr || plan.work.empty(), errc::invalid_argument, "upload_plan: null workspace for a plan of ",
                 plan.work.size(), " work items");
  KVTILE_REQUIRE(reinterpret_cast<std::uintptr_t>(workspace) % 256 == 0, errc::invalid_argument,
                 "upload_plan: workspace must be 256-byte aligned");
  auto* base = static_cast<unsigned char*>(workspace);
  if (!plan.work.empty())
    KVTILE_CUDA_CHECK(cudaMemcpyAsync(base + plan.work_offset(), plan.work.data(), plan.work.size() * sizeof(paged_work_item),
                                      cudaMemcpyHostToDevice, stream));
  if (!plan.cta_items.empty())
    KVTILE_CUDA_CHECK(cudaMemcpyAsync(base + plan.cta_items_offset(), plan.cta_items.data(),
                                      plan.cta_items.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice, stream));
  if (!plan.merges.empty())
    KVTILE_CUDA_CHECK(cudaMemcpyAsync(base + plan.merge_offset(), plan.merges.data(),
                                      plan.merges.size() * sizeof(paged_merge_item), cudaMemcpyHostToDevice, stream));
}

namespace paged {

// The merge CTAs of a split plan whose partial states hold BM rows each.
// On compute capability 9+ they are launched with programmatic stream serialisation: they start
// while the attention grid finishes and wait for it on the device (merge_partials_kernel).
template <class T, int D, int BM, class Mask, class Table, class Codec>
void launch_merges(const paged_plan& plan, const kernel_params<T, Table, Mask, Codec>& params, int device,
                   cudaStream_t stream) {
  if (plan.merges.empty()) return;
  cudaLaunchConfig_t cfg{};
  // Rows past plan.merge_rows hold no query in any merge item: no CTAs for them.
  cfg.gridDim = dim3(unsigned(plan.merges.size()), unsigned((plan.merge_rows * (D / 4) + merge_threads - 1) / merge_threads));
  cfg.blockDim = dim3(merge_threads);
  cfg.stream = stream;
  cudaLaunchAttribute early{};
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  if (merge_early != 0 && kvtile::detail::compute_capability_major(device) >= 9) {
    cfg.attrs = &early;
    cfg.numAttrs = 1;
  }
  KVTILE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, merge_partials_kernel<T, D, BM, Table, Mask, Codec>, params));
}

// Whether a kernel that waits on the device (see launch_items) is launched early for `plan`.
inline bool launches_early(const paged_plan& plan, int device) {
  return plan.early_launch && kvtile::detail::compute_capability_major(device) >= 9;
}

// plan.ctas() CTAs of `Kernel` (its shared-memory limit raised once per device), then the
// merges of a split plan. `extra`: kernel arguments after the parameters (tensor maps).
// `Early`: the kernel waits for the grid before it on the device (arch::wait_primary_grid)
// before touching memory that grid may write, so it may be launched with programmatic stream
// serialisation where the plan asks for it.
template <auto Kernel, int D, int BM, bool Early = false, class T, class Table, class Mask, class Codec, class... Extra>
void launch_items(const paged_plan& plan, int threads, std::size_t smem, int device, cudaStream_t stream,
                  const kernel_params<T, Table, Mask, Codec>& params, const Extra&... extra) {
  // Once per device (not a stream operation: legal while a stream is being captured).
  static std::atomic<std::uint64_t> smem_set{0};
  kvtile::detail::once_per_device(smem_set, device, [&] {
    KVTILE_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  });
  if (!plan.work.empty()) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(unsigned(plan.ctas()));
    cfg.blockDim = dim3(unsigned(threads));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute early{};
    early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    early.val.programmaticStreamSerializationAllowed = 1;
    if (Early && launches_early(plan, device)) {
      cfg.attrs = &early;
      cfg.numAttrs = 1;
    }
    KVTILE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, Kernel, params, extra...));
  }
  launch_merges<T, D, BM>(plan, params, device, stream);
}

// The mma.sync kernels: decode (kernel.cuh) and append (append_kernel.cuh at D <= 128, the only
// one of them for fp8 pages).
template <class T, int D, paged_kernel_kind Kind, class Mask, class Table, class Codec>
void launch(const paged_plan& plan, const kernel_params<T, Table, Mask, Codec>& params, int device, cudaStream_t stream) {
  if constexpr (uses_wide_append<Kind, D>) {
    using C = append_config<D, int(sizeof(typename paging::paged_kv<T, Table, Codec>::storage_type))>;
    launch_items<paged_append_kernel<T, D, Mask, Table, Codec>, D, C::bm>(plan, C::threads, C::smem_bytes, device, stream,
                                                                         params);
  } else if constexpr (Codec::quantized) {
    KVTILE_FAIL(errc::invalid_argument, "fp8 pages run on the append kernel up to head_dim 128, not ", D);
  } else {
    using C = kernel_config<Kind, D>;
    launch_items<paged_attention_kernel<T, D, Kind, Mask, Table>, D, C::bm>(
        plan, C::threads, C::shape.smem_bytes(D, int(sizeof(T))), device, stream, params);
  }
}

// The cp.async fp8 decode kernel (decode_fp8_kernel.cuh): fp8 pages, any supported head dim.
template <class T, int D, class Codec, class Mask, class Table>
void launch_decode_fp8(const paged_plan& plan, const kernel_params<T, Table, Mask, Codec>& params, int device,
                       cudaStream_t stream) {
  using C = fp8_decode_config<D>;
  if constexpr (D % 32 == 0 && !has_rotary<Mask>) {
    if (plan.fp8_registers) {
      launch_items<paged_decode_fp8_kernel<T, D, Codec, Mask, Table, true>, D, C::bm>(
          plan, C::threads, fp8_decode_smem_bytes<D, true>(), device, stream, params);
      return;
    }
  } else {
    KVTILE_REQUIRE(!plan.fp8_registers, errc::invalid_argument, "the plan asks for the fp8 register path, which has no head_dim ",
                   D, (has_rotary<Mask> ? " or rotary variant" : ""));
  }
  launch_items<paged_decode_fp8_kernel<T, D, Codec, Mask, Table, false>, D, C::bm>(
      plan, C::threads, fp8_decode_smem_bytes<D, false>(), device, stream, params);
}

// The sm_90a append kernels, head dims 64 and 128: the cp.async one (append_sm90_kernel.cuh),
// or where the plan asks for it (plan_options::warp_specialised_append, a rotary variant, fp8
// pages) and the pool has TMA tensor maps, the warp-specialised one (append_sm90_ws_kernel.cuh);
// one plan serves both. Rotary variants and fp8 pages run only the warp-specialised one (the
// planner sees to it; fp8 pages at head_dim 128).
template <class T, int D, class Mask, class Table, class Codec>
void launch_append_sm90(const paged_plan& plan, const kernel_params<T, Table, Mask, Codec>& params, int device,
                        cudaStream_t stream) {
  using S = typename paging::paged_kv<T, Table, Codec>::storage_type;
  constexpr bool ws_possible = !Codec::quantized || (D % 128 == 0 && !has_rotary<Mask>);
  if constexpr (ws_possible) {
    if (plan.warp_specialised_append && decode_sm90_supported(D, params.kv.pool.page_size, int(sizeof(S)))) {
      using Src = append_ws_source<T, D, Mask, Table, Codec>;
      const tma_pool& pool = cached_tma_pool<S>(params.kv.pool);
      launch_items<paged_append_sm90_ws_kernel<T, D, Mask, Table, Codec>, D, Src::G::block_q>(
          plan, Src::G::threads, Src::core::smem_bytes, device, stream, params, pool);
      return;
    }
  }
  if constexpr (Codec::quantized) {
    KVTILE_REQUIRE(false, errc::unsupported, "paged append: fp8 pages run on the warp-specialised sm_90a kernel only ",
                   "(head_dim 128 without rotary, pages with TMA tensor maps: gcd(page_size, 64) >= 8); head_dim ", D,
                   ", page_size ", params.kv.pool.page_size);
  } else if constexpr (!has_rotary<Mask>) {
    using G = typename append_sm90_source<T, D, Mask, Table>::G;
    launch_items<paged_append_sm90_kernel<T, D, Mask, Table>, D, G::block_q>(plan, G::threads, G::smem_bytes, device,
                                                                            stream, params);
  } else {
    KVTILE_REQUIRE(false, errc::unsupported, "paged append: a rotary variant runs on the warp-specialised sm_90a kernel ",
                   "only, which needs TMA tensor maps of the pool (gcd(page_size, 64) >= 8); page_size ",
                   params.kv.pool.page_size);
  }
}

// The sm_90a TMA decode kernel (decode_sm90_kernel.cuh); head dims of whole 128-byte panels
// (multiples of 64 for fp16 / bf16 pages, of 128 for fp8 ones).
template <class T, int D, class Mask, class Table, class Codec>
void launch_decode_sm90(const paged_plan& plan, const kernel_params<T, Table, Mask, Codec>& params, int device,
                        cudaStream_t stream) {
  using S = typename paging::paged_kv<T, Table, Codec>::storage_type;
  using C = decode_sm90_config<D, int(sizeof(S))>;
  const tma_pool& pool = cached_tma_pool<S>(params.kv.pool);
  const bool runs = !plan.cta_items.empty();
  const std::size_t smem = C::shape.decode_sm90_smem_bytes(D, int(sizeof(S)), runs);
  kernel_params<T, Table, Mask, Codec> p = params;
  p.early = launches_early(plan, device) ? 1 : 0;
  if (runs)
    launch_items<paged_decode_sm90_kernel<T, D, Mask, Table, true, Codec>, D, C::bm, true>(plan, C::threads, smem, device,
                                                                                           stream, p, pool);
  else
    launch_items<paged_decode_sm90_kernel<T, D, Mask, Table, false, Codec>, D, C::bm, true>(plan, C::threads, smem, device,
                                                                                            stream, p, pool);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace paged

// The run's checks (host values only): the tensors, pools and variant parameters against the
// plan; throws kvtile::error naming the first value that does not fit.
// An fp8 pool (Codec fp8_e4m3) needs a plan made with problem.elem_bytes = 1 (the fp8 decode
// kernels, or the append kernel), its scales, and 16-byte aligned rows.
template <mask_policy Mask, int HeadDim, class T, class Table, class Codec>
void check_paged_attention(const paged_plan& plan, const dense_tensor<T>& q,
                           const paging::paged_kv<T, Table, Codec>& kv, const dense_tensor<T>& o,
                           const typename Mask::params& mask_params, float scale) {
  static_assert(std::is_same_v<T, kvtile::half> || std::is_same_v<T, kvtile::bfloat16>,
                "paged attention runs on fp16 or bf16 tensors");
  static_assert(is_supported_head_dim<HeadDim>, "paged attention: HeadDim must be a multiple of 16 up to 256");
  const paged_problem& pr = plan.problem;
  KVTILE_REQUIRE(pr.head_dim == HeadDim, errc::invalid_argument, "plan was made for head_dim ", pr.head_dim,
                 ", run instantiated for ", HeadDim);
  KVTILE_REQUIRE(q.layout.head_dim == HeadDim && o.layout.head_dim == HeadDim && kv.pool.head_dim == HeadDim,
                 errc::invalid_argument, "head_dim of q (", q.layout.head_dim, "), o (", o.layout.head_dim, ") and kv (",
                 kv.pool.head_dim, ") must all be ", HeadDim);
  KVTILE_REQUIRE(q.layout.heads == pr.num_qo_heads && o.layout.heads == pr.num_qo_heads, errc::invalid_argument,
                 "q has ", q.layout.heads, " heads and o ", o.layout.heads, "; the plan has ", pr.num_qo_heads);
  KVTILE_REQUIRE(kv.pool.num_kv_heads == pr.num_kv_heads, errc::invalid_argument, "kv pool has ", kv.pool.num_kv_heads,
                 " KV heads; the plan has ", pr.num_kv_heads);
  KVTILE_REQUIRE(kv.pool.page_size == pr.page_size, errc::invalid_argument, "kv pool page_size ", kv.pool.page_size,
                 " differs from the plan's ", pr.page_size);
  KVTILE_REQUIRE(kv.pool.num_blocks == pr.pool_blocks, errc::invalid_argument, "kv pool has ", kv.pool.num_blocks,
                 " blocks; the plan checked its page table against ", pr.pool_blocks);
  KVTILE_REQUIRE(q.layout.batch == plan.batch && o.layout.batch == plan.batch && kv.batch() == plan.batch,
                 errc::invalid_argument, "batch of q (", q.layout.batch, "), o (", o.layout.batch, ") and kv (", kv.batch(),
                 ") must equal the plan's ", plan.batch);
  if (!q.layout.indptr)
    KVTILE_REQUIRE(plan.batch == 0 || (q.layout.len == plan.max_q_len && std::int64_t(q.layout.len) * plan.batch == plan.total_q),
                   errc::invalid_argument, "fixed-length q of ", q.layout.len, " tokens per request does not match the plan");
  KVTILE_REQUIRE(scale > 0.f, errc::invalid_argument, "softmax scale must be positive, got ", scale);
  check_variant<Mask>(mask_params, HeadDim);
  check_cuda_rotary<Mask>(mask_params, HeadDim);
  if constexpr (has_rotary<Mask>)
    KVTILE_REQUIRE(plan.shape.kind != paged_kernel_kind::append_sm90 ||
                       (plan.warp_specialised_append && decode_sm90_supported(HeadDim, kv.pool.page_size)),
                   errc::unsupported,
                   "rotary variants run on the paged decode, the mma.sync append and the warp-specialised sm_90a append "
                   "kernels (pages with TMA tensor maps); the plan is for ", plan.kernel(),
                   plan.warp_specialised_append ? "" : " without the warp-specialised mainloop", " at page_size ",
                   kv.pool.page_size);
  constexpr int kv_bytes = int(sizeof(typename paging::paged_kv<T, Table, Codec>::storage_type));
  KVTILE_REQUIRE(plan.problem.elem_bytes == kv_bytes, errc::invalid_argument, "the plan was made for ",
                 plan.problem.elem_bytes, "-byte K/V elements; this pool stores ", kv_bytes,
                 "-byte ones (paged_problem::elem_bytes)");
  if constexpr (Codec::quantized)
    KVTILE_REQUIRE(plan.shape.kind == paged_kernel_kind::decode || plan.shape.kind == paged_kernel_kind::decode_sm90 ||
                       (plan.shape.kind == paged_kernel_kind::append && HeadDim <= 128) ||
                       (plan.shape.kind == paged_kernel_kind::append_sm90 && HeadDim == 128 && !has_rotary<Mask> &&
                        plan.warp_specialised_append && decode_sm90_supported(HeadDim, kv.pool.page_size, 1)),
                   errc::unsupported, "fp8 K/V pages run on the paged decode kernels, (head_dim <= 128) the append ",
                   "kernel and (head_dim 128, no rotary, gcd(page_size, 64) >= 8) the warp-specialised sm_90a append "
                   "kernel; the plan is for ", plan.kernel(), " at head_dim ", HeadDim, ", page_size ", kv.pool.page_size);
  if (plan.work.empty()) return;  // an empty batch: nothing to compute, null pointers allowed
  if constexpr (memory::per_head_scales<Codec>)
    KVTILE_REQUIRE(kv.pool.k_scale && kv.pool.v_scale, errc::invalid_argument,
                   "an fp8 per-head pool needs its K and V scales (k_scale ", kv.pool.k_scale, ", v_scale ", kv.pool.v_scale,
                   ")");
  if constexpr (memory::per_token_scales<Codec>)
    KVTILE_REQUIRE(kv.pool.scale_offset % 4 == 0 && kv.pool.scale_offset > 0, errc::invalid_argument,
                   "an fp8 per-token pool's scales must start at a positive multiple of 4 bytes into the block, got ",
                   kv.pool.scale_offset);
  constexpr int kv_align = 16 / kv_bytes;  // elements per 16 bytes
  const bool ok_align = paged::aligned16(q.data) && paged::aligned16(o.data) && paged::aligned16(kv.pool.k) &&
                        paged::aligned16(kv.pool.v) && q.layout.stride_token % 8 == 0 && q.layout.stride_head % 8 == 0 &&
                        q.layout.stride_batch % 8 == 0 && o.layout.stride_token % 4 == 0 && o.layout.stride_head % 4 == 0 &&
                        o.layout.stride_batch % 4 == 0 && kv.pool.stride_block % kv_align == 0 &&
                        kv.pool.stride_token % kv_align == 0 && kv.pool.stride_head % kv_align == 0;
  KVTILE_REQUIRE(ok_align, errc::invalid_argument,
                 "paged attention needs 16-byte aligned q, o, k, v and strides that are multiples of 8 elements");
}

// Run a plan: o (and lse, [rows, num_qo_heads], may be null) = attention of q over kv.
// q and o: [batch, q_len(b), num_qo_heads, HeadDim] (fixed or varlen), with the lengths the
// plan was made for; kv: the device page table and pools the plan's host table mirrors.
template <mask_policy Mask, int HeadDim, class T, class Table, class Codec>
void run_paged_attention(const paged_plan& plan, void* workspace, const dense_tensor<T>& q,
                         const paging::paged_kv<T, Table, Codec>& kv, const dense_tensor<T>& o, float* lse,
                         typename Mask::params mask_params, float scale, cudaStream_t stream = nullptr) {
  check_paged_attention<Mask, HeadDim>(plan, q, kv, o, mask_params, scale);
  if (plan.work.empty()) return;  // an empty batch: nothing to compute, null pointers allowed
  KVTILE_REQUIRE(workspace != nullptr, errc::invalid_argument, "run: null workspace");
  const paged_problem& pr = plan.problem;
  int device = 0;
  KVTILE_CUDA_CHECK(cudaGetDevice(&device));
  const int major = kvtile::detail::compute_capability_major(device);
  KVTILE_REQUIRE(major >= 8, errc::unsupported, "paged attention needs compute capability 8.0 or newer, device ", device,
                 " has ", major, ".x");

  if (dispatch_log_enabled()) log_dispatch({"cuda::run_paged_attention", plan.kernel(), plan.reason});

  auto* base = static_cast<unsigned char*>(workspace);
  paged::kernel_params<T, Table, Mask, Codec> params;
  params.q = q;
  params.o = o;
  params.kv = kv;
  params.lse = lse;
  params.mask = mask_params;
  params.scale_log2 = scale * log2e;
  params.group = plan.group();
  params.num_qo_heads = pr.num_qo_heads;
  params.work = reinterpret_cast<const paged_work_item*>(base + plan.work_offset());
  params.cta_items = reinterpret_cast<const std::int32_t*>(base + plan.cta_items_offset());
  params.merges = reinterpret_cast<const paged_merge_item*>(base + plan.merge_offset());
  params.partial_o = reinterpret_cast<float*>(base + plan.partial_o_offset());
  params.partial_lse = reinterpret_cast<float*>(base + plan.partial_lse_offset());
  if constexpr (Codec::quantized) {
    if (plan.shape.kind == paged_kernel_kind::decode_sm90) {
      KVTILE_REQUIRE(detail::sm90_kernels_available(device), errc::unsupported, "plan is for an sm_90a kernel, but device ",
                     device, " does not run this binary's sm_90a code (plan with query_device_limits() of this device)");
      if constexpr (HeadDim % 128 == 0 && !has_rotary<Mask>)
        paged::launch_decode_sm90<T, HeadDim>(plan, params, device, stream);
      else
        KVTILE_FAIL(errc::invalid_argument, "plan is for the sm_90a decode kernel, which reads fp8 pages of head_dim a ",
                    "multiple of 128 without rotary; head_dim ", HeadDim, has_rotary<Mask> ? " with a rotary variant" : "");
    } else if (plan.shape.kind == paged_kernel_kind::append) {
      paged::launch<T, HeadDim, paged_kernel_kind::append>(plan, params, device, stream);  // checked: HeadDim <= 128
    } else if (plan.shape.kind == paged_kernel_kind::append_sm90) {
      KVTILE_REQUIRE(detail::sm90_kernels_available(device), errc::unsupported, "plan is for an sm_90a kernel, but device ",
                     device, " does not run this binary's sm_90a code (plan with query_device_limits() of this device)");
      if constexpr (append_sm90_head_dim(HeadDim))
        paged::launch_append_sm90<T, HeadDim>(plan, params, device, stream);  // checked: HeadDim 128, tensor maps
    } else {
      paged::launch_decode_fp8<T, HeadDim>(plan, params, device, stream);  // checked: the plan is for decode
    }
    return;
  } else {
  const bool sm90_kind = plan.shape.kind == paged_kernel_kind::append_sm90 || plan.shape.kind == paged_kernel_kind::decode_sm90;
  if (sm90_kind)
    KVTILE_REQUIRE(detail::sm90_kernels_available(device), errc::unsupported, "plan is for an sm_90a kernel, but device ",
                   device, " does not run this binary's sm_90a code (plan with query_device_limits() of this device)");
  if (plan.shape.kind == paged_kernel_kind::decode_sm90) {
    if constexpr (HeadDim % 64 == 0)
      paged::launch_decode_sm90<T, HeadDim>(plan, params, device, stream);
    else
      KVTILE_FAIL(errc::invalid_argument, "plan is for the sm_90a decode kernel, which has no head_dim ", HeadDim);
  } else if (plan.shape.kind == paged_kernel_kind::append_sm90) {
    const std::int64_t in_block = std::int64_t(kv.pool.page_size - 1) * kv.pool.stride_token +
                                  std::int64_t(kv.pool.num_kv_heads - 1) * kv.pool.stride_head + HeadDim;
    KVTILE_REQUIRE(in_block < (std::int64_t(1) << 31), errc::unsupported,
                   "the sm_90a append kernel keeps offsets inside a block in 32 bits; this pool's span ", in_block,
                   " is larger (plan with plan_options::use_wgmma = false)");
    if constexpr (append_sm90_head_dim(HeadDim))
      paged::launch_append_sm90<T, HeadDim>(plan, params, device, stream);
    else
      KVTILE_FAIL(errc::invalid_argument, "plan is for the sm_90a append kernel, which has no head_dim ", HeadDim);
  } else if (plan.shape.kind == paged_kernel_kind::decode) {
    paged::launch<T, HeadDim, paged_kernel_kind::decode>(plan, params, device, stream);
  } else {
    paged::launch<T, HeadDim, paged_kernel_kind::append>(plan, params, device, stream);
  }
  }
}

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
