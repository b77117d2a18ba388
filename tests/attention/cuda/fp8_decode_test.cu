// GPU tests of paged attention over fp8 (e4m3) K/V pages: decode (attention/cuda/paged/
// decode_fp8_kernel.cuh, and the TMA kernel) and append chunks (paged/append_kernel.cuh): the pool is written by write_kv (host), the kernel's output is checked against the fp64
// reference over the *dequantised* K/V with FlashAttention's 2x rule (the naive algorithm in the
// query type over the same dequantised K/V is the baseline), poisoned outputs and pool slots,
// exact LSE, split == unsplit; the error against the unquantised K/V is reported (MESSAGE), for
// uniform K and for K with a few outlier channels, per scale granularity. Also: the device
// e4m3 conversion of all 256 codes, write_kv on the GPU against the host bit for bit, and block
// copies of an fp8 pool on the GPU.
#include <doctest/doctest.h>

#include <cstring>
#include <string>

#include "attention/cuda/paged_fixture.cuh"
#include "attention/fp8_problem.hpp"
#include "kvtile/memory/block_storage.hpp"
#include "kvtile/memory/cuda/block_copy.cuh"
#include "kvtile/memory/cuda/device_memory.cuh"
#include "kvtile/memory/cuda/fp8_convert.cuh"
#include "kvtile/memory/cuda/kv_write.cuh"
#include "kvtile/memory/kv_dequantize.hpp"
#include "kvtile/memory/kv_write.hpp"

using namespace paged_test;

namespace {

template <class Codec>
std::string codec_name() {
  return km::per_token_scales<Codec> ? "per-token-head" : "per-head";
}

// The fp8 problem over the GPU fixture's problem, planning through the protocol class.
template <class T, int D, class Codec>
struct fp8_problem : fp8_pool_problem<T, D, Codec, problem<T, D>> {
  using fp8_pool_problem<T, D, Codec, problem<T, D>>::fp8_pool_problem;
  using fp8_pool_problem<T, D, Codec, problem<T, D>>::base;
  using fp8_pool_problem<T, D, Codec, problem<T, D>>::kernel_problem;

  template <class Mask>
  kc::paged_plan plan(typename Mask::params mp, const kc::plan_options& opt) const {
    using attn = kc::paged_attention<T, D, Mask, paging::csr_page_table, Codec>;
    const typename attn::plan_arguments pa{base.q_indptr.data(),
                                           base.csr(base.kv_indptr.data(), base.indices.data(), base.last_page_len.data()),
                                           kernel_problem(), limits(), opt};
    return attn::plan(pa, mp);
  }
};

template <class T, int D, class Codec>
struct fp8_device {
  const fp8_problem<T, D, Codec>& p;
  device_buffer<unsigned char> k8, v8;
  device_buffer<float> ks, vs, lse;
  device_buffer<T> q, o;
  device_buffer<std::int32_t> q_indptr, kv_indptr, indices, last_page_len;
  device_buffer<unsigned char>* ws = nullptr;

  explicit fp8_device(const fp8_problem<T, D, Codec>& pr)
      : p(pr), k8(pr.k8), v8(pr.v8), ks(pr.k_head), vs(pr.v_head), lse(std::size_t(pr.base.q_indptr.back()) * pr.base.s.hq),
        q(pr.base.q), o(pr.base.q.size()), q_indptr(pr.base.q_indptr), kv_indptr(pr.base.kv_indptr),
        indices(pr.base.indices), last_page_len(pr.base.last_page_len) {}
  ~fp8_device() { delete ws; }

