// The paged mma.sync kernels run on the host through tests/emulation (see kernels_emulated.cpp):
// the append kernel (32 packed query rows per warp, paged/append_kernel.cuh), the 16-row kernel
// (decode, and append above head dim 128, paged/kernel.cuh) and the merge of split partial
// states, planned by the paged planner as for a small portable device, over scattered pages of
// odd sizes and GQA groups, against the fp64 reference with the GPU tests' rule
// (attention/paged_problem.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>  // the emulation's

#include "attention/fp8_problem.hpp"
#include "attention/paged_problem.hpp"
#include "kvtile/attention/cuda/paged/append_kernel.cuh"
#include "kvtile/attention/cuda/paged/decode_fp8_kernel.cuh"
#include "kvtile/attention/cuda/paged/kernel.cuh"
#include "kvtile/memory/kv_dequantize.hpp"
#include "support/test_util.hpp"

namespace {

using namespace paged_test;
namespace kp = kvtile::attention::cuda::paged;
using kc::paged_kernel_kind;

// The merges of a split plan (merge_partials_kernel), for the plan's row-tile height.
template <class T, int D, class Table, class Mask, class Codec>
void run_merges(const kc::paged_plan& plan, const kp::kernel_params<T, Table, Mask, Codec>& p) {
  if (plan.merges.empty()) return;
  const dim3 grid(unsigned(plan.merges.size()), unsigned((plan.merge_rows * (D / 4) + kp::merge_threads - 1) / kp::merge_threads));
  auto merge = [&]<int BM>() {
    emu::launch(grid, kp::merge_threads, 0, [&](unsigned char*) { kp::merge_partials_kernel<T, D, BM, Table, Mask, Codec>(p); });
  };
  const int bm = plan.shape.block_m;
  if (bm == 16) merge.template operator()<16>();
  else if (bm == 64) merge.template operator()<64>();
  else if (bm == 128) merge.template operator()<128>();
  else FAIL("no merge instantiated for block_m " << bm);
}

// One emulated run's outputs (poisoned), split-KV buffers and the kernel parameters over them
// and the plan (which must outlive it). Not copyable: the parameters point into it.
template <class T, int D, class Mask, class Codec = memory::identity>
struct emulated_run {
  std::vector<T> o;
  std::vector<float> lse, partial_o, partial_lse;
  kp::kernel_params<T, paging::csr_page_table, Mask, Codec> p{};

