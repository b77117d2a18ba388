// The CUDA configurations compiled into kvtile_bench: bf16, head dim 128 (the ANCHORS shapes):
// prefill without mask and causal (default tile; on Hopper run() takes the sm_90a kernel), and
// the paged kernels (decode and append) with the causal mask. Each line instantiates kernels
// for every architecture the build targets (CI: sm_80 and sm_90a on 2 cores), so this set stays
// small; add yours in a file of your own (bench/README.md).
#include "kvtile/bench/cuda_runners.cuh"

namespace {

using namespace kvtile::attention;
using bf16 = kvtile::bfloat16;

const bool registered[] = {
    kvtile::bench::add_cuda_prefill<bf16, 128, no_mask>(),
    kvtile::bench::add_cuda_prefill<bf16, 128, causal_mask>(),
    kvtile::bench::add_cuda_paged<bf16, 128, causal_mask>(),
};

}  // namespace
