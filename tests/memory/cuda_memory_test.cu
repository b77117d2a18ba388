// GPU tests of memory/cuda: the batched block-copy kernel, the K/V write kernel, and a
// paged_kv_cache in device memory, each against the host implementation on the same input.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/kv_cache.hpp"
#include "kvtile/memory/cuda/block_copy.cuh"
#include "kvtile/memory/cuda/device_memory.cuh"
#include "kvtile/memory/cuda/kv_write.cuh"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::memory;

namespace {
template <class T>
std::vector<T> download(const T* d, std::size_t n) {
  std::vector<T> h(n);
  KVTILE_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}
template <class T>
void upload(T* d, const std::vector<T>& h) {
  KVTILE_CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}
template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Random pools, random copies (distinct destinations, no destination a source, partial blocks),
// GPU result == host result byte for byte, including everything the copies must not touch.
template <class T>
void check_block_copies(kv_shape shape, kv_layout layout, std::mt19937_64& rng, int expect_vec) {
  INFO("layers " << shape.num_layers << " blocks " << shape.num_blocks << " page " << shape.page_size << " heads "
                 << shape.num_kv_heads << " D " << shape.head_dim << " layout " << int(layout));
  block_storage<T> host(shape, layout);
  block_storage<T, cuda::device_memory> dev(shape, layout);
  const std::size_t n = host.bytes_per_pool() / sizeof(T);
  const auto k0 = kvtile_test::random_vector<T>(n, rng), v0 = kvtile_test::random_vector<T>(n, rng);
  std::memcpy(host.k_data(), k0.data(), n * sizeof(T));
  std::memcpy(host.v_data(), v0.data(), n * sizeof(T));
  upload(dev.k_data(), k0);
  upload(dev.v_data(), v0);
  CHECK(cuda::copy_vector_bytes(dev.pools()) == expect_vec);

  std::vector<block_id> ids(std::size_t(shape.num_blocks));
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = block_id(i);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<block_copy> copies;
  for (std::size_t i = 0; i + 1 < ids.size(); i += 2) {
    const auto tokens = (i / 2) % 3 == 0 ? shape.page_size : 1 + std::int32_t(rng() % std::uint64_t(shape.page_size));
    copies.push_back({ids[i], ids[i + 1], tokens});
  }
  host.memory().copy_blocks(host.pools(), copies);
  dev.memory().copy_blocks(dev.pools(), copies);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(same_bytes(download(dev.k_data(), n), std::vector<T>(host.k_data(), host.k_data() + n)));
  CHECK(same_bytes(download(dev.v_data(), n), std::vector<T>(host.v_data(), host.v_data() + n)));
}
}  // namespace

TEST_CASE("GPU block copies equal host block copies (only filled slots, every layer, K and V)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd}) {
    check_block_copies<bfloat16>({32, 40, 16, 8, 128}, layout, rng, 16);  // Llama-3-8B block shape
    check_block_copies<half>({3, 17, 5, 3, 64}, layout, rng, 16);
    check_block_copies<half>({2, 9, 7, 3, 3}, layout, rng, 2);  // odd head_dim: 2-byte vectors
    check_block_copies<float>({1, 6, 1, 1, 5}, layout, rng, 2);
  }
}

TEST_CASE("GPU K/V write equals host K/V write") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd})
    for (std::int32_t d : {128, 5}) {
      const kv_shape shape{1, 13, 16, 4, d};
      block_storage<bfloat16> host(shape, layout);
      block_storage<bfloat16, cuda::device_memory> dev(shape, layout);
      const std::int32_t ntok = 61;
      const std::int64_t stride = 4 * d + (d % 8 == 0 ? 8 : 1);
      const auto k = kvtile_test::random_vector<bfloat16>(std::size_t(ntok * stride), rng);
      const auto v = kvtile_test::random_vector<bfloat16>(std::size_t(ntok * stride), rng);
      std::vector<std::int64_t> slots(std::size_t(13 * 16));
      for (std::size_t i = 0; i < slots.size(); ++i) slots[i] = std::int64_t(i);
      std::shuffle(slots.begin(), slots.end(), rng);
      slots.resize(std::size_t(ntok));
      slots[7] = -1;  // padding token
      host.memory().write_kv(host.layer(0), k.data(), v.data(), stride, slots.data(), ntok);
      bfloat16 *dk, *dv;
      std::int64_t* ds;
      KVTILE_CUDA_CHECK(cudaMalloc(&dk, k.size() * 2));
      KVTILE_CUDA_CHECK(cudaMalloc(&dv, v.size() * 2));
      KVTILE_CUDA_CHECK(cudaMalloc(&ds, slots.size() * 8));
      upload(dk, k);
      upload(dv, v);
      upload(ds, slots);
      dev.memory().write_kv(dev.layer(0), (const bfloat16*)dk, (const bfloat16*)dv, stride, ds, ntok);
      KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
      const std::size_t n = host.bytes_per_pool() / 2;
      CHECK(same_bytes(download(dev.k_data(), n), std::vector<bfloat16>(host.k_data(), host.k_data() + n)));
      CHECK(same_bytes(download(dev.v_data(), n), std::vector<bfloat16>(host.v_data(), host.v_data() + n)));
      cudaFree(dk);
      cudaFree(dv);
      cudaFree(ds);
    }
}