  emulated_run(const kc::paged_plan& plan, const spec& sp, dense_tensor<T> q, std::int32_t q_rows,
               const paging::paged_kv<T, paging::csr_page_table, Codec>& kv, typename Mask::params mp, float scale)
      : o(std::size_t(q_rows) * sp.hq * D, kvtile_test::poison<T>()),
        lse(std::size_t(q_rows) * sp.hq, std::numeric_limits<float>::quiet_NaN()),
        partial_o(std::size_t(plan.num_partials) * plan.shape.block_m * D, std::numeric_limits<float>::quiet_NaN()),
        partial_lse(std::size_t(plan.num_partials) * plan.shape.block_m, std::numeric_limits<float>::quiet_NaN()) {
    p.q = q;
    p.o = dense_tensor<T>{o.data(), q.layout};
    p.kv = kv;
    p.lse = lse.data();
    p.mask = mp;
    p.scale_log2 = scale * log2e;
    p.group = sp.hq / sp.hkv;
    p.num_qo_heads = sp.hq;
    p.work = plan.work.data();
    p.cta_items = plan.cta_items.empty() ? nullptr : plan.cta_items.data();
    p.merges = plan.merges.data();
    p.partial_o = partial_o.data();
    p.partial_lse = partial_lse.data();
  }
  emulated_run(const emulated_run&) = delete;
  emulated_run& operator=(const emulated_run&) = delete;
};

// Plans `sp` for a portable device of `sms` SMs (few: small batches are split), runs every CTA
// of the plan and the merges, checks against the reference; returns the plan's kernel.
template <class T, int D, class Mask>
paged_kernel_kind run_emulated(const spec& sp, typename Mask::params mp, int sms, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const host_problem<T, D> pr(sp, rng);
  kc::device_limits dev;
  dev.num_sms = sms;
  const auto table = pr.csr(pr.kv_indptr.data(), pr.indices.data(), pr.last_page_len.data());
  const auto plan = kc::plan_paged_attention<Mask>(pr.q_indptr.data(), table, pr.kernel_problem(), mp, dev, sp.opt);
  INFO("D " << D << ", mask " << std::string(Mask::name) << ", kernel " << std::string(kc::to_string(plan.shape.kind)) << ", " << plan.work.size()
            << " items, " << plan.num_partials << " partials, seed " << seed);

  const float scale = 1.f / std::sqrt(float(D));
  const auto ql = pr.q_layout(pr.q_indptr.data());
  emulated_run<T, D, Mask> run(plan, sp, dense_tensor<T>{const_cast<T*>(pr.q.data()), ql}, pr.q_indptr.back(),
                               {pr.pool_view(const_cast<T*>(pr.k.data()), const_cast<T*>(pr.v.data())), table}, mp, scale);
  const auto& p = run.p;

  const dim3 grid(unsigned(plan.ctas()));
  const paged_kernel_kind kind = plan.shape.kind;
  if constexpr (D <= 128) {
    if (kind == paged_kernel_kind::append) {
      using C = kp::append_config<D>;
      emu::launch(grid, C::threads, C::shape.smem_bytes(D, 2), [&](unsigned char* smem) { kp::paged_append_cta<T, D>(p, smem); });
    }
  }
  auto sixteen_rows = [&]<paged_kernel_kind Kind>() {
    using C = kp::kernel_config<Kind, D>;
    emu::launch(grid, C::threads, C::shape.smem_bytes(D, 2), [&](unsigned char* smem) { kp::paged_attention_cta<T, D, Kind>(p, smem); });
  };
  if (kind == paged_kernel_kind::decode) sixteen_rows.template operator()<paged_kernel_kind::decode>();
  if constexpr (D > 128)
    if (kind == paged_kernel_kind::append) sixteen_rows.template operator()<paged_kernel_kind::append>();
  REQUIRE((kind == paged_kernel_kind::decode || kind == paged_kernel_kind::append));
  run_merges<T, D>(plan, p);
  check_against_reference<T, D, Mask>(pr, mp, scale, run.o, run.lse);
  return kind;
}

// fp8 pages against fp64 over the dequantised K/V with the 2x rule (the naive algorithm over the
// same K/V the baseline): the decode kernel (paged/decode_fp8_kernel.cuh) both ways from bytes
// to fragments, or the append kernel (paged/append_kernel.cuh, fp8 tiles converted in shared
// memory), whichever the planner takes; `expect` says which that must be. q_mul / v_mul: Q and V
// times these (the softmax scale divided by q_mul); v_spread: per-token V magnitudes that differ
// by up to 2^8 (fp8_pool_problem).
template <class T, int D, class Codec, class Mask>
void run_emulated_fp8(const spec& sp, typename Mask::params mp, int sms, std::uint64_t seed,
                      paged_kernel_kind expect = paged_kernel_kind::decode, float q_mul = 1.f, float v_mul = 1.f,
                      bool v_spread = false) {
  std::mt19937_64 rng(seed);
  const fp8_pool_problem<T, D, Codec> pr(sp, rng, false, q_mul, v_mul, v_spread);
  const auto& hp = pr.base;
  const auto table = hp.csr(hp.kv_indptr.data(), hp.indices.data(), hp.last_page_len.data());
  const float scale = 1.f / std::sqrt(float(D)) / q_mul;
  const km::dequantized_pool deq = km::dequantize(pr.host_view());
  const auto ql = hp.q_layout(hp.q_indptr.data());
  const dense_tensor<T> qv{const_cast<T*>(hp.q.data()), ql};
  const paging::paged_kv<float, paging::csr_page_table> src{deq.view, table};
  std::vector<double> o_ref(hp.q.size()), lse_ref(std::size_t(hp.q_indptr.back()) * sp.hq);
  std::vector<T> o_low(hp.q.size());
  reference_attention<Mask>(qv, src, sp.hkv, mp, double(scale), dense_tensor<double>{o_ref.data(), ql}, lse_ref.data());
  naive_attention_lowp<Mask>(qv, src, sp.hkv, mp, double(scale), dense_tensor<T>{o_low.data(), ql});
  const double naive_err = kvtile_test::compare(o_low, o_ref).max_abs;

  for (const bool registers : {false, true}) {
    if (registers && (D % 32 != 0 || has_rotary<Mask> || expect == paged_kernel_kind::append)) continue;
    kc::device_limits dev;
    dev.num_sms = sms;
    kc::plan_options opt = sp.opt;
    opt.fp8_registers = registers;
    const auto plan = kc::plan_paged_attention<Mask>(hp.q_indptr.data(), table, pr.kernel_problem(), mp, dev, opt);
    INFO("fp8 D " << D << ", mask " << std::string(Mask::name) << ", registers " << registers << ", " << plan.work.size()
                  << " items, " << plan.num_partials << " partials, seed " << seed);
    REQUIRE(plan.shape.kind == expect);
    REQUIRE(plan.fp8_registers == registers);
    emulated_run<T, D, Mask, Codec> out(plan, sp, qv, hp.q_indptr.back(), {pr.host_view(), table}, mp, scale);
    const auto& p = out.p;
    auto run = [&]<bool Registers>() {
      emu::launch(dim3(unsigned(plan.ctas())), kp::fp8_decode_config<D>::threads, kp::fp8_decode_smem_bytes<D, Registers>(),
                  [&](unsigned char* smem) { kp::paged_decode_fp8_cta<T, D, Codec, Mask, paging::csr_page_table, Registers>(p, smem); });
    };
    if (expect == paged_kernel_kind::append) {
      if constexpr (D <= 128) {
        using C = kp::append_config<D, 1>;
        REQUIRE(C::smem_bytes == plan.shape.smem_bytes(D, 1));
        emu::launch(dim3(unsigned(plan.ctas())), C::threads, C::smem_bytes, [&](unsigned char* smem) { kp::paged_append_cta<T, D>(p, smem); });
      }
    } else if (registers) {
      if constexpr (D % 32 == 0 && !has_rotary<Mask>) run.template operator()<true>();
    } else {
      run.template operator()<false>();
    }
    run_merges<T, D>(plan, p);
    check_outputs(out.o, out.lse, o_ref, lse_ref, naive_err);
  }
}

// Two chunks (37 and 5 new tokens over 100 and 40 keys), GQA group 5, pages of 7 slots.
spec chunk_spec() {
  spec s;
  s.q_lens = {37, 5};
  s.kv_lens = {100, 40};
  s.hq = 5;
  s.hkv = 1;
  s.page_size = 7;
  return s;
}

}  // namespace

