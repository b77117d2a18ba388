// GPU tests of paging/cuda/device_indptr.cuh: indptr built on the device from device lengths
// equals the host prefix sums, for tokens (unit 1) and pages (unit = page size).
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/paging/cuda/device_indptr.cuh"
#include "support/test_util.hpp"

using namespace kvtile;

namespace {

std::vector<std::int32_t> host_indptr(const std::vector<std::int32_t>& lens, std::int32_t unit) {
  std::vector<std::int32_t> out{0};
  for (auto l : lens) out.push_back(out.back() + (l + unit - 1) / unit);
  return out;
}

std::vector<std::int32_t> device_indptr(const std::vector<std::int32_t>& lens, std::int32_t unit) {
  const auto batch = std::int32_t(lens.size());
  std::int32_t *d_lens = nullptr, *d_indptr = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&d_lens, std::max<std::size_t>(lens.size(), 1) * 4));
  KVTILE_CUDA_CHECK(cudaMalloc(&d_indptr, (lens.size() + 1) * 4));
  KVTILE_CUDA_CHECK(cudaMemcpy(d_lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
  KVTILE_CUDA_CHECK(cudaMemset(d_indptr, 0xff, (lens.size() + 1) * 4));  // poisoned: every entry must be written
  const std::size_t bytes = paging::cuda::device_indptr_workspace(batch);
  void* ws = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&ws, std::max<std::size_t>(bytes, 1)));
  cudaStream_t s;
  KVTILE_CUDA_CHECK(cudaStreamCreate(&s));
  paging::cuda::build_device_indptr(d_lens, batch, d_indptr, ws, bytes, s, unit);
  KVTILE_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<std::int32_t> out(lens.size() + 1);
  KVTILE_CUDA_CHECK(cudaMemcpy(out.data(), d_indptr, out.size() * 4, cudaMemcpyDeviceToHost));
  KVTILE_CUDA_CHECK(cudaStreamDestroy(s));
  cudaFree(ws), cudaFree(d_lens), cudaFree(d_indptr);
  return out;
}

}  // namespace

TEST_CASE("device indptr equals the host prefix sums (tokens and pages)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (std::int32_t batch : {0, 1, 7, 1000, 70000}) {
    std::vector<std::int32_t> lens(static_cast<std::size_t>(batch));
    for (auto& l : lens) l = std::int32_t(rng() % 5000);  // zero-length entries included
    for (std::int32_t unit : {1, 16, 7}) {
      INFO("batch " << batch << " unit " << unit);
      CHECK(device_indptr(lens, unit) == host_indptr(lens, unit));
    }
  }
}

TEST_CASE("bad arguments are errors that name the value") {
  std::int32_t* d = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&d, 8));
  CHECK_THROWS_WITH_AS(paging::cuda::build_device_indptr(d, 1, d, nullptr, 0, nullptr, 0), doctest::Contains("got 0"),
                       kvtile::error);
  CHECK_THROWS_WITH_AS(paging::cuda::build_device_indptr(d, -3, d, nullptr, 0), doctest::Contains("got -3"), kvtile::error);
  cudaFree(d);
}
