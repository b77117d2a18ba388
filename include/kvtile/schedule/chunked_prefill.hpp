// kvtile/schedule/chunked_prefill.hpp: a step scheduler that keeps decodes moving while long
// prompts are prefilled in chunks.
//
// Every step has a token budget. The scheduler fills it in this order:
//   1. running decodes, one token each (oldest request first);
//   2. prompts being prefilled, a chunk each, oldest first;
//   3. waiting prompts (first come, first served), admitted only when all their blocks fit with
//      `watermark_blocks` to spare (so decodes admitted earlier still have room to grow), each
//      cut to what is left of the budget.
// When an append finds the pool empty, the newest running request is preempted: its sequence
// is freed (blocks released) and it goes back to the front of the waiting queue, to be
// recomputed (prompt + the tokens it had generated) when it fits again. Nothing is ever
// dropped: every request finishes or stays queued.
//
// With chunked = false the scheduler is prefill-first (what servers did before chunked
// prefill): while prompts wait and fit, a step prefills whole prompts and runs no decode; one
// long prompt stalls every decode for its whole prefill. bench/scheduler_bench.cpp compares the two.
//
// step() returns one mixed batch, in the form the paged kernels take
// (attention/cuda/append.cuh, decode.cuh): q_indptr [batch + 1] over the new tokens (decodes
// first, q_len 1), the CSR page table of the batch's sequences after the step's appends
// (kv_len = cached + new tokens), and the slot of every new token for the K/V write. Run the
// cache's pending copies, write K/V, plan and run attention on it, then call step() again.
//
//   schedule::chunked_prefill_scheduler<cache_t::manager_type> s(cache.blocks(), {.token_budget = 512});
//   auto r = s.submit({.prompt_len = 3000, .max_new_tokens = 128});
//   while (s.has_work()) { const auto& b = s.step(); cache.run_pending_copies(); ... }
//   s.retire_finished();  // the last step's finished requests give their blocks back
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <span>
#include <utility>
#include <vector>

#include "kvtile/caching/prefix_cache.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/paging/page_table_export.hpp"

KVTILE_NAMESPACE_BEGIN
namespace schedule {

using request_id = std::uint64_t;

struct scheduler_options {
  std::int32_t token_budget = 2048;     // new tokens per step (decodes + prefill chunks)
  std::int32_t max_running = 256;       // requests holding blocks at once (the decode batch limit)
  std::int32_t watermark_blocks = 0;    // blocks left free when a prompt is admitted
  bool chunked = true;                  // false: prefill-first, whole prompts, no decode beside them
};

struct request_spec {
  std::int64_t prompt_len = 0;
  std::int64_t max_new_tokens = 1;  // tokens generated (the first one by the prefill's last chunk)
  // The prompt's token ids (prompt_len of them), optional: with a prefix-caching allocator
  // (caching/prefix_cache.hpp) the cached prefix is shared at admission instead of prefilled.
  // Publish the request's blocks (publish_prefix on sequence(r)) once its K/V are written.
  std::vector<caching::token_id> tokens;
  std::uint64_t salt = 0;
};

enum class request_state { waiting, prefilling, decoding, finished };

// One sequence of the step's batch.
struct batch_item {
  request_id request = 0;
  std::uint64_t sequence = 0;
  std::int32_t q_len = 0;   // new tokens this step
  std::int64_t kv_len = 0;  // cached + new tokens
  bool decode = false;      // a decode (q_len 1) rather than a prefill chunk
  bool last_chunk = false;  // the prompt's last chunk: its last token's logits sample a token
};

struct step_batch {
  std::vector<batch_item> items;           // [batch]: decodes first, then prefill chunks
  std::vector<std::uint64_t> sequences;    // [batch]
  std::vector<std::int32_t> q_indptr;      // [batch + 1]
  std::vector<std::int64_t> slots;         // [q_indptr.back()]: where each new token's K/V goes
  paging::csr_page_table_host table;       // [batch] page tables after the step's appends
  std::vector<request_id> preempted;       // sent back to the waiting queue during this step
  std::vector<request_id> finished;        // generated their last token in this step
  std::int32_t num_decodes = 0;
  std::int64_t prefill_tokens = 0;
  std::int64_t prefix_hit_tokens = 0;      // prompt tokens admissions found in the prefix cache