TEST_CASE("emulated paged decode (16-row kernel): GQA groups 4 and 5, split-KV merges, masks and soft-capping") {
  const auto seed = kvtile_test::fresh_seed();
  spec s;
  s.q_lens = {1, 1, 1};
  s.kv_lens = {1, 77, 300};
  s.hq = 8;
  s.hkv = 2;
  s.page_size = 16;
  CHECK(run_emulated<bfloat16, 128, causal_mask>(s, {}, 4, seed) == paged_kernel_kind::decode);
  s.hq = 5;
  s.hkv = 1;
  s.page_size = 7;
  s.kv_lens = {40, 9, 131};
  CHECK(run_emulated<half, 64, sliding_window_mask>(s, {8, 2}, 3, seed + 1) == paged_kernel_kind::decode);
  softcap<causal_mask>::params cap;
  cap.cap = 5.f;
  CHECK(run_emulated<bfloat16, 64, softcap<causal_mask>>(s, cap, 2, seed + 2) == paged_kernel_kind::decode);
  // No mask: only the tile's end hides keys.
  CHECK(run_emulated<bfloat16, 128, no_mask>(s, {}, 3, seed + 3) == paged_kernel_kind::decode);
}

TEST_CASE("emulated paged append: 32 rows per warp (D 64, 128) and 16 rows (D 256), chunks against cached prefixes") {
  const auto seed = kvtile_test::fresh_seed();
  spec s = chunk_spec();
  CHECK(run_emulated<bfloat16, 128, causal_mask>(s, {}, 4, seed) == paged_kernel_kind::append);
  s.hq = 4;
  s.hkv = 2;
  s.page_size = 16;
  CHECK(run_emulated<half, 64, sliding_window_mask>(s, {16, 4}, 2, seed + 1) == paged_kernel_kind::append);
  s.q_lens = {9};
  s.kv_lens = {50};
  CHECK(run_emulated<bfloat16, 256, causal_mask>(s, {}, 2, seed + 2) == paged_kernel_kind::append);
}