  template <class Mask>
  void run(const kc::paged_plan& plan, typename Mask::params mp, float scale) {
    delete ws;
    ws = new device_buffer<unsigned char>(std::max<std::size_t>(plan.workspace_bytes(), 256));
    kc::upload_plan(plan, ws->ptr);
    o.upload(std::vector<T>(o.n, kvtile_test::poison<T>()));
    lse.upload(std::vector<float>(lse.n, std::nanf("")));
    using attn = kc::paged_attention<T, D, Mask, paging::csr_page_table, Codec>;
    const auto ql = p.base.q_layout(q_indptr.ptr);
    const typename attn::arguments args{
        dense_tensor<T>{q.ptr, ql},
        paging::paged_kv<T, paging::csr_page_table, Codec>{p.view(k8.ptr, v8.ptr, ks.ptr, vs.ptr),
                                                           p.base.csr(kv_indptr.ptr, indices.ptr, last_page_len.ptr)},
        dense_tensor<T>{o.ptr, ql}, lse.ptr, mp, scale};
    attn::check(plan, args);
    attn::run(plan, args, ws->ptr);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

// Plan, run, check against fp64 over the dequantised K/V; report the error against the
// unquantised K/V; optionally split == unsplit. Both ways from bytes to fragments (shared T
// tiles; registers, where the head dim and variant allow) run on the same data. `append`: the
// requests pack more than 16 rows, so the plan is for the mma.sync append kernel (fp8 tiles
// converted in shared memory; the 16-row decode kernel above head dim 128) and, where the device
// and the problem allow it (head dim 128, no rotary, pages with TMA tensor maps), for the
// warp-specialised sm_90a append kernel (its producer warps convert each tile in place).
// q_mul / v_mul: Q and V scaled by these (the softmax scale divided by q_mul, so the weights stay).
template <class T, int D, class Codec, class Mask>
void check_fp8(const spec& s, typename Mask::params mp, std::uint64_t seed, bool outliers, bool compare_unsplit = false,
               bool append = false, float q_mul = 1.f, float v_mul = 1.f) {
  std::mt19937_64 rng(seed);
  const fp8_problem<T, D, Codec> pr(s, rng, outliers, q_mul, v_mul);
  const float scale = default_scale(D) / q_mul;

  // fp64 and the naive low-precision baseline, over the dequantised K/V.
  const km::dequantized_pool deq = km::dequantize(pr.host_view());
  const auto table = pr.base.csr(pr.base.kv_indptr.data(), pr.base.indices.data(), pr.base.last_page_len.data());
  const paging::paged_kv<float, paging::csr_page_table> src{deq.view, table};
  const auto ql = pr.base.q_layout(pr.base.q_indptr.data());
  const dense_tensor<T> qv{const_cast<T*>(pr.base.q.data()), ql};
  const std::size_t n_o = pr.base.q.size(), n_lse = std::size_t(pr.base.q_indptr.back()) * s.hq;
  std::vector<double> o_ref(n_o), lse_ref(n_lse);
  std::vector<T> o_low(n_o);
  reference_attention<Mask>(qv, src, s.hkv, mp, double(scale), dense_tensor<double>{o_ref.data(), ql}, lse_ref.data());
  naive_attention_lowp<Mask>(qv, src, s.hkv, mp, double(scale), dense_tensor<T>{o_low.data(), ql});
  const auto en = kvtile_test::compare(o_low, o_ref);
  // Against the unquantised K/V: what fp8 storage costs (reported, loosely bounded).
  std::vector<double> o_exact, lse_exact;
  std::vector<T> unused;
  pr.base.template reference<Mask>(mp, scale, o_exact, lse_exact, unused);

  // The cp.async kernel both ways, and the TMA kernel where the device and the problem allow it.
  constexpr bool registers_possible = D % 32 == 0 && !has_rotary<Mask>;
  const bool tma_possible = limits().wgmma && !has_rotary<Mask> && kc::decode_sm90_supported(D, s.page_size, 1) &&
                            (!append || D == 128);
  enum class path { shared_tiles, registers, tma };
  for (path way : {path::shared_tiles, path::registers, path::tma}) {
    if ((way == path::registers && !registers_possible) || (way == path::tma && !tma_possible)) continue;
    if (append && way == path::registers) continue;
    const bool registers = !append && way != path::shared_tiles;
    const char* way_name = append ? (way == path::tma ? "append, warp-specialised sm_90a" : "append, mma.sync")
                                  : way == path::tma ? "TMA kernel" : registers ? "registers" : "shared tiles";
    INFO("fp8 path: " << std::string(way_name));
    kc::plan_options opt = s.opt;
    opt.fp8_registers = registers;
    opt.use_wgmma = way == path::tma;
    const auto plan = pr.template plan<Mask>(mp, opt);
    INFO("kernel " << std::string(kc::to_string(plan.shape.kind)) << " (" << plan.reason << "), work items " << plan.work.size()
                   << ", partials " << plan.num_partials);
    const auto want = append ? (way == path::tma ? kc::paged_kernel_kind::append_sm90
                                                 : D <= 128 ? kc::paged_kernel_kind::append : kc::paged_kernel_kind::decode)
                             : (way == path::tma ? kc::paged_kernel_kind::decode_sm90 : kc::paged_kernel_kind::decode);
    CHECK(plan.shape.kind == want);
    CHECK(plan.fp8_registers == registers);
    if (append && way == path::tma) CHECK(plan.warp_specialised_append);
    fp8_device<T, D, Codec> dev(pr);
    dev.template run<Mask>(plan, mp, scale);
    const auto o = dev.o.download();
    const auto lse = dev.lse.download();
    const outcome ek = check_outputs(o, lse, o_ref, lse_ref, en.max_abs);
    const auto eq = kvtile_test::compare(o, o_exact);
    MESSAGE("fp8 " << codec_name<Codec>() << " " << std::string(element_name<T>) << " D=" << D
                   << (outliers ? " outlier K" : " uniform K") << " q x " << q_mul << " v x " << v_mul << " ("
                   << std::string(way_name) << ")"
                   << ": max |o - o(unquantised)| = " << eq.max_abs << ", relative L2 " << eq.rel_l2
                   << " (vs fp64 over dequantised: " << ek.err << ")");
    CHECK(eq.rel_l2 < 0.15);

    if (compare_unsplit) {
      kc::plan_options o2 = opt;
      o2.split_kv = false;
      const auto plan2 = pr.template plan<Mask>(mp, o2);
      CHECK(plan2.num_partials == 0);
      fp8_device<T, D, Codec> dev2(pr);
      dev2.template run<Mask>(plan2, mp, scale);
      const auto out2 = dev2.o.download();
      double diff = 0;
      for (std::size_t i = 0; i < o.size(); ++i) diff = std::max(diff, std::abs(to_double(o[i]) - to_double(out2[i])));
      INFO("split (" << plan.num_partials << " partials) vs unsplit max diff " << diff);
      CHECK(plan.num_partials > 0);
      CHECK(diff <= en.max_abs + 2e-3);
    }
  }
}

std::vector<std::int32_t> random_lens(std::mt19937_64& rng, int n, int lo, int hi) {
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<std::int32_t> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

spec decode_spec(std::mt19937_64& rng, int group, int page, kv_layout layout) {
  spec s;
  s.hkv = 2;
  s.hq = 2 * group;
  s.page_size = page;
  s.layout = layout;
  s.kv_lens = random_lens(rng, 3, 9, 700);
  s.q_lens = random_lens(rng, 3, 1, std::max(1, std::min(3, 16 / group)));  // the kernel packs at most 16 rows
  s.kv_lens[0] = 1 + int(rng() % 8);  // a very short sequence
  s.kv_lens[2] |= 1;                  // an odd length
  for (int b = 0; b < 3; ++b) s.q_lens[b] = std::min(s.q_lens[b], s.kv_lens[b]);
  return s;
}

using per_token = km::fp8_e4m3<km::per_token_head>;
using per_head = km::fp8_e4m3<km::per_head>;

// Chunks of new queries (more than 16 packed rows) against cached prefixes: the append shape.
spec append_spec(std::mt19937_64& rng, int group, int page, kv_layout layout) {
  spec s;
  s.hkv = 2;
  s.hq = 2 * group;
  s.page_size = page;
  s.layout = layout;
  s.kv_lens = random_lens(rng, 3, 100, 1500);
  s.q_lens = random_lens(rng, 3, 17, 200);
  s.kv_lens[1] |= 1;  // an odd length
  s.q_lens[2] = 1;    // a decode step in the same batch
  for (int b = 0; b < 3; ++b) s.q_lens[b] = std::min(s.q_lens[b], s.kv_lens[b]);
  return s;
}

// Groups 1, 5, 8 x pages 1, 16, 256, NHD and HND in turn, bf16 D 128 causal, both scale
// granularities, on the batches `make` draws (decode_spec or append_spec).
template <class MakeSpec>
void groups_and_pages(std::mt19937_64& rng, MakeSpec make, bool append) {
  int n = 0;
  for (int group : {1, 5, 8})
    for (int page : {1, 16, 256}) {
      const spec s = make(rng, group, page, (n++ % 2) ? kv_layout::hnd : kv_layout::nhd);
      INFO("group " << group << " page " << page << " layout " << (s.layout == kv_layout::nhd ? "NHD" : "HND") << " kv "
                    << s.kv_lens[0] << "," << s.kv_lens[1] << "," << s.kv_lens[2] << " q " << s.q_lens[0] << ","
                    << s.q_lens[1] << "," << s.q_lens[2]);
      check_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, rng(), false, false, append);
      check_fp8<bfloat16, 128, per_head, causal_mask>(s, {}, rng(), false, false, append);
    }
}

__global__ void convert_all_codes(std::uint32_t* half_out, std::uint32_t* bf16_out) {
  const std::uint32_t i = threadIdx.x;  // 64 threads: codes 4i .. 4i + 3
  const std::uint32_t x = (4 * i) | ((4 * i + 1) << 8) | ((4 * i + 2) << 16) | ((4 * i + 3) << 24);
  kvtile::memory::cuda::e4m3x4_to<kvtile::half>(x, half_out[2 * i], half_out[2 * i + 1]);
  kvtile::memory::cuda::e4m3x4_to<kvtile::bfloat16>(x, bf16_out[2 * i], bf16_out[2 * i + 1]);
}

}  // namespace

TEST_CASE("fp8: the device conversion of every e4m3 code to fp16 and bf16 is exact") {
  device_buffer<std::uint32_t> h(128), b(128);
  convert_all_codes<<<1, 64>>>(h.ptr, b.ptr);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto hv = h.download(), bv = b.download();
  for (int c = 0; c < 256; ++c) {
    INFO("code " << c);
    const float want = km::fp8::decode_e4m3(std::uint8_t(c));
    const auto hbits = std::uint16_t(hv[c / 2] >> (16 * (c % 2)));
    const auto bbits = std::uint16_t(bv[c / 2] >> (16 * (c % 2)));
    const float got_h = kvtile::half::to_float(hbits);
    kvtile::bfloat16 bb;
    bb.bits = bbits;
    const float got_b = float(bb);
    if (std::isnan(want)) {
      CHECK(std::isnan(got_h));
      CHECK(std::isnan(got_b));
    } else {
      CHECK(got_h == want);
      CHECK(got_b == want);
      CHECK(std::signbit(got_h) == std::signbit(want));
    }
  }
}

TEST_CASE("fp8: write_kv on the GPU writes the host's bits; block copies (kernel) carry the scales") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const km::kv_shape shape{2, 7, 16, 3, 128};
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd})
   for (int pad : {0, 2}) {  // token stride 384: 4 elements per lane; 386: one at a time
    INFO("layout " << (layout == kv_layout::nhd ? "NHD" : "HND") << ", token stride " << 3 * 128 + pad);
    km::block_storage<bfloat16, km::host_memory, per_token> host(shape, layout);
    km::block_storage<bfloat16, km::cuda::device_memory, per_token> gpu(shape, layout);
    const int n = 40, stride = 3 * 128 + pad;
    auto k = kvtile_test::random_vector<bfloat16>(std::size_t(n) * stride, rng, -5.f, 5.f);
    auto v = kvtile_test::random_vector<bfloat16>(std::size_t(n) * stride, rng, -5.f, 5.f);
    std::vector<std::int64_t> slots(n);
    for (int i = 0; i < n; ++i) slots[i] = (i * 37) % (7 * 16);
    slots[5] = -1;
    device_buffer<bfloat16> dk(k), dv(v);
    device_buffer<std::int64_t> ds(slots);
    for (int l = 0; l < 2; ++l) {
      host.memory().write_kv(host.layer(l), k.data(), v.data(), stride, slots.data(), n);
      gpu.memory().write_kv(gpu.layer(l), dk.ptr, dv.ptr, stride, ds.ptr, n);
    }
    const std::vector<km::block_copy> copies{{1, 4, 16}, {2, 6, 5}};
    host.memory().copy_blocks(host.pools(), copies);
    gpu.memory().copy_blocks(gpu.pools(), copies);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<unsigned char> gk(gpu.bytes_per_pool()), gv(gpu.bytes_per_pool());
    KVTILE_CUDA_CHECK(cudaMemcpy(gk.data(), gpu.k_data(), gk.size(), cudaMemcpyDeviceToHost));
    KVTILE_CUDA_CHECK(cudaMemcpy(gv.data(), gpu.v_data(), gv.size(), cudaMemcpyDeviceToHost));
    CHECK(std::memcmp(gk.data(), host.k_data(), gk.size()) == 0);
    CHECK(std::memcmp(gv.data(), host.v_data(), gv.size()) == 0);
    CHECK(std::memcmp(gk.data(), host.k_data(), gk.size()) == 0);
  }
}