  std::int32_t batch() const { return std::int32_t(items.size()); }
  std::int64_t num_tokens() const { return q_indptr.empty() ? 0 : q_indptr.back(); }
};

template <class Manager>
class chunked_prefill_scheduler {
 public:
  chunked_prefill_scheduler(Manager& m, scheduler_options opt) : m_(m), opt_(opt) {
    KVTILE_REQUIRE(opt.max_running > 0, errc::invalid_argument, "max_running must be positive, got ", opt.max_running);
    KVTILE_REQUIRE(opt.token_budget >= opt.max_running, errc::invalid_argument, "token_budget ", opt.token_budget,
                   " is smaller than one decode step of max_running = ", opt.max_running, " requests");
    KVTILE_REQUIRE(opt.watermark_blocks >= 0 && opt.watermark_blocks < m.num_blocks(), errc::invalid_argument,
                   "watermark_blocks ", opt.watermark_blocks, " must be in [0, ", m.num_blocks(), ")");
  }

  const scheduler_options& options() const { return opt_; }

  request_id submit(request_spec spec) {
    KVTILE_REQUIRE(spec.prompt_len > 0, errc::invalid_argument, "prompt_len must be positive, got ", spec.prompt_len);
    KVTILE_REQUIRE(spec.tokens.empty() || std::int64_t(spec.tokens.size()) == spec.prompt_len, errc::invalid_argument,
                   "a request of prompt_len ", spec.prompt_len, " comes with ", spec.tokens.size(), " token ids");
    KVTILE_REQUIRE(spec.max_new_tokens > 0, errc::invalid_argument, "max_new_tokens must be positive, got ",
                   spec.max_new_tokens);
    const std::int64_t blocks = (spec.prompt_len + spec.max_new_tokens + m_.page_size() - 1) / m_.page_size();
    KVTILE_REQUIRE(blocks + opt_.watermark_blocks <= m_.num_blocks(), errc::out_of_blocks, "a request of ",
                   spec.prompt_len, " + ", spec.max_new_tokens, " tokens needs ", blocks,
                   " blocks, the pool has ", m_.num_blocks(), " (watermark ", opt_.watermark_blocks, ")");
    reqs_.push_back(request{std::move(spec)});
    const request_id id = reqs_.size() - 1;
    waiting_.push_back(id);
    return id;
  }

  request_state state(request_id r) const { return get(r, "state of").state; }
  std::int64_t generated(request_id r) const { return get(r, "generated tokens of").generated; }
  std::int64_t num_preemptions(request_id r) const { return get(r, "preemptions of").preemptions; }
  // The request's sequence in the cache (while it holds blocks).
  std::uint64_t sequence(request_id r) const {
    const request& q = get(r, "sequence of");
    KVTILE_REQUIRE(q.has_seq, errc::invalid_argument, "request ", r, " holds no sequence now");
    return q.seq;
  }
  std::size_t num_waiting() const { return waiting_.size(); }
  std::size_t num_running() const { return running_.size(); }
  bool has_work() const { return !waiting_.empty() || !running_.empty(); }

  // Stop a request now: its blocks are released; it never appears in a batch again.
  void abort(request_id r) {
    request& q = get(r, "abort");
    KVTILE_REQUIRE(q.state != request_state::finished, errc::invalid_argument, "abort of request ", r,
                   ": it has finished");
    if (q.has_seq) release(r);
    std::erase(running_, r);
    std::erase(waiting_, r);
    q.state = request_state::finished;
  }

  // The requests that finished in the last step give their blocks back (step() does this at its
  // start; call it after the last step, once its batch has run). The last batch is cleared.
  void retire_finished() {
    for (request_id r : batch_.finished) release(r);
    batch_ = step_batch{};
  }

