// Attention variants (attention/variant.hpp): each transform against an fp64 answer that applies
// it explicitly (Q and K rotated by hand here, the cap written out here, then plain attention),
// through the library's references and the CPU backend, dense and paged, with odd lengths, GQA
// groups 1, 5, 8, both rotary layouts, composed with masks (one of them defined here), and RoPE
// at cache positions against a [sinks + window] cache built explicitly.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/cpu/attention_cases.hpp"
#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/attention/variant.hpp"

using namespace kvtile_test;
namespace cpu = kvtile::attention::cpu;

namespace {

// A mask the library does not ship: prefix-LM, the first `prefix` keys visible to every query
// (bidirectional prompt), the rest causal (bottom-right aligned, as mask.hpp).
struct prefix_lm_mask {
  struct params {
    int prefix = 0;
  };
  static constexpr const char* name = "prefix_lm";
  int offset, kv_len, prefix;

  prefix_lm_mask(params p, int q_len, int kv_len_) : offset(kv_len_ - q_len), kv_len(kv_len_), prefix(p.prefix) {}
  bool visible(int i, int j) const { return j < prefix || j <= i + offset; }
  tile_visibility classify(int q0, int q1, int k0, int k1) const {
    if (k1 <= prefix || k1 - 1 <= q0 + offset) return tile_visibility::full;
    if (k0 >= prefix && k0 > q1 - 1 + offset) return tile_visibility::empty;
    return tile_visibility::partial;
  }
  int kv_begin(int, int) const { return 0; }
  int kv_end(int, int q1) const { return max_i(0, min_i(kv_len, max_i(prefix, q1 + offset))); }
};
static_assert(mask_policy<prefix_lm_mask> && attention_variant<rotary<prefix_lm_mask>>);

// What a test case applies by hand.
struct transforms {
  bool rotate = false;
  bool interleaved = false;
  int rotary_dim = 0;  // 0: the head dim
  double theta = 10000;
  double cap = 0;  // 0: no soft-capping
};

// x[0, d) rotated by hand at position pos: pairs (k, k + R/2) or (2k, 2k + 1) turned by the angle
// pos * theta^(-2k / R), written out here rather than taken from the library.
void rotate_by_hand(double* x, int d, int pos, const transforms& t) {
  const int r = t.rotary_dim == 0 ? d : t.rotary_dim;
  for (int k = 0; k < r / 2; ++k) {
    const double angle = pos * std::pow(t.theta, -2.0 * k / r);
    const int a = t.interleaved ? 2 * k : k, b = t.interleaved ? 2 * k + 1 : k + r / 2;
    const double x0 = x[a], x1 = x[b];
    x[a] = x0 * std::cos(angle) - x1 * std::sin(angle);
    x[b] = x1 * std::cos(angle) + x0 * std::sin(angle);
  }
}

// Plain fp64 attention of a dense problem with the transforms applied explicitly: Q row i of a
// sequence rotated at i + kv_len - q_len, key j at j; the cap on each scaled score; then the
// plain mask and softmax. Returns o [tokens, hq, d] and the natural-log LSE [tokens, hq].
template <class Mask, class T>
exact_answer<Mask, T> explicit_forward(const problem<T>& p, typename Mask::params mp, double scale,
                                       const transforms& t) {
  exact_answer<Mask, T> e;
  e.o.assign(p.q_elems(), 0);
  e.lse.assign(p.lse_elems(), 0);
  const int d = p.d, group = p.hq / p.hk;
  for (int b = 0; b < p.batch(); ++b) {
    const int q_len = p.q_indptr[b + 1] - p.q_indptr[b], kv_len = p.kv_indptr[b + 1] - p.kv_indptr[b];
    const Mask mask(mp, q_len, kv_len);
    std::vector<double> k(std::size_t(kv_len) * p.hk * d), q(d), s(kv_len);
    for (int j = 0; j < kv_len; ++j)
      for (int h = 0; h < p.hk; ++h) {
        double* kr = &k[(std::size_t(j) * p.hk + h) * d];
        for (int x = 0; x < d; ++x) kr[x] = to_double(p.k[((std::size_t(p.kv_indptr[b]) + j) * p.hk + h) * d + x]);
        if (t.rotate) rotate_by_hand(kr, d, j, t);
      }
    for (int i = 0; i < q_len; ++i)
      for (int h = 0; h < p.hq; ++h) {
        const std::size_t row = std::size_t(p.q_indptr[b]) + i;
        for (int x = 0; x < d; ++x) q[x] = to_double(p.q[(row * p.hq + h) * d + x]);
        if (t.rotate) rotate_by_hand(q.data(), d, i + kv_len - q_len, t);
        double mx = -std::numeric_limits<double>::infinity();
        for (int j = 0; j < kv_len; ++j) {
          double dot = 0;
          for (int x = 0; x < d; ++x) dot += q[x] * k[(std::size_t(j) * p.hk + h / group) * d + x];
          double sc = dot * scale;
          if (t.cap > 0) sc = t.cap * std::tanh(sc / t.cap);
          s[j] = mask.visible(i, j) ? sc : -std::numeric_limits<double>::infinity();
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        double* o = &e.o[(row * p.hq + h) * d];
        for (int j = 0; j < kv_len; ++j) {
          if (s[j] == -std::numeric_limits<double>::infinity()) continue;
          const double w = std::exp(s[j] - mx);
          sum += w;
          for (int x = 0; x < d; ++x) o[x] += w * to_double(p.v[((std::size_t(p.kv_indptr[b]) + j) * p.hk + h / group) * d + x]);
        }
        for (int x = 0; x < d && sum > 0; ++x) o[x] /= sum;
        e.lse[row * p.hq + h] = sum > 0 ? mx + std::log(sum) : -std::numeric_limits<double>::infinity();
      }
  }
  return e;
}

template <class Variant, class T>
std::vector<T> run_cpu(const problem<T>& p, const auto& kv, typename Variant::params vp, float scale,
                       std::vector<float>& lse) {
  std::vector<T> o(p.q_elems(), poison<T>());
  lse.assign(p.lse_elems(), std::numeric_limits<float>::quiet_NaN());
  cpu::attention_forward<tile_shape<32, 64>, 64, Variant>(p.q_view(), kv, p.hk, vp, scale,
                                                          dense_tensor<T>{o.data(), p.q_layout()}, lse.data());
  return o;
}

// One variant on one problem: the library's fp64 reference equals the explicit answer; the
// naive low-precision one (with the same transforms) sets the error bar; the CPU kernel on the
// dense source and through a shuffled paged CSR meets FlashAttention's 2x rule against it.
// (The explicit answer takes only visible() from the variant: the plain mask's hook.)
template <class Variant, class T>
void check_variant_case(std::mt19937_64& rng, const std::vector<int>& q_lens, const std::vector<int>& kv_lens, int hq,
                        int hk, typename Variant::params vp, const transforms& t) {
  constexpr int D = 64;
  INFO("variant " << std::string(Variant::name) << ", " << std::string(element_name<T>) << ", heads " << hq << "/"
                  << hk << ", q_len[0] " << q_lens[0] << ", kv_len[0] " << kv_lens[0]);
  const auto p = make_problem<T>(rng, q_lens, kv_lens, hq, hk, D, 2.f);
  const float scale = 1.f / std::sqrt(float(D));
  auto exact = explicit_forward<Variant>(p, vp, scale, t);

  std::vector<double> ref_o(p.q_elems()), ref_lse(p.lse_elems());
  reference_attention<Variant>(p.q_view(), p.kv_view(), hk, vp, scale, dense_tensor<double>{ref_o.data(), p.q_layout()},
                               ref_lse.data());
  const auto ref_err = compare(ref_o, exact.o);
  CHECK(ref_err.max_abs < 1e-9);
  for (std::size_t i = 0; i < ref_lse.size(); ++i)
    if (std::isinf(exact.lse[i])) CHECK(std::isinf(ref_lse[i]));
    else CHECK(std::abs(ref_lse[i] - exact.lse[i]) < 1e-9);

  std::vector<T> naive(p.q_elems());
  naive_attention_lowp<Variant>(p.q_view(), p.kv_view(), hk, vp, scale, dense_tensor<T>{naive.data(), p.q_layout()});
  exact.naive_err = compare(naive, exact.o).max_abs;

  std::vector<float> lse;
  {
    INFO("dense");
    check_rule(run_cpu<Variant>(p, p.kv_view(), vp, scale, lse), lse, exact);
  }
  {
    INFO("paged CSR, page size 16");
    const auto paged = make_paged(p, 16, kv_layout::nhd, rng);
    check_rule(run_cpu<Variant>(p, paged.csr(), vp, scale, lse), lse, exact);
  }
}

// Odd lengths (1, 17, 1000), GQA groups 1, 5, 8 for one variant.
template <class Variant, class T>
void odd_lengths_and_groups(std::mt19937_64& rng, typename Variant::params vp, const transforms& t) {
  const int groups[][2] = {{1, 1}, {5, 1}, {16, 2}};
  const int lens[][2] = {{1, 1}, {17, 17}, {1, 1000}, {17, 1000}, {1000, 1000}};
  int n = 0;
  for (const auto& l : lens) {
    const auto& g = l[0] == 1000 ? groups[0] : groups[n++ % 3];
    check_variant_case<Variant, T>(rng, {l[0]}, {l[1]}, g[0], g[1], vp, t);
  }
  // A varlen batch: a decode row, a chunk after a prefix, an empty query, a prefill.
  check_variant_case<Variant, T>(rng, {1, 17, 0, 33}, {40, 100, 9, 33}, 8, 1, vp, t);
}

}  // namespace

TEST_CASE_TEMPLATE("variants: rotary (both layouts) against Q and K rotated by hand", T, float, bfloat16) {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  odd_lengths_and_groups<rotary<causal_mask>, T>(rng, {}, {.rotate = true});
  odd_lengths_and_groups<rotary<causal_mask, rotary_layout::interleaved>, T>(rng, {}, {.rotate = true, .interleaved = true});
  // No mask; a partial rotary dim and another theta.
  check_variant_case<rotary<no_mask>, T>(rng, {17}, {45}, 5, 1, {{}, 500000.f, 32},
                                         {.rotate = true, .rotary_dim = 32, .theta = 500000});
  check_variant_case<rotary<no_mask, rotary_layout::interleaved>, T>(
      rng, {17}, {45}, 8, 1, {{}, 10000.f, 16}, {.rotate = true, .interleaved = true, .rotary_dim = 16});
}

TEST_CASE_TEMPLATE("variants: softcap, alone and composed with rotary and masks", T, float, bfloat16) {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Scores of |q . k| * scale up to ~30 (inputs in [-2, 2]): a cap of 5 bends most of them.
  odd_lengths_and_groups<softcap<causal_mask>, T>(rng, {{}, 5.f}, {.cap = 5});
  odd_lengths_and_groups<softcap<rotary<causal_mask>>, T>(rng, {{{}, 10000.f, 0}, 5.f}, {.rotate = true, .cap = 5});
  check_variant_case<softcap<sliding_window_mask>, T>(rng, {17}, {1000}, 5, 1, {{37, 4}, 3.f}, {.cap = 3});
  check_variant_case<softcap<rotary<sliding_window_mask, rotary_layout::interleaved>>, T>(
      rng, {33}, {200}, 8, 1, {{{20, 3}, 10000.f, 0}, 2.f}, {.rotate = true, .interleaved = true, .cap = 2});
  check_variant_case<softcap<no_mask>, T>(rng, {1}, {1000}, 16, 2, {{}, 50.f}, {.cap = 50});
}

TEST_CASE("variants: a mask defined outside the library, composed with rotary") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  using V = rotary<prefix_lm_mask>;
  // A prompt of 40 bidirectional keys, then causal; the prefix inside and beyond one key tile.
  check_variant_case<V, float>(rng, {40}, {40}, 5, 1, {{10}, 10000.f, 0}, {.rotate = true});
  check_variant_case<V, bfloat16>(rng, {100}, {100}, 8, 1, {{70}, 10000.f, 0}, {.rotate = true});
  check_variant_case<V, float>(rng, {17}, {1000}, 1, 1, {{300}, 10000.f, 0}, {.rotate = true});
  check_variant_case<softcap<rotary<prefix_lm_mask, rotary_layout::interleaved>>, bfloat16>(
      rng, {1, 64}, {1000, 64}, 5, 1, {{{33}, 10000.f, 0}, 5.f}, {.rotate = true, .interleaved = true, .cap = 5});
}

