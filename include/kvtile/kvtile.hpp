// <kvtile/kvtile.hpp>: everything in kvtile that needs no CUDA.
#pragma once

#include "kvtile/core/config.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"
#include "kvtile/core/version.hpp"

#include "kvtile/memory/block_allocator.hpp"
#include "kvtile/memory/block_copy.hpp"
#include "kvtile/memory/block_storage.hpp"
#include "kvtile/memory/kv_write.hpp"
#include "kvtile/memory/lifo_allocator.hpp"
#include "kvtile/memory/lowest_id_allocator.hpp"
#include "kvtile/memory/memory_policy.hpp"

#include "kvtile/paging/page_table.hpp"
#include "kvtile/paging/page_table_export.hpp"
#include "kvtile/paging/paged_view.hpp"

#include "kvtile/sharing/copy_on_write.hpp"
#include "kvtile/sharing/sharing_policy.hpp"

#include "kvtile/kv_cache.hpp"

#include "kvtile/caching/block_hash.hpp"
#include "kvtile/caching/lru_list.hpp"
#include "kvtile/caching/prefix_cache.hpp"
#include "kvtile/caching/sink_window_eviction.hpp"

#include "kvtile/schedule/beam_search.hpp"
#include "kvtile/schedule/chunked_prefill.hpp"

#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/kv_source.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/reference.hpp"
#include "kvtile/attention/reference_backward.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/attention/variant.hpp"

#include "kvtile/attention/cpu/backward.hpp"
#include "kvtile/attention/cpu/checks.hpp"
#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/attention/cpu/thread_pool.hpp"
#include "kvtile/attention/cpu/tile_math.hpp"
