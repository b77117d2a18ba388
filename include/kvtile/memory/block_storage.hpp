// kvtile/memory/block_storage.hpp: the K and V block pools of every layer of a model.
//
// One block id addresses that block in every layer. Memory order, per pool (K and V apart):
//   [num_layers][num_blocks][block]   block = [page_size][num_kv_heads][head_dim] (NHD)
//                                          or [num_kv_heads][page_size][head_dim] (HND)
// Offsets are 64-bit throughout. Where the memory lives is the Memory policy. The codec
// (kv_codec.hpp) picks the stored element (T itself, or e4m3 bytes) and may add bytes to each
// block (fp8_e4m3<per_token_head>: the block's scales after its elements, so block copies
// carry them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "kvtile/core/checked.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/memory/memory_policy.hpp"
#include "kvtile/memory/pool_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

struct kv_shape {
  std::int32_t num_layers = 1;
  std::int32_t num_blocks = 0;
  std::int32_t page_size = 16;  // tokens per block
  std::int32_t num_kv_heads = 1;
  std::int32_t head_dim = 128;

  // page_size * num_kv_heads fits 62 bits (two int32); the third factor is checked.
  std::int64_t block_elems() const { return checked_mul(std::int64_t(page_size) * num_kv_heads, std::int64_t(head_dim), "block elements"); }
  // K and V of one token in every layer, in bytes.
  std::int64_t bytes_per_token(std::size_t elem_bytes) const {
    const std::int64_t per_layer = checked_mul(2 * std::int64_t(num_kv_heads) * head_dim, std::int64_t(elem_bytes),
                                               "bytes per token");
    return checked_mul(per_layer, std::int64_t(num_layers), "bytes per token");
  }
  // One pool (K, or V) of every layer, in bytes; an error naming the operands when it does not
  // fit 64-bit offsets. Checked before anything is allocated.
  // extra_block_bytes: what a codec stores in a block beyond its elements (scales).
  std::int64_t pool_bytes(std::size_t elem_bytes, std::int64_t extra_block_bytes = 0) const {
    const std::int64_t per_block =
        checked_add(checked_mul(block_elems(), checked_cast<std::int64_t>(elem_bytes, "element size"),
                                "pool bytes (block elements x element size)"),
                    extra_block_bytes, "pool bytes (block bytes + scales)");
    const std::int64_t per_layer = checked_mul(per_block, std::int64_t(num_blocks), "pool bytes (x num_blocks)");
    return checked_mul(per_layer, std::int64_t(num_layers), "pool bytes (x num_layers)");
  }
  // Every field in range, and the pools' sizes (for elem_bytes-byte elements) fit 64 bits.
  void check(std::size_t elem_bytes = 1, std::int64_t extra_block_bytes = 0) const {
    KVTILE_REQUIRE(num_layers > 0, errc::invalid_argument, "num_layers must be positive, got ", num_layers);
    KVTILE_REQUIRE(num_blocks >= 0, errc::invalid_argument, "num_blocks must be >= 0, got ", num_blocks);
    KVTILE_REQUIRE(page_size > 0, errc::invalid_argument, "page_size must be positive, got ", page_size);
    KVTILE_REQUIRE(num_kv_heads > 0, errc::invalid_argument, "num_kv_heads must be positive, got ", num_kv_heads);
    KVTILE_REQUIRE(head_dim > 0, errc::invalid_argument, "head_dim must be positive, got ", head_dim);
    (void)pool_bytes(elem_bytes, extra_block_bytes);
  }
};

// Elem: the compute type (what write_kv takes); the pools store Codec::storage<Elem>.
template <class Elem, memory_policy Memory = host_memory, kv_codec Codec = identity>
class block_storage {
  using T = typename Codec::template storage<Elem>;
  static_assert(std::is_trivially_copyable_v<T>, "K/V elements must be trivially copyable");

 public:
  using value_type = T;  // the stored element
  using element_type = Elem;
  using codec = Codec;
  using memory_type = Memory;