TEST_CASE_TEMPLATE("variants: rotary at cache positions through a page table that skips evicted blocks", T, float,
                   bfloat16) {
  // StreamingLLM: a long sequence keeps its first `sink` blocks and its last `window` blocks; the
  // middle is evicted. Keys are stored before rotation, so the kernel rotates each at its cache
  // position (its index in the sequence's page list), and the query at the end of that cache.
  // Reference: a new dense cache of exactly those keys, rotated by hand at positions 0, 1, ...
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  constexpr int D = 64, page = 16, sink_blocks = 1, window_blocks = 5;
  for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved})
    for (const auto& g : {std::pair{1, 1}, std::pair{5, 1}, std::pair{16, 2}}) {
      const bool interleaved = layout == rotary_layout::interleaved;
      INFO((interleaved ? "interleaved" : "half-split") << ", heads " << g.first << "/" << g.second);
      // Two sequences of 1000 and 333 tokens (last blocks partly filled), 1 and 17 new queries.
      const std::vector<int> full_lens{1000, 333}, q_lens{1, 17};
      const auto full = make_problem<T>(rng, q_lens, full_lens, g.first, g.second, D);
      const auto paged = make_paged(full, page, kv_layout::hnd, rng);

      // The page list after eviction, and the dense [sinks + window] cache it describes.
      problem<T> kept = full;
      kept.kv_indptr = {0};
      kept.k.clear();
      kept.v.clear();
      std::vector<std::int32_t> indptr{0}, indices;
      for (int b = 0; b < 2; ++b) {
        const int blocks = paged.indptr[b + 1] - paged.indptr[b];
        int len = 0;
        for (int i = 0; i < blocks; ++i) {
          if (i >= sink_blocks && i < blocks - window_blocks) continue;  // evicted
          indices.push_back(paged.indices[paged.indptr[b] + i]);
          const int n = i == blocks - 1 ? paged.last_page_len[b] : page;
          for (int tkn = i * page; tkn < i * page + n; ++tkn) {
            const std::size_t src = (std::size_t(full.kv_indptr[b]) + tkn) * full.hk * D;
            kept.k.insert(kept.k.end(), &full.k[src], &full.k[src] + std::size_t(full.hk) * D);
            kept.v.insert(kept.v.end(), &full.v[src], &full.v[src] + std::size_t(full.hk) * D);
          }
          len += n;
        }
        indptr.push_back(std::int32_t(indices.size()));
        kept.kv_indptr.push_back(kept.kv_indptr.back() + len);
      }
      kept.fixed = false;
      REQUIRE(kept.kv_indptr[1] == (sink_blocks + window_blocks - 1) * page + 1000 % page);
      const paging::paged_kv<const T, paging::csr_page_table> evicted{
          paged.pool, {indptr.data(), indices.data(), paged.last_page_len.data(), 2}};

      const float scale = 0.125f;
      const transforms t{.rotate = true, .interleaved = interleaved};
      auto run = [&]<class V>() {
        INFO("variant " << std::string(V::name));
        auto exact = explicit_forward<V>(kept, {}, scale, t);
        std::vector<T> naive(kept.q_elems());
        naive_attention_lowp<V>(kept.q_view(), kept.kv_view(), kept.hk, {}, scale,
                                dense_tensor<T>{naive.data(), kept.q_layout()});
        exact.naive_err = compare(naive, exact.o).max_abs;
        std::vector<float> lse;
        check_rule(run_cpu<V>(kept, evicted, {}, scale, lse), lse, exact);
      };
      if (interleaved) {
        run.template operator()<rotary<causal_mask, rotary_layout::interleaved>>();
        run.template operator()<rotary<no_mask, rotary_layout::interleaved>>();
      } else {
        run.template operator()<rotary<causal_mask>>();
        run.template operator()<rotary<no_mask>>();
      }
    }
}