TEST_CASE("fp8 decode: group sizes 1, 5, 8; pages 1, 16, 256; NHD and HND; bf16 D=128 causal; both scale granularities") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  groups_and_pages(rng, decode_spec, false);
}

TEST_CASE("fp8 decode: error against unquantised K/V, uniform and outlier K, per scale granularity") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  spec s;
  s.hkv = 8;
  s.hq = 32;
  s.page_size = 16;
  s.kv_lens = {1000, 2048, 333};
  s.q_lens = {1, 1, 1};
  for (bool outliers : {false, true}) {
    check_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, rng(), outliers);
    check_fp8<bfloat16, 128, per_head, causal_mask>(s, {}, rng(), outliers);
  }
}

TEST_CASE("fp8 decode: fp16 queries, D=64, a sliding window with sinks") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int page : {16, 256}) {
    const spec s = decode_spec(rng, 4, page, kv_layout::nhd);
    INFO("page " << page);
    check_fp8<kvtile::half, 128, per_token, causal_mask>(s, {}, rng(), false);
    check_fp8<bfloat16, 64, per_token, causal_mask>(s, {}, rng(), true);
    check_fp8<bfloat16, 128, per_token, sliding_window_mask>(s, {100, 4}, rng(), false);
  }
}

TEST_CASE("fp8 decode and append: queries and values far outside fp16's range (the register paths compute in fp16)") {
  // The register and TMA paths convert a bf16 Q to fp16 fragments times a power of two per warp
  // and keep per-token-scaled fp16 probabilities in [0, 1] (O counted in a tile's largest V
  // scale): |q| ~ 2^20 and ~ 2^-40 (fp16: max 65504, smallest subnormal 2^-24), |v| ~ 2^20 and
  // ~ 2^-20 (P times a V scale of 2^20 / 448 overflows fp16; of 2^-20 / 448 it is subnormal).
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const spec s = decode_spec(rng, 4, 16, kv_layout::nhd);
  const float big = 1048576.f, tiny = 1.f / 1048576.f;
  for (const auto& [qm, vm] : {std::pair{big, big}, std::pair{tiny * tiny, tiny}, std::pair{1.f, tiny}}) {
    INFO("q x " << qm << ", v x " << vm);
    check_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, rng(), false, false, false, qm, vm);
    check_fp8<bfloat16, 128, per_head, causal_mask>(s, {}, rng(), false, false, false, qm, vm);
  }
  // fp16 inputs: small V (large ones are not fp16), decode and append.
  check_fp8<kvtile::half, 128, per_token, causal_mask>(s, {}, rng(), false, false, false, 1.f, 1.f / 4096.f);
  const spec a = append_spec(rng, 4, 16, kv_layout::hnd);
  check_fp8<kvtile::half, 128, per_token, causal_mask>(a, {}, rng(), false, false, true, 1.f, 1.f / 4096.f);
  check_fp8<bfloat16, 128, per_token, causal_mask>(a, {}, rng(), false, false, true, big, big);
  // Per-head scales under a bf16 Q: the warp-specialised append kernel multiplies fp16 tiles,
  // Q taken into fp16 a warp at a time.
  check_fp8<bfloat16, 128, per_head, causal_mask>(a, {}, rng(), false, false, true, big, big);
  check_fp8<bfloat16, 128, per_head, causal_mask>(a, {}, rng(), false, false, true, tiny * tiny, tiny);
}

