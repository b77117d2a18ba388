// kvtile/attention/cuda/smem_tile.cuh: how the CUDA kernels lay K, V and Q tiles out in shared
// memory, and a tile as the mma.sync mainloop (mma_warp.cuh) reads it.
#pragma once

#include <cstdint>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// Element offset of (row, col) in a tile of D columns; col is a multiple of 8 (one 16-byte
// chunk), which is all ldmatrix asks for.
template <int D>
struct padded_tile {  // rows D + 8 elements apart: an odd number of 16-byte chunks, so the 8 rows
                      // one ldmatrix (or a warp of cp.async) touches fall in 8 bank groups
  static constexpr int pitch = D + 8;
  static constexpr bool linear = true;  // at(r0 + r, c0 + c) = at(r0, c0) + at(r, c)
  static KVTILE_HOST_DEVICE KVTILE_FORCEINLINE constexpr int at(int row, int col) { return row * pitch + col; }
};
// Byte offset of (row, byte column) in a tile of 1-byte elements (fp8 pages); col is a multiple
// of 16. Rows RowBytes apart (cp.async), or the 128-byte swizzle a TMA box writes: RowBytes / 128
// panels of [Rows][128 bytes], the 16-byte chunk index XORed with row % 8.
template <int RowBytes>
struct padded_byte_rows {
  static KVTILE_DEVICE KVTILE_FORCEINLINE int at(int row, int col) { return row * RowBytes + col; }
};
template <int RowBytes, int Rows>
struct swizzled_byte_tile {
  static_assert(RowBytes % 128 == 0, "swizzled_byte_tile: rows must be whole 128-byte panels");
  static KVTILE_DEVICE KVTILE_FORCEINLINE int at(int row, int col) {
    return (col / 128) * (Rows * 128) + row * 128 + ((((col % 128) / 16) ^ (row % 8)) * 16);
  }
};
template <int D, int Rows>
struct swizzled_tile {  // the same swizzle over 2-byte elements: D / 64 panels of [Rows][64]
  static_assert(D % 64 == 0, "swizzled_tile: D must be a multiple of 64");
  static KVTILE_DEVICE KVTILE_FORCEINLINE int at(int row, int col) { return swizzled_byte_tile<2 * D, Rows>::at(row, 2 * col) / 2; }
};

template <class Layout>
concept linear_layout = requires { requires Layout::linear; };

// A K or V tile in shared memory as the mainloop reads it: a tile laid out by Layout whose
// element (0, 0) is at shared-window address `base`; row0 is the first key of the warp's slice.
// lane(r, c) gives the addresses one lane reads, addr(row, col) that of element (row0 + r + row,
// c + col) for the mainloop's steps (row, col): with a linear layout the lane's part is folded
// into a base once, so that each step is a constant offset.
template <class T, class Layout>
struct smem_tile {
  std::uint32_t base;
  int row0 = 0;

  struct linear_lane {
    std::uint32_t base;
    KVTILE_DEVICE KVTILE_FORCEINLINE std::uint32_t addr(int row, int col) const {
      return base + std::uint32_t(Layout::at(row, col) * int(sizeof(T)));
    }
  };
  struct general_lane {
    std::uint32_t base;
    int r, c;
    KVTILE_DEVICE KVTILE_FORCEINLINE std::uint32_t addr(int row, int col) const {
      return base + std::uint32_t(Layout::at(r + row, c + col) * int(sizeof(T)));
    }
  };
  KVTILE_DEVICE KVTILE_FORCEINLINE auto lane(int r, int c) const {
    if constexpr (linear_layout<Layout>)
      return linear_lane{base + std::uint32_t(Layout::at(row0 + r, c) * int(sizeof(T)))};
    else
      return general_lane{base, row0 + r, c};
  }
};

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
