// The CPU configurations compiled into kvtile_bench: fp32 and bf16 at head dims 64 and 128
// with the default 64 x 64 tile, a tile sweep at fp32 D 128 causal, and fp16 at D 128.
// Each line adds prefill, decode and append; add yours below (or in a file of your own, see
// bench/README.md). Every line costs compile time: keep this set small.
#include "kvtile/bench/cpu_runners.hpp"

namespace {

using namespace kvtile::attention;
using kvtile::bench::add_cpu_attention;
using bf16 = kvtile::bfloat16;
using fp16 = kvtile::half;

const bool registered[] = {
    add_cpu_attention<float, 64, tile_shape<64, 64>, no_mask, true>(),
    add_cpu_attention<float, 64, tile_shape<64, 64>, causal_mask, true>(),
    add_cpu_attention<float, 128, tile_shape<64, 64>, no_mask, true>(),
    add_cpu_attention<float, 128, tile_shape<64, 64>, causal_mask, true>(),
    add_cpu_attention<float, 128, tile_shape<32, 64>, causal_mask>(),
    add_cpu_attention<float, 128, tile_shape<128, 64>, causal_mask>(),
    add_cpu_attention<bf16, 64, tile_shape<64, 64>, no_mask, true>(),
    add_cpu_attention<bf16, 64, tile_shape<64, 64>, causal_mask, true>(),
    add_cpu_attention<bf16, 128, tile_shape<64, 64>, no_mask, true>(),
    add_cpu_attention<bf16, 128, tile_shape<64, 64>, causal_mask, true>(),
    add_cpu_attention<fp16, 128, tile_shape<64, 64>, causal_mask, true>(),
};

}  // namespace
