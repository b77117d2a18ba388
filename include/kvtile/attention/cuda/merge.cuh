// kvtile/attention/cuda/merge.cuh: merging attention states (O, LSE) on the GPU.
//
// An attention state of a query row over some keys is its normalised output o (head_dim
// values) and its natural-log LSE. Two states of the same row over disjoint key sets merge
// into the state over their union (attention::merge_lse gives the weights; two empty states,
// LSE -inf, merge to zeros and -inf, never NaN). Split-KV decoding, cascade (shared-prefix)
// attention and context parallelism all end with this merge.
//
//   merge_state_step        device (merge_step.cuh): fold one state into a running one
//   merge_states            host: o = merge(a, b) row by row; o may alias a or b
//   merge_state_list        host: o = merge of num_states states stacked [num_states, rows, D]
//
// Layouts: o tensors are [rows, head_dim] row-major (rows = tokens x heads), LSE [rows].
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/merge_step.cuh"
#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

namespace detail {

// One thread per (row, 4 values). States i = 0..n-1 of row r are at o + i*state_stride + r*D.
template <class TIn, class TOut>
KVTILE_KERNEL void merge_states_kernel(const TIn* o_a, const float* lse_a, const TIn* o_b, const float* lse_b,
                                       std::int64_t stride_b, int num_states, TOut* o, float* lse, std::int64_t rows,
                                       int head_dim) {
  const int per_row = head_dim / 4;
  const std::int64_t idx = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * per_row) return;
  const std::int64_t r = idx / per_row;
  const int c = int(idx % per_row) * 4;
  float acc[4];
  load4(acc, o_a + r * head_dim + c);
  float acc_lse = lse_a[r];
  for (int i = 0; i < num_states - 1; ++i) {
    float ob[4];
    load4(ob, o_b + std::int64_t(i) * stride_b * head_dim + r * head_dim + c);
    merge_state_step(acc, acc_lse, ob, lse_b[std::int64_t(i) * stride_b + r]);
  }
  store4(o + r * head_dim + c, acc);
  if (c == 0 && lse) lse[r] = acc_lse;
}

inline void check_merge_args(const void* a, const void* o, std::int64_t rows, int head_dim) {
  KVTILE_REQUIRE(rows >= 0, errc::invalid_argument, "merge: rows is negative: ", rows);
  KVTILE_REQUIRE(head_dim > 0 && head_dim % 4 == 0, errc::invalid_argument, "merge: head_dim must be a positive multiple of 4, got ",
                 head_dim);
  KVTILE_REQUIRE(rows == 0 || (a && o), errc::invalid_argument, "merge: null input or output");
  KVTILE_REQUIRE(reinterpret_cast<std::uintptr_t>(a) % 16 == 0 && reinterpret_cast<std::uintptr_t>(o) % 8 == 0,
                 errc::invalid_argument, "merge: tensors must be 16-byte (input) and 8-byte (output) aligned");
}

}  // namespace detail

// o = merge(a, b), row by row: [rows, head_dim] outputs and [rows] LSEs (lse may be null).
// In-place use (o == o_a) is allowed.
template <class T>
void merge_states(const T* o_a, const float* lse_a, const T* o_b, const float* lse_b, T* o, float* lse, std::int64_t rows,
                  int head_dim, cudaStream_t stream = nullptr) {
  detail::check_merge_args(o_a, o, rows, head_dim);
  KVTILE_REQUIRE(rows == 0 || (o_b && lse_a && lse_b), errc::invalid_argument, "merge_states: null input");
  if (rows == 0) return;
  const std::int64_t n = rows * (head_dim / 4);
  detail::merge_states_kernel<T, T><<<unsigned((n + 255) / 256), 256, 0, stream>>>(o_a, lse_a, o_b, lse_b, 0, 2, o, lse, rows,
                                                                                   head_dim);
  KVTILE_CUDA_CHECK_LAUNCH();
}

// o = merge of num_states states: o_parts [num_states, rows, head_dim], lse_parts [num_states, rows].
template <class TIn, class TOut>
void merge_state_list(const TIn* o_parts, const float* lse_parts, int num_states, TOut* o, float* lse, std::int64_t rows,
                      int head_dim, cudaStream_t stream = nullptr) {
  detail::check_merge_args(o_parts, o, rows, head_dim);
  KVTILE_REQUIRE(num_states >= 1, errc::invalid_argument, "merge_state_list: num_states must be >= 1, got ", num_states);
  KVTILE_REQUIRE(rows == 0 || lse_parts, errc::invalid_argument, "merge_state_list: null LSE input");
  if (rows == 0) return;
  const std::int64_t n = rows * (head_dim / 4);
  detail::merge_states_kernel<TIn, TOut><<<unsigned((n + 255) / 256), 256, 0, stream>>>(
      o_parts, lse_parts, o_parts + rows * head_dim, lse_parts + rows, rows, num_states, o, lse, rows, head_dim);
  KVTILE_CUDA_CHECK_LAUNCH();
}

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