TEST_CASE("a paged_kv_cache in device memory: fork, copy-on-write, write, read back") {
  using host_cache = paged_kv_cache<half, kv_layout::hnd>;
  using dev_cache = host_cache::with_memory<cuda::device_memory>;
  const kv_shape shape{2, 24, 4, 2, 8};
  host_cache h(shape);
  dev_cache g(shape);
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::vector<sequence_id> hs{h.create()}, gs{g.create()};
  std::int64_t* d_slots;
  half *dk, *dv;
  KVTILE_CUDA_CHECK(cudaMalloc(&d_slots, 64 * 8));
  KVTILE_CUDA_CHECK(cudaMalloc(&dk, 64 * 16 * 2));
  KVTILE_CUDA_CHECK(cudaMalloc(&dv, 64 * 16 * 2));
  for (int step = 0; step < 40; ++step) {
    const std::size_t i = rng() % hs.size();
    if (step % 5 == 4 && hs.size() < 6) {
      hs.push_back(h.fork(hs[i]));
      gs.push_back(g.fork(gs[i]));
      continue;
    }
    const auto n = 1 + std::int64_t(rng() % 6);
    if (h.stats().free < 3) break;
    const auto hsl = h.append(hs[i], n);
    const auto gsl = g.append(gs[i], n);
    REQUIRE(hsl == gsl);
    REQUIRE(h.pending_copies().size() == g.pending_copies().size());
    h.run_pending_copies();
    g.run_pending_copies();
    for (std::int32_t l = 0; l < 2; ++l) {
      const auto k = kvtile_test::random_vector<half>(std::size_t(n * 16), rng);
      const auto v = kvtile_test::random_vector<half>(std::size_t(n * 16), rng);
      h.write(l, k.data(), v.data(), 16, hsl.data(), std::int32_t(n));
      upload(dk, k);
      upload(dv, v);
      upload(d_slots, gsl);
      g.write(l, dk, dv, 16, d_slots, std::int32_t(n));
    }
  }
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  g.check_invariants();
  const std::size_t n = h.storage().bytes_per_pool() / 2;
  // Live slots agree (a freed or never-written slot may differ: compare through the page tables).
  const auto gk = download(g.storage().k_data(), n);
  const auto gv = download(g.storage().v_data(), n);
  for (std::size_t s = 0; s < hs.size(); ++s)
    for (std::int32_t l = 0; l < 2; ++l) {
      const auto hp = h.layer(l), gp = g.layer(l);
      const auto loff = gp.k - g.storage().k_data();
      for (std::int64_t t = 0; t < h.num_tokens(hs[s]); ++t)
        for (std::int32_t hd = 0; hd < 2; ++hd) {
          const auto slot = h.table(hs[s]).slot(t);
          const auto o = hp.offset(std::int32_t(slot / 4), std::int32_t(slot % 4), hd);
          for (std::int32_t d = 0; d < 8; ++d) {
            REQUIRE(gk[std::size_t(loff + o + d)].bits == hp.k[o + d].bits);
            REQUIRE(gv[std::size_t(loff + o + d)].bits == hp.v[o + d].bits);
          }
        }
    }
  cudaFree(d_slots);
  cudaFree(dk);
  cudaFree(dv);
}