TEST_CASE("variants: the pair math in fp32 follows the fp64 formula") {
  // The kernels' fp32 angle (float(pos) * inv_freq) against the exact one: the error grows with
  // the position (an ulp of the angle), ~1e-4 at position 1000; and no error at position 0.
  std::mt19937_64 rng(fresh_seed());
  for (auto pos : {0, 1, 17, 1000, 4095}) {
    std::vector<float> x32 = random_vector<float>(128, rng);
    std::vector<double> x64(x32.begin(), x32.end()), before = x64;
    std::vector<float> inv(64);
    for (int k = 0; k < 64; ++k) inv[k] = rotary_inv_freq(k, 128, 10000.f);
    rotary_rotate_row<rotary_layout::half_split>(x32.data(), 128, pos, inv.data());
    rotary_rotate_row_f64<rotary_layout::half_split>(x64.data(), 128, pos, 10000.0);
    double err = 0, n0 = 0, n1 = 0;
    for (int i = 0; i < 128; ++i) {
      err = std::max(err, std::abs(double(x32[i]) - x64[i]));
      n0 += before[i] * before[i];
      n1 += x64[i] * x64[i];
    }
    INFO("position " << pos);
    CHECK(err <= (pos == 0 ? 0.0 : 2e-6 * (1 + pos)));
    CHECK(std::abs(n0 - n1) < 1e-9 * n0);  // a rotation keeps the norm
  }
}