TEST_CASE("fp8 decode: variants (soft-capping, rotary at cache positions) and a head dim that is not a multiple of 32") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const spec s = decode_spec(rng, 5, 16, kv_layout::hnd);
  softcap<causal_mask>::params cap;
  cap.cap = 2.f;
  check_fp8<bfloat16, 128, per_token, softcap<causal_mask>>(s, cap, rng(), false);
  rotary<causal_mask>::params rope;  // rotary keeps to the shared-tile path (fragments in head-dim order)
  check_fp8<bfloat16, 128, per_token, rotary<causal_mask>>(s, rope, rng(), false);
  check_fp8<bfloat16, 80, per_head, causal_mask>(s, {}, rng(), false);  // 5 chunks per row: the general load map
}

TEST_CASE("fp8 decode: split-KV equals unsplit on long sequences") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int group : {4, 7}) {
    spec s;
    s.hkv = 2;
    s.hq = 2 * group;
    s.page_size = 16;
    s.kv_lens = {4999, 3001};
    s.q_lens = {1, 2};
    s.layout = group == 4 ? kv_layout::nhd : kv_layout::hnd;
    INFO("group " << group);
    check_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, rng(), false, /*compare_unsplit=*/true);
    check_fp8<bfloat16, 128, per_head, causal_mask>(s, {}, rng(), false, /*compare_unsplit=*/true);
  }
}

