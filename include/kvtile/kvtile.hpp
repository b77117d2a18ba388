// <kvtile/kvtile.hpp>: everything in kvtile that needs no CUDA.
#pragma once

#include "kvtile/core/config.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

#include "kvtile/paging/paged_view.hpp"

#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/kv_source.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/reference.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/attention/tile_shape.hpp"