  block_storage(kv_shape shape, kv_layout layout, Memory memory = {}) : memory_(std::move(memory)), shape_(shape), layout_(layout) {
    const std::int64_t extra = Codec::block_extra_bytes(shape.page_size, shape.num_kv_heads);
    shape.check(sizeof(T), extra);
    bytes_ = checked_cast<std::size_t>(shape.pool_bytes(sizeof(T), extra), "pool bytes");
    k_ = static_cast<T*>(memory_.allocate(bytes_));
    try {
      v_ = static_cast<T*>(memory_.allocate(bytes_));
      memory_.zero(k_, bytes_);
      memory_.zero(v_, bytes_);
    } catch (...) {
      if (v_) memory_.deallocate(v_, bytes_);
      memory_.deallocate(k_, bytes_);
      throw;
    }
  }
  block_storage(const block_storage&) = delete;
  block_storage& operator=(const block_storage&) = delete;
  // A moved-from storage holds no blocks (num_blocks 0, null pools) and stays usable.
  block_storage(block_storage&& o) noexcept
      : memory_(std::move(o.memory_)), shape_(o.shape_), layout_(o.layout_), bytes_(std::exchange(o.bytes_, 0)),
        k_(std::exchange(o.k_, nullptr)), v_(std::exchange(o.v_, nullptr)), k_scales_(o.k_scales_), v_scales_(o.v_scales_) {
    o.shape_.num_blocks = 0;
  }
  block_storage& operator=(block_storage&& o) noexcept {
    if (this != &o) {
      release();
      memory_ = std::move(o.memory_);
      shape_ = o.shape_;
      layout_ = o.layout_;
      bytes_ = std::exchange(o.bytes_, 0);
      k_ = std::exchange(o.k_, nullptr);
      v_ = std::exchange(o.v_, nullptr);
      k_scales_ = o.k_scales_;
      v_scales_ = o.v_scales_;
      o.shape_.num_blocks = 0;
    }
    return *this;
  }
  ~block_storage() { release(); }

  const kv_shape& shape() const { return shape_; }
  kv_layout layout() const { return layout_; }
  Memory& memory() { return memory_; }
  std::size_t bytes_per_pool() const { return bytes_; }  // K alone (V is the same size)
  T* k_data() const { return k_; }
  T* v_data() const { return v_; }

  // fp8_e4m3<per_head>: the calibrated scales, [num_layers][num_kv_heads] floats for K and for V
  // in the memory the pools live in; the caller keeps them alive while the storage is used.
  void set_head_scales(const float* k_scales, const float* v_scales)
    requires per_head_scales<Codec>
  {
    KVTILE_REQUIRE(k_scales && v_scales, errc::invalid_argument, "set_head_scales: null scales (k ", k_scales, ", v ",
                   v_scales, ")");
    k_scales_ = k_scales;
    v_scales_ = v_scales;
  }

  // The kernel-facing view of one layer's pools.
  memory::kv_pool_view<T, Codec> layer(std::int32_t l) const {
    KVTILE_REQUIRE(l >= 0 && l < shape_.num_layers, errc::out_of_range, "layer ", l, " is outside [0, ",
                   shape_.num_layers, ")");
    const auto base = view(k_, v_);
    const std::int64_t off = std::int64_t(l) * shape_.num_blocks * base.stride_block;
    auto p = view(k_ + off, v_ + off);
    if constexpr (per_head_scales<Codec>) {
      if (k_scales_) {
        p.k_scale = k_scales_ + std::int64_t(l) * shape_.num_kv_heads;
        p.v_scale = v_scales_ + std::int64_t(l) * shape_.num_kv_heads;
      }
    }
    return p;
  }

  // All layers, in bytes, for block copies.
  kv_pool_set pools() const {
    const auto view = this->view(k_, v_);
    const auto e = std::int64_t(sizeof(T));
    kv_pool_set p;
    p.k = reinterpret_cast<std::byte*>(k_);
    p.v = reinterpret_cast<std::byte*>(v_);
    p.stride_layer = std::int64_t(shape_.num_blocks) * view.stride_block * e;
    if constexpr (per_token_scales<Codec>) {
      p.scale_offset = view.scale_offset;
      p.scale_token_bytes = std::int64_t(shape_.num_kv_heads) * std::int64_t(sizeof(float));
    }
    p.stride_block = view.stride_block * e;
    p.stride_token = view.stride_token * e;
    p.stride_head = view.stride_head * e;
    p.num_layers = shape_.num_layers;
    p.num_blocks = shape_.num_blocks;
    p.page_size = shape_.page_size;
    p.num_kv_heads = shape_.num_kv_heads;
    p.head_bytes = std::int64_t(shape_.head_dim) * e;
    p.layout = layout_;
    return p;
  }

 private:
  memory::kv_pool_view<T, Codec> view(T* k, T* v) const {
    return memory::kv_pool_view<T, Codec>::make(k, v, layout_, shape_.num_blocks, shape_.page_size, shape_.num_kv_heads,
                                                shape_.head_dim);
  }
  void release() noexcept {
    if (k_) memory_.deallocate(k_, bytes_);
    if (v_) memory_.deallocate(v_, bytes_);
    k_ = v_ = nullptr;
  }
  Memory memory_;
  kv_shape shape_;
  kv_layout layout_;
  std::size_t bytes_ = 0;
  T* k_ = nullptr;
  T* v_ = nullptr;
  const float* k_scales_ = nullptr;  // per_head: [num_layers][num_kv_heads], not owned
  const float* v_scales_ = nullptr;
};

}  // namespace memory
KVTILE_NAMESPACE_END
