// kvtile/attention/variant.hpp: attention variants: a mask policy plus optional transforms.
//
// A variant is a mask policy (attention/mask.hpp: built per sequence as V(params, q_len, kv_len),
// hooks kv_begin / kv_end / classify / visible) that may also carry transforms. Every backend
// (the CPU kernels, the fp64 reference, the CUDA mainloops) asks for each transform through a
// trait below and applies it under `if constexpr`, so a variant without transforms (a plain
// mask) compiles to exactly the code it had before. The optional hooks, and when a kernel calls
// each:
//
//   float logit(float s) const                      has_logit_transform<V>
//     s = (q . k) * scale, in natural units, of every key of a visited tile (full or partial),
//     after Q and K were rotated and before the mask and the softmax; the softmax then uses the
//     returned value. Kernels that keep scores in base 2 call apply_logit_base2(). A variant may
//     also accept a double (a template), which the fp64 reference then uses.
//
//   float logit_derivative(float s) const           has_logit_derivative<V>
//     d logit(s) / d s at the same s, for the backward (cuda::backward, the fp64 backward
//     reference), which multiplies dS by it; a double overload serves the fp64 reference. A
//     backward refuses a logit transform without it.
//
//   rotary (has_rotary<V>)                          Q and K rotated by position (RoPE)
//     static constexpr rotary_layout rotary_layout_v  which dims pair up (see rotary_pair)
//     int query_position(int i) const                 position of query row i
//     int key_position(int j) const                   position of key j (its index in the K/V source)
//     int rotary_dims(int head_dim) const             R: dims [0, R) rotate, [R, head_dim) pass
//     float rotary_theta() const                      the base of the frequencies
//     Query row i is rotated once, when its tile is loaded, at query_position(i); key j as it is
//     loaded (K is stored *before* rotation) at key_position(j), every time a tile holds it.
//     The pair math is rotary_rotate_pair() below, the one function every backend uses.
//
// Three variants ship, as combinators over any mask policy (so they compose):
//   rotary<Mask, rotary_layout::half_split>   RoPE, Llama's half-split pairs (d, d + R/2)
//   rotary<Mask, rotary_layout::interleaved>  RoPE, interleaved pairs (2k, 2k + 1)
//   softcap<Mask>                             logit soft-capping, cap * tanh(s / cap) (Gemma 2)
// e.g. softcap<rotary<causal_mask>>, built from
//   softcap<rotary<causal_mask>>::params{{{}, 10000.f, 0}, 50.f}  (causal {}, theta, dims; cap).
// Each derives from its inner policy, so it IS a mask policy: kernels and the planner run it
// unchanged. Rotary positions are those of mask.hpp: query row i at i + kv_len - q_len, key j
// at j. In a dense or unevicted paged cache j is the token's position in the text; in a paged
// cache whose middle blocks were evicted (sinks + window, StreamingLLM) it is the key's position
// inside the cache, and so is the query's: RoPE at cache positions. A variant that wants other
// positions derives from rotary<> and hides query_position / key_position.
//
// Writing a variant: a struct with the mask hooks (or deriving from a mask), a nested `params`
// (runtime values, trivially copyable: it travels to the GPU by value), the constructor
// V(params, q_len, kv_len), any of the hooks above (KVTILE_HOST_DEVICE, cheap: they run per
// score or per element), and optionally `static void check(const params&, int head_dim)`
// (host: throws kvtile::error on bad values; entry points call it through check_variant).
#pragma once

#include <cmath>
#include <concepts>
#include <cstddef>
#include <type_traits>

#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/core/config.hpp"
#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention {

// ---------------------------------------------------------------------------------------------
// Rotary position embedding: the pair math, shared by every backend.

// Which dims form the rotated pairs, for pair k in [0, R/2):
//   half_split   (k, k + R/2)   Llama, GPT-NeoX
//   interleaved  (2k, 2k + 1)   GPT-J, the original RoFormer
enum class rotary_layout : unsigned char { half_split, interleaved };

template <rotary_layout L>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int rotary_pair_first(int k, int rotary_dims) {
  if constexpr (L == rotary_layout::half_split) return (void)rotary_dims, k;
  else return (void)rotary_dims, 2 * k;
}
template <rotary_layout L>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int rotary_pair_second(int k, int rotary_dims) {
  if constexpr (L == rotary_layout::half_split) return k + rotary_dims / 2;
  else return (void)rotary_dims, 2 * k + 1;
}