  // Plan and book one step; the batch stays valid until the next call.
  const step_batch& step() {
    // Requests that generated their last token in the previous step give their blocks back now:
    // that step's batch no longer needs them.
    retire_finished();
    std::int64_t budget = opt_.token_budget;
    bool prefill_only = false;
    if (!opt_.chunked)
      prefill_only = !waiting_.empty() && std::int64_t(running_.size()) < opt_.max_running && fits_whole(waiting_.front());

    // 1. Decodes, oldest first. A decode that finds the pool empty preempts the newest running
    // request (which may be itself).
    if (!prefill_only) {
      for (std::size_t i = 0; i < running_.size(); ++i) {
        const request_id r = running_[i];
        if (reqs_[r].state != request_state::decoding) continue;
        if (!grow(r, 1, i)) break;  // r itself was preempted: everything after it is newer
        add_item(r, 1, true, false);
        --budget;
      }
    }
    // 2. Prompts already being prefilled.
    for (std::size_t i = 0; i < running_.size() && budget > 0; ++i) {
      const request_id r = running_[i];
      request& q = reqs_[r];
      if (q.state != request_state::prefilling) continue;
      const std::int64_t chunk = std::min(budget, q.target() - q.done);
      if (!grow(r, chunk, i)) break;
      add_item(r, std::int32_t(chunk), false, q.done + chunk == q.target());
      budget -= chunk;
    }
    // 3. Waiting prompts, first come first served, while their blocks fit.
    while (!waiting_.empty() && std::int64_t(running_.size()) < opt_.max_running && (budget > 0 || prefill_only)) {
      const request_id r = waiting_.front();
      if (!fits_whole(r)) break;  // FCFS: nothing overtakes the head of the queue
      request& q = reqs_[r];
      if (prefill_only && q.target() > budget && !batch_.items.empty()) break;  // a whole prompt, or none
      waiting_.pop_front();
      q.seq = m_.create();
      q.has_seq = true;
      q.state = request_state::prefilling;
      q.done = 0;
      // With a prefix-caching allocator, the cached part of the prompt is shared, not computed.
      if constexpr (requires { m_.allocator().match(std::span<const caching::token_id>{}, 1, 0, 0); }) {
        if (!q.spec.tokens.empty()) q.done = caching::admit_prefix(m_, q.seq, q.spec.tokens, q.spec.salt);
        batch_.prefix_hit_tokens += q.done;
      }
      // the first prompt of a prefill-first step goes whole, beyond the budget
      const std::int64_t chunk = prefill_only ? q.target() - q.done : std::min(budget, q.target() - q.done);
      running_.push_back(r);
      if (!grow(r, chunk, running_.size() - 1)) break;  // fits (checked above); else back in the queue
      add_item(r, std::int32_t(chunk), false, q.done + chunk == q.target());
      budget -= chunk;
    }
    finish_batch();
    return batch_;
  }

  const step_batch& last_batch() const { return batch_; }

 private:
  struct request {
    request_spec spec;
    request_state state = request_state::waiting;
    std::uint64_t seq = 0;
    bool has_seq = false;
    std::int64_t generated = 0;   // tokens generated so far (kept across preemptions)
    std::int64_t done = 0;        // prompt tokens (incl. recomputed generated ones) in the cache
    std::int64_t recompute = 0;   // generated tokens to prefill again after a preemption
    std::int64_t preemptions = 0;
    std::int64_t target() const { return spec.prompt_len + recompute; }  // tokens to prefill
  };

  const request& get(request_id r, const char* what) const {
    KVTILE_REQUIRE(r < reqs_.size(), errc::unknown_sequence, what, " request ", r, ": no such request (",
                   reqs_.size(), " submitted)");
    return reqs_[r];
  }
  request& get(request_id r, const char* what) { return const_cast<request&>(std::as_const(*this).get(r, what)); }

  std::int64_t blocks_for(std::int64_t n) const { return (n + m_.page_size() - 1) / m_.page_size(); }
  bool fits_whole(request_id r) const {
    return blocks_for(reqs_[r].target()) + opt_.watermark_blocks <= m_.num_free_blocks();
  }

