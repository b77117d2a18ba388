// kvtile/paging/cuda/device_indptr.cuh: CSR offsets built on the GPU from GPU-resident lengths.
//
// A serving loop whose lengths already live on the device (sampled tokens, accepted drafts)
// builds the query indptr, or the page-table indptr, without a round trip through the host:
//
//   indptr[0] = 0,  indptr[b + 1] = sum over i <= b of ceil(lens[i] / unit)
//
// unit 1 gives the query / token indptr (q_indptr of plan_decode / plan_append, varlen
// layouts); unit page_size gives each sequence's page count (kv_indptr of a CSR page table).
// One cub::DeviceScan::InclusiveSum over a transform of the lengths, so it is graph capturable;
// the caller owns the workspace (sized once by device_indptr_workspace).
//
//   std::size_t bytes = device_indptr_workspace(max_batch);
//   build_device_indptr(d_lens, batch, d_indptr, workspace, bytes, stream);          // tokens
//   build_device_indptr(d_kv_lens, batch, d_kv_indptr, workspace, bytes, stream, 16); // pages
// Lengths must be >= 0 and the total below 2^31 (they are not read on the host to check).
// As with every header that instantiates CUB kernels: no using-directive bringing kvtile's
// `cuda` namespaces at global scope in the including file (nvcc's stubs name `cuda::std`).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>
#include <thrust/iterator/transform_iterator.h>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN
namespace paging::cuda {

namespace detail {
struct units_of {
  std::int32_t unit;
  KVTILE_HOST_DEVICE std::int32_t operator()(std::int32_t len) const { return (len + unit - 1) / unit; }
};

inline cudaError_t indptr_scan(const std::int32_t* d_lens, std::int32_t batch, std::int32_t* d_out, void* workspace,
                               std::size_t& bytes, cudaStream_t stream, std::int32_t unit) {
  const auto units = thrust::make_transform_iterator(d_lens, units_of{unit});
  return cub::DeviceScan::InclusiveSum(workspace, bytes, units, d_out, batch, stream);
}
}  // namespace detail

// Bytes of workspace build_device_indptr needs for batches of up to `max_batch` lengths.
inline std::size_t device_indptr_workspace(std::int32_t max_batch) {
  KVTILE_REQUIRE(max_batch >= 0, errc::invalid_argument, "batch must be >= 0, got ", max_batch);
  std::size_t bytes = 0;
  KVTILE_CUDA_CHECK(detail::indptr_scan(nullptr, max_batch, nullptr, nullptr, bytes, nullptr, 1));
  return bytes;
}

// d_indptr [batch + 1] from d_lens [batch], both in device memory, on `stream`.
inline void build_device_indptr(const std::int32_t* d_lens, std::int32_t batch, std::int32_t* d_indptr, void* workspace,
                                std::size_t workspace_bytes, cudaStream_t stream = nullptr, std::int32_t unit = 1) {
  KVTILE_REQUIRE(batch >= 0, errc::invalid_argument, "batch must be >= 0, got ", batch);
  KVTILE_REQUIRE(unit >= 1, errc::invalid_argument, "unit (1 for tokens, the page size for pages) must be >= 1, got ",
                 unit);
  KVTILE_REQUIRE(d_indptr != nullptr && (batch == 0 || d_lens != nullptr), errc::invalid_argument,
                 "build_device_indptr: null lengths or indptr");
  KVTILE_CUDA_CHECK(cudaMemsetAsync(d_indptr, 0, sizeof(std::int32_t), stream));
  if (batch == 0) return;
  const std::size_t need = device_indptr_workspace(batch);
  KVTILE_REQUIRE(workspace != nullptr && workspace_bytes >= need, errc::invalid_argument,
                 "build_device_indptr: the workspace has ", workspace_bytes, " bytes, a batch of ", batch, " needs ",
                 need, " (device_indptr_workspace)");
  std::size_t bytes = workspace_bytes;
  KVTILE_CUDA_CHECK(detail::indptr_scan(d_lens, batch, d_indptr + 1, workspace, bytes, stream, unit));
}

}  // namespace paging::cuda
KVTILE_NAMESPACE_END
