// kvtile/schedule/beam_search.hpp: parallel sampling and beam search on copy-on-write.
//
//   fork_samples(cache, prompt, n)   n sequences sharing every block of the prompt
//   beam_search<Cache>               k beams; each step keeps the k best candidates, frees the
//                                    pruned beams, forks the survivors, appends one token to
//                                    each, and runs all of the step's copies in one batch
//
// Shared blocks are never copied except a partially filled last block when two beams both
// write into it (copy-on-write); everything before it stays shared however the beams branch.
// bench/beam_search_bench.cpp reports blocks used against no sharing.
//
//   schedule::beam_search<cache_t> beams(cache, prompt_seq, /*width=*/4);
//   while (...) {
//     // score every (beam, next token) with the model, keep any number of candidates
//     const auto& slots = beams.step(candidates);   // slots[i]: where beam i's new token's K/V goes
//     cache.write(layer, k, v, stride, slots.data(), beams.size());
//   }
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN
namespace schedule {

// n sequences: the prompt itself and n - 1 forks of it (one reference-count increment per block each).
template <class Cache>
std::vector<std::uint64_t> fork_samples(Cache& cache, std::uint64_t prompt, std::int32_t n) {
  KVTILE_REQUIRE(n > 0, errc::invalid_argument, "number of samples must be positive, got ", n);
  std::vector<std::uint64_t> ids{prompt};
  (void)cache.num_tokens(prompt);  // an unknown id throws here, before anything is forked
  ids.reserve(std::size_t(n));
  try {
    while (std::int32_t(ids.size()) < n) ids.push_back(cache.fork(prompt));
  } catch (...) {
    for (std::size_t i = 1; i < ids.size(); ++i) cache.free(ids[i]);
    throw;
  }
  return ids;
}

struct beam_candidate {
  std::int32_t beam = 0;    // index of the parent beam (in beams())
  std::int32_t token = 0;   // the token it appends
  double score = 0;         // the candidate's cumulative score (higher is better)
};

template <class Cache>
class beam_search {
 public:
  // Starts with one beam: `prompt` (its K/V written). The search owns it from here on.
  beam_search(Cache& cache, std::uint64_t prompt, std::int32_t width) : cache_(cache), width_(width) {
    KVTILE_REQUIRE(width > 0, errc::invalid_argument, "beam width must be positive, got ", width);
    (void)cache.num_tokens(prompt);  // unknown id: throws
    beams_.push_back({prompt, 0.0, {}});
  }

  std::int32_t width() const { return width_; }
  std::int32_t size() const { return std::int32_t(beams_.size()); }
  std::uint64_t sequence(std::int32_t i) const { return at(i).seq; }
  double score(std::int32_t i) const { return at(i).score; }
  const std::vector<std::int32_t>& tokens(std::int32_t i) const { return at(i).tokens; }
  std::vector<std::uint64_t> sequences() const {
    std::vector<std::uint64_t> ids;
    for (const auto& b : beams_) ids.push_back(b.seq);
    return ids;
  }
  // Blocks the beams would hold if nothing were shared.
  std::int64_t blocks_without_sharing() const {
    std::int64_t n = 0;
    for (const auto& b : beams_) n += cache_.table(b.seq).num_blocks();
    return n;
  }
  // Copies the last step ran (in one batch).
  std::int64_t last_step_copies() const { return last_copies_; }

