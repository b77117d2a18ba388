// kvtile/attention/dense_view.hpp: non-owning views of dense (contiguous) Q, K, V, O tensors,
// fixed-length [batch, len, heads, dim] or ragged (varlen: packed [total, heads, dim] with
// cumulative lengths). The dense K/V source answers the same questions as paging::paged_kv
// (batch, kv_len(b), token_offset(b, t, h)), so a kernel is written once for both.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention {

// Where element (sequence b, token t, head h, dim 0) lives; the head_dim elements are contiguous.
struct ragged_layout {
  std::int64_t stride_batch = 0;         // elements between sequences (fixed-length only)
  std::int64_t stride_token = 0;         // elements between tokens
  std::int64_t stride_head = 0;          // elements between heads
  const std::int32_t* indptr = nullptr;  // [batch + 1] cumulative lengths, or null for fixed length
  std::int32_t batch = 0;
  std::int32_t len = 0;  // tokens per sequence when indptr is null
  std::int32_t heads = 0;
  std::int32_t head_dim = 0;

  KVTILE_HOST_DEVICE std::int32_t len_of(std::int32_t b) const { return indptr ? indptr[b + 1] - indptr[b] : len; }
  // Index of token t of sequence b among all tokens of the batch (rows of a [rows, heads] LSE).
  KVTILE_HOST_DEVICE std::int64_t row(std::int32_t b, std::int32_t t) const {
    return indptr ? std::int64_t(indptr[b]) + t : std::int64_t(b) * len + t;
  }
  KVTILE_HOST_DEVICE std::int64_t rows() const { return indptr ? std::int64_t(indptr[batch]) : std::int64_t(batch) * len; }
  KVTILE_HOST_DEVICE std::int64_t offset(std::int32_t b, std::int32_t t, std::int32_t h) const {
    return indptr ? std::int64_t(indptr[b] + t) * stride_token + std::int64_t(h) * stride_head
                  : std::int64_t(b) * stride_batch + std::int64_t(t) * stride_token + std::int64_t(h) * stride_head;
  }

  // Contiguous [batch, len, heads, dim].
  static constexpr ragged_layout fixed(std::int32_t batch, std::int32_t len, std::int32_t heads, std::int32_t head_dim) {
    ragged_layout l;
    l.stride_head = head_dim;
    l.stride_token = std::int64_t(heads) * head_dim;
    l.stride_batch = std::int64_t(len) * l.stride_token;
    l.batch = batch;
    l.len = len;
    l.heads = heads;
    l.head_dim = head_dim;
    return l;
  }
  // Packed [indptr[batch], heads, dim]; indptr must stay alive (host or device, wherever it is read).
  static constexpr ragged_layout varlen(const std::int32_t* indptr, std::int32_t batch, std::int32_t heads,
                                        std::int32_t head_dim) {
    ragged_layout l = fixed(batch, 0, heads, head_dim);
    l.stride_batch = 0;
    l.indptr = indptr;
    return l;
  }
};

// Queries or outputs: [batch, q_len, heads, head_dim] (or ragged).
template <class T>
struct dense_tensor {
  T* data = nullptr;
  ragged_layout layout;
  KVTILE_HOST_DEVICE T* at(std::int32_t b, std::int32_t t, std::int32_t h) const { return data + layout.offset(b, t, h); }
};

// Dense K and V with one shared layout: the KV source for prefill over contiguous memory.
template <class T>
struct dense_kv {
  T* k = nullptr;
  T* v = nullptr;
  ragged_layout layout;  // heads = num_kv_heads

  KVTILE_HOST_DEVICE std::int32_t batch() const { return layout.batch; }
  KVTILE_HOST_DEVICE std::int32_t kv_len(std::int32_t b) const { return layout.len_of(b); }
  KVTILE_HOST_DEVICE std::int64_t token_offset(std::int32_t b, std::int32_t t, std::int32_t h) const {
    return layout.offset(b, t, h);
  }
  KVTILE_HOST_DEVICE T* k_base() const { return k; }
  KVTILE_HOST_DEVICE T* v_base() const { return v; }
};

static_assert(std::is_trivially_copyable_v<dense_kv<float>>);

}  // namespace attention
KVTILE_NAMESPACE_END
