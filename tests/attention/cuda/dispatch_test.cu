// Tests of the kernel choice of cuda::prefill and the paged planner (attention/cuda/dispatch.hpp):
// a mask written here, not in the library, and a user's sm_90a tile take the wgmma kernel on
// Hopper and match the fp64 reference; the choice is reported by dispatch() and heard by the
// dispatch log on every run; a configuration only the portable kernel takes says why. The
// paged planner's choice is tested on the host (plan_test.cpp).
#include <doctest/doctest.h>

#include <mutex>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/dispatch.hpp"
#include "kvtile/attention/cuda/prefill.cuh"
#include "attention/cuda/paged_fixture.cuh"
#include "attention/cuda/prefill_fixture.cuh"

// Outside an anonymous namespace: a kernel instantiated on it keeps external linkage.
namespace dispatch_test {

using namespace prefill_test;
namespace kc = kvtile::attention::cuda;

// A prefix-LM mask (bidirectional over the first `prefix` keys, causal after them), written the
// way a user would: the mask_policy hooks and nothing else.
struct prefix_lm_mask {
  struct params {
    int prefix = 0;
  };
  static constexpr const char* name = "prefix_lm (test)";
  int offset, kv_len, prefix;

  KVTILE_HOST_DEVICE prefix_lm_mask(params p, int q_len, int kv_len_)
      : offset(kv_len_ - q_len), kv_len(kv_len_), prefix(p.prefix) {}
  KVTILE_HOST_DEVICE bool visible(int i, int j) const { return j < prefix || j <= i + offset; }
  KVTILE_HOST_DEVICE attention::tile_visibility classify(int q0, int q1, int k0, int k1) const {
    if (k1 <= prefix || k1 - 1 <= q0 + offset) return attention::tile_visibility::full;
    if (k0 >= prefix && k0 > q1 - 1 + offset) return attention::tile_visibility::empty;
    return attention::tile_visibility::partial;
  }
  KVTILE_HOST_DEVICE int kv_begin(int, int) const { return 0; }
  KVTILE_HOST_DEVICE int kv_end(int, int q1) const {
    return attention::min_i(kv_len, attention::max_i(prefix, q1 + offset));
  }
};
static_assert(attention::mask_policy<prefix_lm_mask>);

}  // namespace dispatch_test

namespace {

using namespace dispatch_test;

using user_mask_128 = kc::prefill<bfloat16, 128, prefix_lm_mask>;
using user_mask_64 = kc::prefill<bfloat16, 64, prefix_lm_mask>;
using user_tile_128 = kc::prefill<bfloat16, 128, causal_mask, tile_shape<64, 64, 4, 2>>;  // an sm_90a tile
using portable_only_96 = kc::prefill<bfloat16, 96, causal_mask>;

static_assert(user_mask_128::sm90_dispatch && user_mask_64::sm90_dispatch,
              "a user mask takes the sm_90a kernel: the dispatch asks the mask, never names it");
static_assert(std::is_same_v<user_tile_128::sm90_tile, tile_shape<64, 64, 4, 2>>, "a user's sm_90a tile is kept");
static_assert(!portable_only_96::sm90_dispatch);

bool hopper_with_sm90(int device) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return major == 9 && kc::detail::sm90_kernels_available(device);
}

std::mutex log_mutex;
std::vector<std::string> heard;
void record(const kc::kernel_choice& c) {
  std::lock_guard<std::mutex> lock(log_mutex);
  heard.push_back(std::string(c.entry) + " | " + c.kernel + " | " + c.reason);
}

}  // namespace

TEST_CASE("a mask defined outside the library runs on the sm_90a kernel and matches fp64") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  int device = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  heard.clear();
  kc::set_dispatch_log(&record);
  check_prefill<user_mask_128>({{1000}, {1000}, false, 4, 1}, {300}, rng);
  check_prefill<user_mask_128>({{17, 200}, {700, 200}, true, 10, 2}, {64}, rng);
  check_prefill<user_mask_128>({{50, 1, 333}, {50, 900, 400}, true, 8, 1}, {129}, rng);
  check_prefill<user_mask_64>({{4097}, {4097}, false, 1, 1}, {1000}, rng);
  kc::set_dispatch_log(nullptr);
  REQUIRE(!heard.empty());
  const bool sm90 = hopper_with_sm90(device);
  for (const std::string& line : heard) {
    INFO(line);
    CHECK(line.find("prefix_lm (test)") != std::string::npos);
    CHECK((line.find("prefill_sm90") != std::string::npos) == sm90);
  }
}

TEST_CASE("a user's sm_90a tile runs on the sm_90a kernel; dispatch() names kernel and tile") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  int device = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  check_prefill<user_tile_128>({{1000}, {1000}, false, 4, 1}, {}, rng);
  check_prefill<user_tile_128>({{1, 300}, {4097, 300}, true, 2, 2}, {}, rng);
  const kc::kernel_choice c = user_tile_128::dispatch({});
  INFO(c.kernel << ": " << c.reason);
  if (hopper_with_sm90(device)) {
    CHECK(std::string(c.kernel).find("prefill_sm90") == 0);
    CHECK(c.reason.find("<64, 64, 4, 2> (the user's)") != std::string::npos);
  } else {
    CHECK(std::string(c.kernel).find("mma.sync") != std::string::npos);
  }
}

TEST_CASE("a configuration only the portable kernel takes says why, and run_portable is reported") {
  const kc::kernel_choice c = portable_only_96::dispatch({});
  CHECK(std::string(c.kernel).find("mma.sync") != std::string::npos);
  CHECK(c.reason.find("96") != std::string::npos);
  heard.clear();
  kc::set_dispatch_log(&record);
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  check_prefill<portable_only_96>({{100}, {100}, false, 2, 1}, {}, rng);
  kc::set_dispatch_log(nullptr);
  REQUIRE(!heard.empty());
  CHECK(heard.front().find("head dims 64, 128 and 256, not 96") != std::string::npos);
}

TEST_CASE("a mask defined outside the library runs on the paged kernels (sm_90a where the device has it)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int group : {1, 5, 8}) {
    paged_test::spec s;
    s.hkv = 2;
    s.hq = 2 * group;
    s.page_size = group == 5 ? 16 : 64;
    s.q_lens = {200, 1, 37, 3};
    s.kv_lens = {700, 900, 37, 301};
    INFO("append, group " << group);
    paged_test::run_and_check<bfloat16, 128, prefix_lm_mask>(s, {100}, rng());
    s.q_lens = {1, 1, 2, 1};
    INFO("decode, group " << group);
    paged_test::run_and_check<bfloat16, 128, prefix_lm_mask>(s, {100}, rng());
  }
}
