// kvtile/caching/block_hash.hpp: the chained hash that names a full block of a prompt.
//
// Block i of a prompt is named by hash(hash of block i-1, the block's page_size token ids,
// salt). Chaining makes the name depend on the whole prefix, so equal names mean "same prefix"
// (up to a collision, which the prefix cache rules out by comparing tokens). The salt separates
// tenants (or LoRA adapters, or image inputs): two tenants with the same prompt never share.
//
// chained_block_hash is a non-cryptographic 64-bit hash: two token ids form one 64-bit word,
// each word goes through one 64x64->128 multiply folded to 64 bits (the wyhash/rapidhash
// construction). bench/prefix_cache_bench.cpp measures it per token (the target is <= 10 ns
// per token; a cryptographic hash costs 100-200). A user who needs a hash resistant to chosen
// collisions swaps in another BlockHash: correctness never depends on the hash, since hits are
// confirmed by the tokens.
#pragma once

#include <concepts>
#include <cstdint>
#include <cstring>
#include <span>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace caching {

using token_id = std::int32_t;

// H(prev, tokens, salt) -> 64-bit name of the block.
template <class H>
concept block_hash = std::default_initializable<H> &&
    requires(const H h, std::uint64_t prev, std::span<const token_id> tokens, std::uint64_t salt) {
      { h(prev, tokens, salt) } -> std::same_as<std::uint64_t>;
    };

namespace detail {
// 64x64 -> 128-bit multiply, high and low halves xor-folded: a strong, cheap mixing step.
inline std::uint64_t fold_mul(std::uint64_t a, std::uint64_t b) noexcept {
  const unsigned __int128 p = static_cast<unsigned __int128>(a) * b;
  return std::uint64_t(p) ^ std::uint64_t(p >> 64);
}
inline constexpr std::uint64_t k0 = 0x2d358dccaa6c78a5ull;  // odd constants with balanced bits
inline constexpr std::uint64_t k1 = 0x8bb84b93962eacc9ull;
inline constexpr std::uint64_t k2 = 0x4b33a62ed433d4a3ull;
inline constexpr std::uint64_t k3 = 0x4d5a2da51de1aa47ull;
}  // namespace detail

struct chained_block_hash {
  std::uint64_t operator()(std::uint64_t prev, std::span<const token_id> tokens, std::uint64_t salt) const noexcept {
    using namespace detail;
    // Two independent lanes of 4 tokens per iteration: the multiplies of one lane overlap the
    // other's, so the loop runs at multiplier throughput instead of its latency.
    std::uint64_t a = fold_mul(prev ^ k0, salt ^ k1);
    std::uint64_t b = a ^ k2;
    const token_id* t = tokens.data();
    std::size_t n = tokens.size();
    while (n >= 4) {
      std::uint64_t w0, w1;
      std::memcpy(&w0, t, 8);
      std::memcpy(&w1, t + 2, 8);
      a = fold_mul(a ^ w0, k1);
      b = fold_mul(b ^ w1, k3);
      t += 4;
      n -= 4;
    }
    if (n >= 2) {
      std::uint64_t w;
      std::memcpy(&w, t, 8);
      a = fold_mul(a ^ w, k2);
      t += 2;
      n -= 2;
    }
    if (n) b = fold_mul(b ^ std::uint32_t(*t), k0);
    return fold_mul(a ^ std::uint64_t(tokens.size()), b ^ k3);
  }
};

static_assert(block_hash<chained_block_hash>, "chained_block_hash must satisfy block_hash");

}  // namespace caching
KVTILE_NAMESPACE_END