TEST_CASE("fp8 decode: a batch of about one row tile per SM (per-token scales: split to two CTAs per SM on the TMA kernel)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  spec s;
  s.hkv = 2;
  s.hq = 8;
  s.page_size = 16;
  std::uniform_int_distribution<int> len(200, 900);
  s.kv_lens.clear();
  for (int b = 0; b < 64; ++b) s.kv_lens.push_back(len(rng));  // 128 row tiles
  s.q_lens.assign(64, 1);
  check_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, rng(), false, /*compare_unsplit=*/true);
  check_fp8<bfloat16, 128, per_head, causal_mask>(s, {}, rng(), false);  // one item per CTA on the TMA kernel, unsplit
}

TEST_CASE("fp8 append: chunks over cached prefixes (mma.sync and warp-specialised sm_90a append kernels); groups 1, 5, 8; pages 1, 16, 256; both scale granularities") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  groups_and_pages(rng, append_spec, true);
}

TEST_CASE("fp8 append: long chunks over long prefixes at GQA 8 (several key tiles per item, splits), NHD and HND pages") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int page : {16, 64}) {
    spec s;
    s.hkv = 2;
    s.hq = 16;
    s.page_size = page;
    s.kv_lens = {4097, 1301, 640};
    s.q_lens = {300, 77, 640};
    s.layout = page == 16 ? kv_layout::nhd : kv_layout::hnd;
    INFO("page " << page);
    check_fp8<bfloat16, 128, per_token, causal_mask>(s, {}, rng(), false, false, true);
    check_fp8<bfloat16, 128, per_head, causal_mask>(s, {}, rng(), true, false, true);
    check_fp8<kvtile::half, 128, per_head, causal_mask>(s, {}, rng(), false, false, true);
  }
}