// inv_freq(k) = theta^(-2k / R) in fp32. Independent of the position: kernels compute it once
// per pair (per CTA or per work item), not per row.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float rotary_inv_freq(int k, int rotary_dims, float theta) {
#if KVTILE_IS_DEVICE_PASS
  return powf(theta, -float(2 * k) / float(rotary_dims));
#else
  return std::pow(theta, -float(2 * k) / float(rotary_dims));
#endif
}

// The angle of pair k at position pos, exactly as every backend computes it: one fp32 product
// float(pos) * inv_freq (no fused or reassociated form), then an accurate sine and cosine
// (sincosf on the device: never the __sincosf intrinsic, whose error grows with the angle, and
// angles reach the length of the context). Frameworks compute RoPE tables the same way in fp32.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE void rotary_cos_sin(int pos, float inv_freq, float& c, float& s) {
  const float angle = float(pos) * inv_freq;
#if KVTILE_IS_DEVICE_PASS
  sincosf(angle, &s, &c);
#else
  s = std::sin(angle);
  c = std::cos(angle);
#endif
}

// Rotates one pair by the angle whose cosine and sine are (c, s).
template <class F>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE void rotary_rotate_pair(F& x0, F& x1, F c, F s) {
  const F a = x0, b = x1;
  x0 = a * c - b * s;
  x1 = b * c + a * s;
}

// Rotates a row of fp32 values x[0, head_dim) at position pos; inv_freq[k] for k in [0, R/2)
// from rotary_inv_freq. Dims [R, head_dim) are left as they are.
template <rotary_layout L>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE void rotary_rotate_row(float* x, int rotary_dims, int pos, const float* inv_freq) {
  for (int k = 0; k < rotary_dims / 2; ++k) {
    float c, s;
    rotary_cos_sin(pos, inv_freq[k], c, s);
    rotary_rotate_pair(x[rotary_pair_first<L>(k, rotary_dims)], x[rotary_pair_second<L>(k, rotary_dims)], c, s);
  }
}

// The same formula in fp64, for the exact reference: double(pos) * theta^(-2k / R).
template <rotary_layout L>
inline void rotary_rotate_row_f64(double* x, int rotary_dims, int pos, double theta) {
  for (int k = 0; k < rotary_dims / 2; ++k) {
    const double angle = double(pos) * std::pow(theta, -double(2 * k) / double(rotary_dims));
    rotary_rotate_pair(x[rotary_pair_first<L>(k, rotary_dims)], x[rotary_pair_second<L>(k, rotary_dims)],
                       std::cos(angle), std::sin(angle));
  }
}

// ---------------------------------------------------------------------------------------------
// The optional hooks, each detected by a concept.

template <class V>
concept has_logit_transform = requires(const V v, float s) {
  { v.logit(s) } -> std::same_as<float>;
};

// A logit hook that also takes a double (the fp64 reference then computes it in double).
template <class V>
concept has_logit_transform_f64 = has_logit_transform<V> && requires(const V v, double s) {
  { v.logit(s) } -> std::same_as<double>;
};

// The derivative of the logit hook (see the header comment), and its double overload.
template <class V>
concept has_logit_derivative = has_logit_transform<V> && requires(const V v, float s) {
  { v.logit_derivative(s) } -> std::same_as<float>;
};
template <class V>
concept has_logit_derivative_f64 = has_logit_derivative<V> && requires(const V v, double s) {
  { v.logit_derivative(s) } -> std::same_as<double>;
};

template <class V>
concept has_rotary = requires(const V v, int i) {
  { V::rotary_layout_v } -> std::convertible_to<rotary_layout>;
  { v.query_position(i) } -> std::same_as<int>;
  { v.key_position(i) } -> std::same_as<int>;
  { v.rotary_dims(i) } -> std::same_as<int>;
  { v.rotary_theta() } -> std::same_as<float>;
};

// Whether a kernel has any transform to apply (else it runs the plain mask path).
template <class V>
inline constexpr bool has_transforms = has_logit_transform<V> || has_rotary<V>;

// A variant: a mask policy whose optional hooks, where present, have the right signatures (a
// hook with a wrong signature would otherwise be silently ignored).
template <class V>
consteval bool check_variant_type() {
  static_assert(mask_policy<V>, "a variant is a mask policy first: see the mask_policy concept in attention/mask.hpp");
  if constexpr (requires { &V::logit; } || requires(const V v) { v.logit(0.f); })
    static_assert(has_logit_transform<V>, "the variant's logit hook must be `float logit(float s) const`");
  if constexpr (requires { V::rotary_layout_v; })
    static_assert(has_rotary<V>,
                  "a rotary variant needs `int query_position(int) const`, `int key_position(int) const`, "
                  "`int rotary_dims(int head_dim) const` and `float rotary_theta() const`");
  return true;
}

