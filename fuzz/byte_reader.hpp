// fuzz/byte_reader.hpp: turns a fuzzer's bytes into bounded values. Reading past the end gives
// zeros, so every input decodes to something and short inputs mean short programs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace kvtile_fuzz {

// Aborts with a message: a finding (libFuzzer and the replay runner both report the input).
#define KVTILE_FUZZ_CHECK(cond)                                                                  \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::fprintf(stderr, "kvtile fuzz check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                              \
    }                                                                                            \
  } while (0)

class byte_reader {
 public:
  byte_reader(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}
  bool empty() const { return p_ >= end_; }
  std::uint8_t u8() { return p_ < end_ ? *p_++ : 0; }
  std::uint32_t u32() {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= std::uint32_t(u8()) << (8 * i);
    return v;
  }
  std::uint64_t u64() { return std::uint64_t(u32()) | (std::uint64_t(u32()) << 32); }
  // A value in [lo, hi] (inclusive).
  std::int64_t range(std::int64_t lo, std::int64_t hi) {
    const std::uint64_t span = std::uint64_t(hi - lo) + 1;
    const std::uint64_t raw = span <= 256 ? u8() : span <= (std::uint64_t(1) << 32) ? u32() : u64();
    return lo + std::int64_t(span == 0 ? raw : raw % span);
  }
  // Mostly small, sometimes one of the values at the edges of int32 / int64.
  std::int64_t edgy(std::int64_t small_hi) {
    const std::uint8_t sel = u8();
    if (sel < 224) return range(0, small_hi);
    static constexpr std::int64_t edges[] = {-1, -2, 2147483647, 2147483648, -2147483648LL, 2147483646,
                                             1LL << 62, 9223372036854775807LL, (-9223372036854775807LL - 1), 1LL << 31,
                                             1LL << 30, 65536};
    return edges[sel % (sizeof(edges) / sizeof(edges[0]))];
  }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

}  // namespace kvtile_fuzz