  // Append n tokens to running request running_[pos], preempting the newest running requests
  // while the pool is short. false: running_[pos] itself was preempted.
  bool grow(request_id r, std::int64_t n, std::size_t pos) {
    const auto& t = m_.table(reqs_[r].seq);
    const bool cow = t.tail_room() > 0 && m_.refcount(t.last_block()) > 1;
    const std::int64_t need = blocks_for(t.num_tokens() + n) - t.num_blocks() + (cow ? 1 : 0);
    while (m_.num_free_blocks() < need && running_.size() > pos + 1) preempt(running_.back());
    const std::size_t at = slots_.size();
    slots_.resize(at + std::size_t(n));
    try {
      m_.append(reqs_[r].seq, n, std::span(slots_).subspan(at));
    } catch (const kvtile::error& e) {
      slots_.resize(at);
      if (e.code() != errc::out_of_blocks) throw;
      preempt(r);
      return false;
    }
    return true;
  }

  void preempt(request_id r) {
    request& q = reqs_[r];
    // Tokens of r already in this batch leave it (their slots may be reused right away).
    for (std::size_t i = 0; i < batch_.items.size(); ++i) {
      if (batch_.items[i].request != r) continue;
      const std::int32_t n = batch_.items[i].q_len;
      const std::size_t first = item_slot_begin_[i];
      slots_.erase(slots_.begin() + std::ptrdiff_t(first), slots_.begin() + std::ptrdiff_t(first + std::size_t(n)));
      for (std::size_t j = i + 1; j < item_slot_begin_.size(); ++j) item_slot_begin_[j] -= std::size_t(n);
      batch_.items.erase(batch_.items.begin() + std::ptrdiff_t(i));
      item_slot_begin_.erase(item_slot_begin_.begin() + std::ptrdiff_t(i));
      break;
    }
    m_.free(q.seq);
    q.has_seq = false;
    q.state = request_state::waiting;
    q.done = 0;
    // Prefill again the prompt and every generated token; the last chunk samples the next one.
    q.recompute = q.generated;
    ++q.preemptions;
    std::erase(running_, r);
    waiting_.push_front(r);
    batch_.preempted.push_back(r);
  }

  void release(request_id r) {
    request& q = reqs_[r];
    if (!q.has_seq) return;
    m_.free(q.seq);
    q.has_seq = false;
  }

  void add_item(request_id r, std::int32_t n, bool decode, bool last_chunk) {
    request& q = reqs_[r];
    item_slot_begin_.push_back(slots_.size() - std::size_t(n));
    batch_.items.push_back({r, q.seq, n, m_.num_tokens(q.seq), decode, last_chunk});
    if (!decode) q.done += n;
  }

  // Book the step: decodes and last chunks each produce a token; build the kernel views.
  void finish_batch() {
    std::int32_t off = 0;
    batch_.q_indptr.push_back(0);
    for (auto& it : batch_.items) {
      request& q = reqs_[it.request];
      it.kv_len = m_.num_tokens(it.sequence);
      off += it.q_len;
      batch_.q_indptr.push_back(off);
      batch_.sequences.push_back(it.sequence);
      if (it.decode) ++batch_.num_decodes;
      else batch_.prefill_tokens += it.q_len;
      if (it.decode || it.last_chunk) {
        ++q.generated;
        q.state = request_state::decoding;
        if (q.generated >= q.spec.max_new_tokens) {
          q.state = request_state::finished;
          batch_.finished.push_back(it.request);
        }
      }
    }
    for (request_id r : batch_.finished) std::erase(running_, r);
    batch_.slots = std::move(slots_);
    slots_.clear();
    item_slot_begin_.clear();
    batch_.table = m_.to_csr(batch_.sequences);
  }

  Manager& m_;
  scheduler_options opt_;
  std::vector<request> reqs_;
  std::deque<request_id> waiting_;
  std::vector<request_id> running_;  // admission order: the back is the newest
  step_batch batch_;
  std::vector<std::int64_t> slots_;
  std::vector<std::size_t> item_slot_begin_;
};

}  // namespace schedule
KVTILE_NAMESPACE_END