template <class V>
concept attention_variant = mask_policy<V> && (check_variant_type<V>(), true);

// The logit hook on a base-2 score s2 = s * log2(e), as kernels that exponentiate with exp2
// hold it; the identity when the variant has no logit transform.
template <class V>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float apply_logit_base2(const V& v, float s2) {
  if constexpr (has_logit_transform<V>) return v.logit(s2 * ln2) * log2e;
  else return (void)v, s2;
}

// Host-side check of a variant's runtime parameters for a head dim: throws kvtile::error
// (invalid_argument, naming the value) when they are bad; a no-op for plain masks.
template <class V>
void check_variant(const typename V::params& p, int head_dim) {
  if constexpr (requires { V::check(p, head_dim); }) V::check(p, head_dim);
  else (void)p, (void)head_dim;
}

namespace detail {
consteval std::size_t name_length(const char* s) {
  std::size_t n = 0;
  while (s[n]) ++n;
  return n;
}
template <std::size_t N>
struct variant_name {
  char text[N + 1] = {};
};
// prefix + inner + ")", for the names of composed variants ("softcap(rotary(causal))").
template <std::size_t N>
consteval variant_name<N> wrap_name(const char* prefix, const char* inner) {
  variant_name<N> r;
  std::size_t n = 0;
  for (std::size_t i = 0; prefix[i]; ++i) r.text[n++] = prefix[i];
  for (std::size_t i = 0; inner[i]; ++i) r.text[n++] = inner[i];
  r.text[n++] = ')';
  return r;
}
template <const char* Prefix, class Inner>
inline constexpr auto wrapped_name = wrap_name<name_length(Prefix) + name_length(Inner::name) + 1>(Prefix, Inner::name);

inline constexpr char rotary_half_prefix[] = "rotary(";
inline constexpr char rotary_interleaved_prefix[] = "rotary_interleaved(";
inline constexpr char softcap_prefix[] = "softcap(";

KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float tanh_f(float x) {
#if KVTILE_IS_DEVICE_PASS
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}
inline double tanh_f(double x) { return std::tanh(x); }
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// The shipped variants.

// RoPE over any mask policy: Q and K rotated at their positions (see the header comment).
//   params: Mask::params, then theta (> 0, default 10000) and rotary_dim (0: the whole head
//   dim; else even and <= head_dim).
template <mask_policy Mask, rotary_layout Layout = rotary_layout::half_split>
struct rotary : Mask {
  static_assert(!has_rotary<Mask>, "rotary<Mask>: Mask already rotates Q and K; a variant rotates them once");
  struct params : Mask::params {
    float theta = 10000.f;
    int rotary_dim = 0;
  };
  static constexpr rotary_layout rotary_layout_v = Layout;
  // This rotary<>, as the variants built on it see it: a kernel may rely on its key_position
  // (key j at j) where a derived variant does not hide it (cuda/scores.cuh).
  using rotary_base = rotary;
  static constexpr const char* name =
      detail::wrapped_name<Layout == rotary_layout::half_split ? detail::rotary_half_prefix
                                                               : detail::rotary_interleaved_prefix,
                           Mask>.text;

  float theta_;
  int rotary_dim_;  // 0: the head dim
  int position_offset_;  // kv_len - q_len: the bottom-right alignment of mask.hpp

  KVTILE_HOST_DEVICE rotary(params p, int q_len, int kv_len)
      : Mask(p, q_len, kv_len), theta_(p.theta), rotary_dim_(p.rotary_dim), position_offset_(kv_len - q_len) {}

  KVTILE_HOST_DEVICE int query_position(int i) const { return i + position_offset_; }
  KVTILE_HOST_DEVICE int key_position(int j) const { return j; }
  KVTILE_HOST_DEVICE int rotary_dims(int head_dim) const { return rotary_dim_ == 0 ? head_dim : rotary_dim_; }
  KVTILE_HOST_DEVICE float rotary_theta() const { return theta_; }

