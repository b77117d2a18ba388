// Host side of the fp8 paged attention tests: a paged problem (paged_problem.hpp) whose K and V
// are quantised into e4m3 pools by write_kv_host, per-token-head or per-head scales (the latter
// calibrated as amax / 448 over the pool), unused slots poisoned. The GPU tests
// (cuda/fp8_decode_test.cu) and the host emulation of the kernels share it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "attention/paged_problem.hpp"
#include "kvtile/memory/kv_codec.hpp"
#include "kvtile/memory/kv_write.hpp"

namespace paged_test {

namespace km = kvtile::memory;

// A paged problem whose K and V are then written into fp8 pools by write_kv_host. Base: the
// problem type (host_problem, or the GPU fixture's problem, which also plans).
template <class T, int D, class Codec, class Base = host_problem<T, D>>
struct fp8_pool_problem {
  Base base;
  km::kv_pool_view<e4m3, Codec> shape;  // strides; pointers unset
  std::vector<unsigned char> k8, v8;    // num_blocks * stride_block bytes; unused slots poisoned (0xff: NaN)
  std::vector<float> k_head, v_head;    // per_head: [hkv] calibrated as amax / 448 over the pool

  // q_mul / v_mul: Q and V times these (powers of two keep the inputs exact), before quantising.
  // v_spread: each run of 16 tokens' V rows times its own power of two in [2^-4, 2^4], so
  // per-token V scales differ between the tiles of a sequence (as value norms do in models).
  fp8_pool_problem(const spec& s, std::mt19937_64& rng, bool outliers, float q_mul = 1.f, float v_mul = 1.f,
                   bool v_spread = false)
      : base(s, rng) {
    if (q_mul != 1.f)
      for (auto& x : base.q) x = from_float<T>(to_float(x) * q_mul);
    if (v_mul != 1.f)
      for (auto& x : base.v) x = from_float<T>(to_float(x) * v_mul);
    if (outliers)  // a few channels 20x larger, as LLM keys have
      for (std::size_t i = 0; i < base.k.size(); ++i) {
        const int x = int(i % D);
        if (x == 3 || x == D / 2 + 1 || x == D - 5) base.k[i] = from_float<T>(to_float(base.k[i]) * 20.f);
      }
    shape = km::kv_pool_view<e4m3, Codec>::make(nullptr, nullptr, s.layout, base.num_blocks, s.page_size, s.hkv, D);
    const std::size_t bytes = std::size_t(base.num_blocks) * std::size_t(shape.stride_block);
    k8.assign(bytes, 0xff);
    v8.assign(bytes, 0xff);
    // The tokens in pool order, token-major [n, hkv, D], and their slots.
    std::vector<T> kin, vin;
    std::vector<std::int64_t> slots;
    const auto tview = base.pool_view(base.k.data(), base.v.data());
    k_head.assign(std::size_t(s.hkv), 0.f);
    v_head.assign(std::size_t(s.hkv), 0.f);
    for (std::int32_t b = 0; b < base.batch; ++b)
      for (std::int32_t t = 0; t < s.kv_lens[b]; ++t) {
        const std::int32_t blk = base.indices[base.kv_indptr[b] + t / s.page_size];
        slots.push_back(std::int64_t(blk) * s.page_size + t % s.page_size);
        for (std::int32_t h = 0; h < s.hkv; ++h) {
          if (v_spread)
            for (int x = 0; x < D; ++x) {
              T& e = base.v[tview.offset(blk, t % s.page_size, h) + x];
              e = from_float<T>(std::ldexp(to_float(e), ((t / 16) * 5 + b) % 9 - 4));  // steps every 16 tokens
            }
          for (int x = 0; x < D; ++x) {
            const T kx = base.k[tview.offset(blk, t % s.page_size, h) + x], vx = base.v[tview.offset(blk, t % s.page_size, h) + x];
            kin.push_back(kx);
            vin.push_back(vx);
            k_head[h] = std::max(k_head[h], std::abs(to_float(kx)));
            v_head[h] = std::max(v_head[h], std::abs(to_float(vx)));
          }
        }
      }
    for (auto& x : k_head) x = km::fp8::scale_for_amax(x);
    for (auto& x : v_head) x = km::fp8::scale_for_amax(x);
    km::write_kv_host(host_view(), kin.data(), vin.data(), std::int64_t(s.hkv) * D, slots.data(), std::int32_t(slots.size()));
  }

  km::kv_pool_view<e4m3, Codec> view(unsigned char* k, unsigned char* v, const float* ks, const float* vs) const {
    auto p = shape;
    p.k = reinterpret_cast<e4m3*>(k);
    p.v = reinterpret_cast<e4m3*>(v);
    if constexpr (km::per_head_scales<Codec>) {
      p.k_scale = ks;
      p.v_scale = vs;
    } else {
      (void)ks, (void)vs;
    }
    return p;
  }
  km::kv_pool_view<e4m3, Codec> host_view() const {
    auto* self = const_cast<fp8_pool_problem*>(this);
    return view(self->k8.data(), self->v8.data(), k_head.data(), v_head.data());
  }
  kc::paged_problem kernel_problem() const {
    auto p = base.kernel_problem();
    p.elem_bytes = 1;
    p.token_scales = km::per_token_scales<Codec>;
    return p;
  }
};

}  // namespace paged_test
