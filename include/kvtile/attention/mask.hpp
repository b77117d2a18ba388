// kvtile/attention/mask.hpp: mask policies (none, causal bottom-right, sliding window + sinks).
//
// Coordinates: query row i in [0, q_len), key j in [0, kv_len). Queries are aligned to the
// bottom right: the last query sits at the last key, so row i is at key position
// p(i) = i + kv_len - q_len (chunked prefill and decode: new queries come after the cached
// prefix). Rows with p(i) < 0 (more queries than keys) see no key at all.
//
// A mask policy is a small value type built per sequence from its runtime parameters and the
// sequence's lengths. Kernels never branch on which policy they hold; they ask it:
//   kv_begin(q0, q1), kv_end(q0, q1)  the hull of keys rows [q0, q1) can see: the loop bounds
//   classify(q0, q1, k0, k1)          is tile [q0,q1) x [k0,k1) empty, partial or full?
//   visible(i, j)                     per element, only for partial tiles
#pragma once

#include <concepts>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention {

enum class tile_visibility : unsigned char { empty, partial, full };

KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int min_i(int a, int b) { return a < b ? a : b; }
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int max_i(int a, int b) { return a > b ? a : b; }

// Every key visible to every query.
struct no_mask {
  struct params {};
  static constexpr const char* name = "none";
  int kv_len;

  KVTILE_HOST_DEVICE no_mask(params, int /*q_len*/, int kv_len_) : kv_len(kv_len_) {}
  KVTILE_HOST_DEVICE bool visible(int, int) const { return true; }
  KVTILE_HOST_DEVICE tile_visibility classify(int, int, int, int) const { return tile_visibility::full; }
  KVTILE_HOST_DEVICE int kv_begin(int, int) const { return 0; }
  KVTILE_HOST_DEVICE int kv_end(int, int) const { return kv_len; }
};

// Causal, bottom-right aligned: row i sees keys j <= p(i).
struct causal_mask {
  struct params {};
  static constexpr const char* name = "causal";
  int offset;  // kv_len - q_len: p(i) = i + offset
  int kv_len;

  KVTILE_HOST_DEVICE causal_mask(params, int q_len, int kv_len_) : offset(kv_len_ - q_len), kv_len(kv_len_) {}
  KVTILE_HOST_DEVICE bool visible(int i, int j) const { return j <= i + offset; }
  KVTILE_HOST_DEVICE tile_visibility classify(int q0, int q1, int k0, int k1) const {
    if (k0 > q1 - 1 + offset) return tile_visibility::empty;
    if (k1 - 1 <= q0 + offset) return tile_visibility::full;
    return tile_visibility::partial;
  }
  KVTILE_HOST_DEVICE int kv_begin(int, int) const { return 0; }
  KVTILE_HOST_DEVICE int kv_end(int, int q1) const { return max_i(0, min_i(kv_len, q1 + offset)); }
};

// Causal with a sliding window of the last `window` keys (the query's own position included)
// plus the first `sinks` keys always visible (StreamingLLM's attention sinks):
//   visible(i, j) = j <= p(i) && (j > p(i) - window || j < sinks)
// window <= 0 means no window (plain causal, sinks irrelevant).
struct sliding_window_mask {
  struct params {
    int window = 0;
    int sinks = 0;
  };
  static constexpr const char* name = "window";
  int offset;
  int kv_len;
  int window;  // > 0
  int sinks;   // >= 0

  KVTILE_HOST_DEVICE sliding_window_mask(params p, int q_len, int kv_len_)
      : offset(kv_len_ - q_len), kv_len(kv_len_), window(p.window > 0 ? p.window : (1 << 30)), sinks(p.sinks > 0 ? p.sinks : 0) {}

  KVTILE_HOST_DEVICE bool visible(int i, int j) const {
    const int p = i + offset;
    return j <= p && (j > p - window || j < sinks);
  }
  KVTILE_HOST_DEVICE tile_visibility classify(int q0, int q1, int k0, int k1) const {
    const int p_lo = q0 + offset, p_hi = q1 - 1 + offset;
    if (k0 > p_hi) return tile_visibility::empty;                          // all in the future
    if (k0 >= sinks && k1 - 1 <= p_lo - window) return tile_visibility::empty;  // all evicted
    const bool causal_full = k1 - 1 <= p_lo;
    const bool window_full = k0 > p_hi - window || k1 <= sinks;
    return causal_full && window_full ? tile_visibility::full : tile_visibility::partial;
  }
  KVTILE_HOST_DEVICE int kv_begin(int q0, int) const {
    return sinks > 0 ? 0 : min_i(kv_len, max_i(0, q0 + offset - window + 1));
  }
  KVTILE_HOST_DEVICE int kv_end(int, int q1) const { return max_i(0, min_i(kv_len, q1 + offset)); }
};

// What every mask policy provides; a type that misses a hook fails here with its name.
template <class M>
concept mask_policy = requires(const M m, typename M::params p, int i) {
  { M(p, i, i) };
  { m.visible(i, i) } -> std::convertible_to<bool>;
  { m.classify(i, i, i, i) } -> std::same_as<tile_visibility>;
  { m.kv_begin(i, i) } -> std::convertible_to<int>;
  { m.kv_end(i, i) } -> std::convertible_to<int>;
};

static_assert(mask_policy<no_mask> && mask_policy<causal_mask> && mask_policy<sliding_window_mask>);

}  // namespace attention
KVTILE_NAMESPACE_END