  static void check(const params& p, int head_dim) {
    check_variant<Mask>(p, head_dim);
    KVTILE_REQUIRE(p.theta > 0.f && std::isfinite(p.theta), errc::invalid_argument,
                   "rotary: theta must be positive and finite, got ", p.theta);
    KVTILE_REQUIRE(p.rotary_dim >= 0 && p.rotary_dim % 2 == 0 && p.rotary_dim <= head_dim, errc::invalid_argument,
                   "rotary: rotary_dim must be even and in [0, head_dim = ", head_dim, "] (0: all), got ",
                   p.rotary_dim);
  }
};

// The variant with its rotary embedding taken out, for kernels handed Q and K already rotated at
// the variant's positions (cuda::prefill's rotate-once path): rotary<M, L> -> M, and through
// the shipped wrappers (softcap<rotary<M>> -> softcap<M>); `params` slices the variant's
// parameters to the stripped type's. type is void where the way out is not known (a user's
// variant derived from rotary<>): kernels then rotate as they load.
template <class V>
struct rotary_stripped {
  using type = void;
};
template <mask_policy M, rotary_layout L>
struct rotary_stripped<rotary<M, L>> {
  using type = M;
  static typename M::params params(const typename rotary<M, L>::params& p) { return p; }
};
template <class V>
using rotary_stripped_t = typename rotary_stripped<V>::type;

// Logit soft-capping over any mask policy (or variant): s -> cap * tanh(s / cap), applied after
// an inner logit transform if the inner policy has one.
//   params: Mask::params, then cap (> 0, finite; Gemma 2 uses 50 for attention).
template <mask_policy Mask>
struct softcap : Mask {
  struct params : Mask::params {
    float cap = 50.f;
  };
  static constexpr const char* name = detail::wrapped_name<detail::softcap_prefix, Mask>.text;

  float cap_, inv_cap_;

  KVTILE_HOST_DEVICE softcap(params p, int q_len, int kv_len) : Mask(p, q_len, kv_len), cap_(p.cap), inv_cap_(1.f / p.cap) {}

  KVTILE_HOST_DEVICE float logit(float s) const {
    if constexpr (has_logit_transform<Mask>) s = Mask::logit(s);
    return cap_ * detail::tanh_f(s * inv_cap_);
  }
  // fp64, for the exact reference (the cap itself is the fp32 value kernels use).
  double logit(double s) const {
    if constexpr (has_logit_transform_f64<Mask>) s = Mask::logit(s);
    else if constexpr (has_logit_transform<Mask>) s = double(Mask::logit(float(s)));
    return double(cap_) * detail::tanh_f(s / double(cap_));
  }
  // d/ds cap * tanh(s / cap) = 1 - tanh^2(s / cap), times the inner transform's derivative.
  KVTILE_HOST_DEVICE float logit_derivative(float s) const {
    float inner = 1.f;
    if constexpr (has_logit_transform<Mask>) {
      inner = Mask::logit_derivative(s);
      s = Mask::logit(s);
    }
    const float t = detail::tanh_f(s * inv_cap_);
    return (1.f - t * t) * inner;
  }
  double logit_derivative(double s) const {
    double inner = 1.0;
    if constexpr (has_logit_derivative_f64<Mask>) {
      inner = Mask::logit_derivative(s);
      s = Mask::logit(s);
    } else if constexpr (has_logit_transform<Mask>) {
      inner = double(Mask::logit_derivative(float(s)));
      s = double(Mask::logit(float(s)));
    }
    const double t = detail::tanh_f(s / double(cap_));
    return (1.0 - t * t) * inner;
  }

  static void check(const params& p, int head_dim) {
    check_variant<Mask>(p, head_dim);
    KVTILE_REQUIRE(p.cap > 0.f && std::isfinite(p.cap), errc::invalid_argument,
                   "softcap: cap must be positive and finite, got ", p.cap);
  }
};

template <class V>
  requires(!std::is_void_v<rotary_stripped_t<V>>)
struct rotary_stripped<softcap<V>> {
  using type = softcap<rotary_stripped_t<V>>;
  static typename type::params params(const typename softcap<V>::params& p) {
    typename type::params out{};
    static_cast<typename rotary_stripped_t<V>::params&>(out) = rotary_stripped<V>::params(p);
    out.cap = p.cap;
    return out;
  }
};

static_assert(attention_variant<rotary<causal_mask>> && attention_variant<softcap<sliding_window_mask>> &&
              attention_variant<softcap<rotary<no_mask, rotary_layout::interleaved>>>);
static_assert(has_rotary<softcap<rotary<causal_mask>>> && has_logit_transform<softcap<rotary<causal_mask>>>);
static_assert(has_logit_derivative_f64<softcap<causal_mask>> && has_logit_derivative<softcap<softcap<no_mask>>>);
static_assert(!has_transforms<causal_mask> && !has_transforms<sliding_window_mask>);

}  // namespace attention
KVTILE_NAMESPACE_END