TEST_CASE("emulated rotary: Q and K rotated in shared memory (32-row append) and in registers (16-row kernels)") {
  const auto seed = kvtile_test::fresh_seed();
  spec s = chunk_spec();
  CHECK(run_emulated<bfloat16, 128, rotary<causal_mask>>(s, {}, 4, seed) == paged_kernel_kind::append);
  rotary<sliding_window_mask, rotary_layout::interleaved>::params inter;
  inter.window = 24;
  inter.sinks = 3;
  inter.rotary_dim = 32;
  inter.theta = 500.f;
  CHECK(run_emulated<half, 64, rotary<sliding_window_mask, rotary_layout::interleaved>>(s, inter, 2, seed + 1) ==
        paged_kernel_kind::append);
  CHECK(run_emulated<bfloat16, 256, rotary<causal_mask>>(s, {}, 2, seed + 2) == paged_kernel_kind::append);
  s.q_lens = {1, 1, 1};
  s.kv_lens = {1, 77, 300};
  s.hq = 8;
  s.hkv = 2;
  CHECK(run_emulated<bfloat16, 128, rotary<causal_mask>>(s, {}, 4, seed + 3) == paged_kernel_kind::decode);
  CHECK(run_emulated<bfloat16, 64, rotary<causal_mask, rotary_layout::interleaved>>(s, {}, 3, seed + 4) ==
        paged_kernel_kind::decode);
}

TEST_CASE("emulated fp8 decode: per-token-head and per-head scales, shared tiles and registers, rotary and soft-capping") {
  using per_token = km::fp8_e4m3<km::per_token_head>;
  using per_head = km::fp8_e4m3<km::per_head>;
  const auto seed = kvtile_test::fresh_seed();
  spec s;
  s.q_lens = {1, 1, 2};
  s.kv_lens = {5, 77, 301};
  s.hq = 8;
  s.hkv = 2;
  s.page_size = 16;
  run_emulated_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, 4, seed);
  run_emulated_fp8<half, 128, per_head, causal_mask>(s, {}, 3, seed + 1);
  s.page_size = 7;
  s.hq = 5;
  s.hkv = 1;
  run_emulated_fp8<bfloat16, 64, per_token, rotary<causal_mask>>(s, {}, 2, seed + 2);
  softcap<sliding_window_mask>::params cap;
  cap.window = 40;
  cap.sinks = 2;
  cap.cap = 5.f;
  run_emulated_fp8<half, 96, per_head, softcap<sliding_window_mask>>(s, cap, 2, seed + 3);
  // The fragment path's fp16 range: a bf16 Q of |q| ~ 2^20 or 2^-40 (a power of two per warp),
  // V of ~ 2^20 or 2^-20, and V whose per-token magnitudes differ by up to 2^8 (per-token V
  // scales counted in a tile's largest: O changes unit between tiles).
  s.page_size = 16;
  const float big = 1048576.f, tiny = 1.f / 1048576.f;
  run_emulated_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, 3, seed + 4, paged_kernel_kind::decode, big, big);
  run_emulated_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, 3, seed + 5, paged_kernel_kind::decode, tiny * tiny, tiny);
  run_emulated_fp8<bfloat16, 64, per_head, causal_mask>(s, {}, 2, seed + 6, paged_kernel_kind::decode, big, tiny);
  run_emulated_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, 1, seed + 7, paged_kernel_kind::decode, 1.f, 1.f, true);
  run_emulated_fp8<half, 128, per_token, causal_mask>(s, {}, 1, seed + 8, paged_kernel_kind::decode, 1.f, 1.f, true);
}

TEST_CASE("emulated fp8 append: fp8 tiles converted in shared memory (32-row kernel), the 16-row kernel above D 128") {
  using per_token = km::fp8_e4m3<km::per_token_head>;
  using per_head = km::fp8_e4m3<km::per_head>;
  const auto seed = kvtile_test::fresh_seed();
  spec s = chunk_spec();
  run_emulated_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, 4, seed, paged_kernel_kind::append);
  run_emulated_fp8<half, 128, per_token, causal_mask>(s, {}, 3, seed + 1, paged_kernel_kind::append);  // fp16 P, V scales' unit
  run_emulated_fp8<half, 128, per_token, causal_mask>(s, {}, 3, seed + 5, paged_kernel_kind::append, 1.f, 1.f / 4096.f, true);
  run_emulated_fp8<bfloat16, 64, per_token, rotary<causal_mask>>(s, {}, 2, seed + 2, paged_kernel_kind::append);
  s.hq = 8;
  s.hkv = 2;
  s.page_size = 16;
  softcap<sliding_window_mask>::params cap;
  cap.window = 24;
  cap.sinks = 3;
  cap.cap = 5.f;
  run_emulated_fp8<half, 64, per_head, softcap<sliding_window_mask>>(s, cap, 2, seed + 3, paged_kernel_kind::append);
  s.q_lens = {9};
  s.kv_lens = {50};
  run_emulated_fp8<bfloat16, 256, per_token, causal_mask>(s, {}, 2, seed + 4, paged_kernel_kind::decode);
}