TEST_CASE("variants: hooks are detected by their traits, names compose") {
  static_assert(has_rotary<rotary<causal_mask>> && !has_logit_transform<rotary<causal_mask>>);
  static_assert(has_logit_transform<softcap<causal_mask>> && !has_rotary<softcap<causal_mask>>);
  static_assert(has_rotary<softcap<rotary<prefix_lm_mask>>> && has_logit_transform<softcap<rotary<prefix_lm_mask>>>);
  static_assert(!has_transforms<prefix_lm_mask> && !has_transforms<no_mask>);
  static_assert(rotary<causal_mask, rotary_layout::interleaved>::rotary_layout_v == rotary_layout::interleaved);
  CHECK(std::string(softcap<rotary<causal_mask>>::name) == "softcap(rotary(causal))");
  CHECK(std::string(rotary<prefix_lm_mask, rotary_layout::interleaved>::name) == "rotary_interleaved(prefix_lm)");

  // Positions: bottom-right aligned queries, keys at their index.
  const rotary<sliding_window_mask> v({{8, 2}, 10000.f, 0}, 3, 10);
  CHECK(v.query_position(0) == 7);
  CHECK(v.key_position(4) == 4);
  CHECK(v.rotary_dims(128) == 128);
  CHECK(v.window == 8);  // the inner mask's parameters pass through
  CHECK(v.visible(2, 9));
  CHECK_FALSE(v.visible(0, 8));

  // softcap: bounded by the cap, odd, ~identity for small scores; nested caps compose.
  const softcap<causal_mask> c({{}, 10.f}, 1, 1);
  CHECK(c.logit(1e4f) <= 10.f);
  CHECK(c.logit(-3.f) == doctest::Approx(-10 * std::tanh(0.3)).epsilon(1e-6));
  CHECK(c.logit(1e-3f) == doctest::Approx(1e-3).epsilon(1e-5));
  const softcap<softcap<causal_mask>> cc({{{}, 10.f}, 4.f}, 1, 1);
  CHECK(cc.logit(7.f) == doctest::Approx(4 * std::tanh(10 * std::tanh(0.7) / 4)).epsilon(1e-6));
  CHECK(apply_logit_base2(c, 2.f * log2e) == doctest::Approx(c.logit(2.f) * log2e).epsilon(1e-6));
  CHECK(apply_logit_base2(causal_mask({}, 1, 1), 3.5f) == 3.5f);
}

