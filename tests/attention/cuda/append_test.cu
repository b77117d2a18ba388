// GPU tests of kvtile/attention/cuda/append.cuh: chunked prefill over paged K/V (ragged chunks
// against the cached prefix + bottom-right causal inside the chunk), batches mixing decodes and
// chunks, window + sinks, every page size and group size, split == unsplit, fp16 with a head
// dim (96) that takes the kernel's general load path, and D=64 (Q kept in registers).
#include <doctest/doctest.h>

#include "attention/cuda/paged_fixture.cuh"

using namespace paged_test;

TEST_CASE("append: ragged chunks mixed with decodes, every group and page size, bf16 D=128 causal") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const int groups[] = {1, 4, 5, 7, 8, 16};
  const int pages[] = {1, 16, 24, 64, 256};
  for (int i = 0; i < 10; ++i) {
    spec s;
    const int group = groups[i % 6];
    s.hkv = 1 + int(rng() % 2);
    s.hq = s.hkv * group;
    s.page_size = pages[i % 5];
    s.layout = i % 3 == 0 ? kv_layout::hnd : kv_layout::nhd;
    // A prefill chunk, a decode, a speculative verify, a chunk that is the whole sequence, an odd one.
    std::uniform_int_distribution<int> prefix(0, 500), chunk(2, 150);
    const int c0 = chunk(rng), c4 = chunk(rng) | 1;
    s.q_lens = {c0, 1, 5, 37, c4};
    s.kv_lens = {prefix(rng) + c0, prefix(rng) + 1, prefix(rng) + 5, 37, prefix(rng) + c4};
    INFO("group " << group << " page " << s.page_size << " chunks " << c0 << "," << c4);
    run_and_check<bfloat16, 128, causal_mask>(s, {}, rng());
  }
}

TEST_CASE("append: the warp-specialised sm_90a kernel (plan_options::warp_specialised_append)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const int groups[] = {1, 4, 5, 8};
  const int pages[] = {16, 24, 64, 256, 1};  // 1: no tensor maps, the cp.async kernel runs
  for (int i = 0; i < 8; ++i) {
    spec s;
    const int group = groups[i % 4];
    s.hkv = 1 + int(rng() % 2);
    s.hq = s.hkv * group;
    s.page_size = pages[i % 5];
    s.layout = i % 3 == 0 ? kv_layout::hnd : kv_layout::nhd;
    s.opt.warp_specialised_append = true;
    s.opt.split_kv = i % 2 == 0;
    std::uniform_int_distribution<int> prefix(0, 700), chunk(2, 300);
    const int c0 = chunk(rng), c4 = chunk(rng) | 1;
    s.q_lens = {c0, 1, 5, 37, c4};
    s.kv_lens = {prefix(rng) + c0, prefix(rng) + 1, prefix(rng) + 5, 37, prefix(rng) + c4};
    INFO("group " << group << " page " << s.page_size << " chunks " << c0 << "," << c4);
    if (i % 2 == 0)
      run_and_check<bfloat16, 128, causal_mask>(s, {}, rng());
    else
      run_and_check<kvtile::half, 64, sliding_window_mask>(s, {200, 4}, rng());
  }
}

TEST_CASE("append: split-KV equals unsplit for a chunk over a long prefix") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  spec s;
  s.hkv = 2;
  s.hq = 8;
  s.page_size = 16;
  s.q_lens = {21, 1};
  s.kv_lens = {4021, 3000};
  run_and_check<bfloat16, 128, causal_mask>(s, {}, rng(), /*compare_unsplit=*/true);
}

TEST_CASE("append: sliding window with sinks, fp16 D=96") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  struct wcase {
    int window, sinks, page;
  };
  for (const wcase c : {wcase{32, 0, 16}, wcase{100, 4, 24}, wcase{1, 2, 1}, wcase{200, 0, 64}, wcase{64, 64, 256}}) {
    spec s;
    s.hkv = 2;
    s.hq = 14;
    s.page_size = c.page;
    s.layout = c.page % 2 ? kv_layout::hnd : kv_layout::nhd;
    s.q_lens = {120, 1, 33};
    s.kv_lens = {900, 400, 33};
    INFO("window " << c.window << " sinks " << c.sinks << " page " << c.page);
    run_and_check<kvtile::half, 96, sliding_window_mask>(s, {c.window, c.sinks}, rng(), /*compare_unsplit=*/true);
  }
}

TEST_CASE("append: sliding window with sinks and no mask, bf16 D=128 (the sm_90a kernel where the device has it)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  struct wcase {
    int window, sinks, page;
  };
  for (const wcase c : {wcase{48, 0, 16}, wcase{300, 4, 24}, wcase{1, 1, 1}, wcase{129, 128, 64}}) {
    spec s;
    s.hkv = 2;
    s.hq = 10;
    s.page_size = c.page;
    s.layout = c.page % 2 ? kv_layout::hnd : kv_layout::nhd;
    s.q_lens = {200, 1, 130};
    s.kv_lens = {1500, 700, 130};
    INFO("window " << c.window << " sinks " << c.sinks << " page " << c.page);
    run_and_check<bfloat16, 128, sliding_window_mask>(s, {c.window, c.sinks}, rng(), /*compare_unsplit=*/true);
  }
  spec s;
  s.hkv = 1;
  s.hq = 7;
  s.q_lens = {300, 5};
  s.kv_lens = {100, 2000};  // without a mask a chunk may be longer than the keys it sees
  run_and_check<bfloat16, 128, no_mask>(s, {}, rng(), /*compare_unsplit=*/true);
}

TEST_CASE("append: fp16 D=64, Q fragments in registers and one barrier per key tile") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  spec s;
  s.hkv = 2;
  s.hq = 8;
  s.page_size = 16;
  s.q_lens = {70, 1, 200};
  s.kv_lens = {300, 50, 700};
  run_and_check<kvtile::half, 64, causal_mask>(s, {}, rng(), /*compare_unsplit=*/true);
}

TEST_CASE("append: lengths that disagree with the page table are rejected before any work") {
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  spec s;
  s.kv_lens = {50, 10};
  s.q_lens = {5, 10};
  problem<bfloat16, 128> pr(s, rng);
  auto q_indptr = pr.q_indptr;
  q_indptr[2] = q_indptr[1] + 11;  // 11 new queries but only 10 keys
  const auto t = pr.csr(pr.kv_indptr.data(), pr.indices.data(), pr.last_page_len.data());
  CHECK_THROWS_WITH_AS(kc::plan_append<causal_mask>(q_indptr.data(), t, pr.kernel_problem(), {}, limits()),
                       doctest::Contains("11 new queries but only 10 keys"), kvtile::error);
}
