// tests/emulation: kvtile/memory/cuda/fp8_convert.cuh on the host: declared only (the emulated
// kernels read 2-byte pages; an fp8 instantiation would fail to link).
#pragma once
#include <cstdint>
#include "kvtile/core/config.hpp"
KVTILE_NAMESPACE_BEGIN
namespace memory::cuda {
template <class T>
void e4m3x4_to(std::uint32_t x, std::uint32_t& lo, std::uint32_t& hi);
}  // namespace memory::cuda
KVTILE_NAMESPACE_END