  // Keep the `width` best candidates (ties: the earlier one), free the beams none of them
  // continues, fork the beams several continue, append each survivor's token, run the step's
  // copy-on-write copies in one batch. Returns the slot of each beam's new token (in beams()
  // order, which is the survivors' order by score). On error nothing changed.
  const std::vector<std::int64_t>& step(std::span<const beam_candidate> candidates) {
    KVTILE_REQUIRE(!candidates.empty(), errc::invalid_argument, "beam step with no candidates");
    for (std::size_t i = 0; i < candidates.size(); ++i)
      KVTILE_REQUIRE(candidates[i].beam >= 0 && candidates[i].beam < size(), errc::out_of_range, "candidate ", i,
                     " continues beam ", candidates[i].beam, " of ", size());
    std::vector<std::size_t> order(candidates.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    const std::size_t keep = std::min(order.size(), std::size_t(width_));
    std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(keep), order.end(), [&](std::size_t a, std::size_t b) {
      return candidates[a].score > candidates[b].score || (candidates[a].score == candidates[b].score && a < b);
    });
    order.resize(keep);
    std::vector<std::int32_t> children(beams_.size(), 0);
    for (std::size_t i : order) ++children[std::size_t(candidates[i].beam)];

    // Blocks this step needs: a fork costs none; an append needs a fresh block when it starts a
    // block, or a copy when its partial last block is shared. Checked before anything changes
    // (against the blocks only pruned beams hold: a lower bound of what freeing them returns).
    std::int64_t need = 0;
    for (std::size_t p = 0; p < beams_.size(); ++p) {
      if (children[p] == 0) continue;
      const auto& t = cache_.table(beams_[p].seq);
      // A partial last block only this beam holds: the last of its children writes in place.
      const bool own_partial = t.tail_room() > 0 && cache_.blocks().refcount(t.last_block()) == 1;
      need += children[p] - (own_partial ? 1 : 0);
    }
    std::int64_t freed = 0;  // blocks only pruned beams hold come back (at most)
    KVTILE_REQUIRE(need <= cache_.stats().free + reclaimable(children, freed), errc::out_of_blocks, "beam step needs ",
                   need, " blocks, ", cache_.stats().free, " are free (+ at least ", freed, " from pruned beams)");
    KVTILE_REQUIRE(cache_.pending_copies().empty(), errc::invalid_argument, "beam step while ",
                   cache_.pending_copies().size(), " block copies are pending: run them first");

    // 1. Free the pruned beams (their blocks may serve this step's appends).
    for (std::size_t p = 0; p < beams_.size(); ++p)
      if (children[p] == 0) cache_.free(beams_[p].seq);
    // 2. Fork the survivors (forks are refused while copies are pending: all forks come first).
    std::vector<beam> next;
    next.reserve(keep);
    std::vector<bool> used(beams_.size(), false);
    for (std::size_t i : order) {
      const auto& c = candidates[i];
      const beam& parent = beams_[std::size_t(c.beam)];
      beam b{used[std::size_t(c.beam)] ? cache_.fork(parent.seq) : parent.seq, c.score, parent.tokens};
      used[std::size_t(c.beam)] = true;
      b.tokens.push_back(c.token);
      next.push_back(std::move(b));
    }
    // 3. Append one token each; copy-on-write records a copy per shared partial block.
    slots_.assign(next.size(), 0);
    for (std::size_t i = 0; i < next.size(); ++i) cache_.append(next[i].seq, 1, std::span(&slots_[i], 1));
    // 4. The step's copies, in one batch.
    last_copies_ = std::int64_t(cache_.pending_copies().size());
    cache_.run_pending_copies();
    beams_ = std::move(next);
    return slots_;
  }

  // Free every beam but the best; returns its sequence (the caller owns it from here on).
  std::uint64_t finish() {
    std::size_t best = 0;
    for (std::size_t i = 1; i < beams_.size(); ++i)
      if (beams_[i].score > beams_[best].score) best = i;
    for (std::size_t i = 0; i < beams_.size(); ++i)
      if (i != best) cache_.free(beams_[i].seq);
    const auto id = beams_[best].seq;
    beams_ = {beams_[best]};
    return id;
  }

 private:
  struct beam {
    std::uint64_t seq;
    double score;
    std::vector<std::int32_t> tokens;
  };
  const beam& at(std::int32_t i) const {
    KVTILE_REQUIRE(i >= 0 && i < size(), errc::out_of_range, "beam ", i, " of ", size());
    return beams_[std::size_t(i)];
  }
  // Blocks held by one pruned beam and nothing else.
  std::int64_t reclaimable(const std::vector<std::int32_t>& children, std::int64_t& freed) const {
    freed = 0;
    for (std::size_t p = 0; p < beams_.size(); ++p) {
      if (children[p] != 0) continue;
      for (auto b : cache_.table(beams_[p].seq).blocks()) freed += cache_.blocks().refcount(b) == 1;
    }
    return freed;
  }

  Cache& cache_;
  std::int32_t width_;
  std::vector<beam> beams_;
  std::vector<std::int64_t> slots_;
  std::int64_t last_copies_ = 0;
};

}  // namespace schedule
KVTILE_NAMESPACE_END