TEST_CASE("variants: bad parameters are refused with their value named, outputs untouched") {
  std::mt19937_64 rng(fresh_seed());
  const auto p = make_problem<float>(rng, {5}, {9}, 2, 1, 64);
  auto expect_refused = [&]<class V>(typename V::params vp, const char* needle) {
    std::vector<float> o(p.q_elems(), 7.f), lse(p.lse_elems(), 7.f);
    try {
      cpu::attention_forward<tile_shape<32, 64>, 64, V>(p.q_view(), p.kv_view(), 1, vp, 0.1f,
                                                        dense_tensor<float>{o.data(), p.q_layout()}, lse.data());
      FAIL("accepted bad parameters of " << V::name);
    } catch (const kvtile::error& e) {
      CHECK(e.code() == errc::invalid_argument);
      INFO(e.what());
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
    }
    CHECK(std::all_of(o.begin(), o.end(), [](float x) { return x == 7.f; }));
    CHECK(std::all_of(lse.begin(), lse.end(), [](float x) { return x == 7.f; }));
    std::vector<double> ro(p.q_elems());
    CHECK_THROWS_AS(reference_attention<V>(p.q_view(), p.kv_view(), 1, vp, 0.1, dense_tensor<double>{ro.data(), p.q_layout()}),
                    kvtile::error);
  };
  expect_refused.template operator()<rotary<causal_mask>>({{}, 10000.f, 33}, "33");     // odd
  expect_refused.template operator()<rotary<causal_mask>>({{}, 10000.f, 66}, "66");     // > head dim
  expect_refused.template operator()<rotary<causal_mask>>({{}, 10000.f, -2}, "-2");     // negative
  expect_refused.template operator()<rotary<causal_mask>>({{}, 0.f, 0}, "theta");
  expect_refused.template operator()<softcap<causal_mask>>({{}, 0.f}, "cap");
  expect_refused.template operator()<softcap<causal_mask>>({{}, -5.f}, "-5");
  expect_refused.template operator()<softcap<rotary<causal_mask>>>({{{}, 10000.f, 7}, 30.f}, "7");  // inner check
}