TEST_CASE("fp8 append: fp16 (probabilities in the V scales' unit), D 64 / 96, outlier K, a window with sinks, rotary, soft-capping, D 256") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const spec s = append_spec(rng, 4, 16, kv_layout::nhd);
  check_fp8<kvtile::half, 128, per_token, causal_mask>(s, {}, rng(), false, false, true);
  check_fp8<kvtile::half, 64, per_head, causal_mask>(s, {}, rng(), true, false, true);
  check_fp8<bfloat16, 96, per_token, sliding_window_mask>(s, {100, 4}, rng(), false, false, true);  // 6 chunks a row
  rotary<causal_mask>::params rope;
  check_fp8<bfloat16, 128, per_token, rotary<causal_mask>>(s, rope, rng(), false, false, true);
  softcap<causal_mask>::params cap;
  cap.cap = 2.f;
  check_fp8<bfloat16, 64, per_token, softcap<causal_mask>>(s, cap, rng(), false, false, true);
  check_fp8<bfloat16, 256, per_token, causal_mask>(s, {}, rng(), false, false, true);  // the 16-row decode kernel
}

TEST_CASE("fp8: plans and runs refuse what the fp8 kernels cannot take, naming it") {
  std::mt19937_64 rng(3);
  // A plan for 2-byte pages does not run an fp8 pool.
  spec s2;
  s2.kv_lens = {100};
  s2.q_lens = {1};
  const fp8_problem<bfloat16, 128, per_token> pr2(s2, rng, false);
  using attn = kc::paged_attention<bfloat16, 128, causal_mask, paging::csr_page_table, per_token>;
  typename attn::plan_arguments pa{pr2.base.q_indptr.data(),
                                   pr2.base.csr(pr2.base.kv_indptr.data(), pr2.base.indices.data(), pr2.base.last_page_len.data()),
                                   pr2.base.kernel_problem(), limits(), {}};
  kvtile_test::expect_error(errc::invalid_argument, "elem_bytes", [&] { (void)attn::plan(pa, {}); });
  // A plan for 2-byte pages given an fp8 pool at run time; a per-head pool without its scales.
  const kc::paged_plan bf16_plan = pr2.base.template plan<causal_mask>({}, limits());
  fp8_device<bfloat16, 128, per_token> dev(pr2);
  const auto ql = pr2.base.q_layout(dev.q_indptr.ptr);
  const attn::arguments args{dense_tensor<bfloat16>{dev.q.ptr, ql},
                             paging::paged_kv<bfloat16, paging::csr_page_table, per_token>{
                                 pr2.view(dev.k8.ptr, dev.v8.ptr, nullptr, nullptr),
                                 pr2.base.csr(dev.kv_indptr.ptr, dev.indices.ptr, dev.last_page_len.ptr)},
                             dense_tensor<bfloat16>{dev.o.ptr, ql}, dev.lse.ptr, {}, 0.1f};
  kvtile_test::expect_error(errc::invalid_argument, "2-byte K/V elements", [&] { attn::check(bf16_plan, args); });
  const fp8_problem<bfloat16, 128, per_head> pr3(s2, rng, false);
  using attn_head = kc::paged_attention<bfloat16, 128, causal_mask, paging::csr_page_table, per_head>;
  const auto head_plan = pr3.plan<causal_mask>({}, {});
  fp8_device<bfloat16, 128, per_head> dev3(pr3);
  const attn_head::arguments no_scales{dense_tensor<bfloat16>{dev3.q.ptr, ql},
                                       paging::paged_kv<bfloat16, paging::csr_page_table, per_head>{
                                           pr3.view(dev3.k8.ptr, dev3.v8.ptr, nullptr, nullptr),
                                           pr3.base.csr(dev3.kv_indptr.ptr, dev3.indices.ptr, dev3.last_page_len.ptr)},
                                       dense_tensor<bfloat16>{dev3.o.ptr, ql}, dev3.lse.ptr, {}, 0.1f};
  kvtile_test::expect_error(errc::invalid_argument, "needs its K and V scales", [&] { attn_head::check(head_plan, no_scales); });
}
