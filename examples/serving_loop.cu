// One step of a serving loop over a paged K/V cache: a batch that mixes decoding requests (one
// new token each) with a chunk of a long prompt (chunked prefill), as a scheduler emits it.
//   1. build the batch: query lengths and each request's pages (host copies),
//   2. plan on the host (split-KV chosen from the batch and the SM count), upload the plan,
//   3. write the new tokens' K/V into their slots of the pages,
//   4. run the attention (graph-safe), then
//   5. merge: attend the same queries to a second, shared-prefix cache level and fold the two
//      states together with merge_states (cascade attention).
// Prints the largest difference to a plain CPU evaluation. Needs a CUDA GPU (sm_80+).
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include <kvtile/attention/cuda/append.cuh>
#include <kvtile/attention/cuda/merge.cuh>
#include <kvtile/attention/reference.hpp>

using namespace kvtile;
using namespace kvtile::attention;
namespace kc = kvtile::attention::cuda;
using T = kvtile::bfloat16;

constexpr int kHeadDim = 128, kQoHeads = 16, kKvHeads = 4, kPage = 16, kPoolBlocks = 256;

template <class U>
U* to_device(const std::vector<U>& h) {
  U* p = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(1, h.size()) * sizeof(U)));
  KVTILE_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(U), cudaMemcpyHostToDevice));
  return p;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 0;
  }
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);

  // 1. The batch: three decodes (cached 40, 130, 7 tokens + 1 new) and a 96-token chunk of a
  //    prompt whose first 200 tokens were prefilled in earlier steps.
  const std::vector<std::int32_t> q_len = {1, 1, 96, 1};
  const std::vector<std::int32_t> kv_len = {41, 131, 296, 8};  // cached + new
  const int batch = int(q_len.size());
  std::vector<std::int32_t> q_indptr{0}, kv_indptr{0}, indices, last_page_len;
  std::vector<std::int32_t> free_blocks(kPoolBlocks);
  std::iota(free_blocks.begin(), free_blocks.end(), 0);
  std::shuffle(free_blocks.begin(), free_blocks.end(), rng);  // pages land anywhere in the pool
  for (int b = 0; b < batch; ++b) {
    const int pages = (kv_len[b] + kPage - 1) / kPage;
    for (int i = 0; i < pages; ++i) {
      indices.push_back(free_blocks.back());
      free_blocks.pop_back();
    }
    q_indptr.push_back(q_indptr.back() + q_len[b]);
    kv_indptr.push_back(std::int32_t(indices.size()));
    last_page_len.push_back(kv_len[b] - (pages - 1) * kPage);
  }
  const paging::csr_page_table host_table{kv_indptr.data(), indices.data(), last_page_len.data(), batch};

  // 2. Plan on the host; the workspace belongs to the caller.
  const kc::paged_problem problem{kQoHeads, kKvHeads, kHeadDim, kPage, kPoolBlocks, 2};
  const kc::paged_plan plan =
      kc::plan_append<causal_mask>(q_indptr.data(), host_table, problem, {}, kc::query_device_limits());
  void* workspace = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&workspace, plan.workspace_bytes()));
  kc::upload_plan(plan, workspace);
  std::printf("plan: %zu CTAs, %zu work items (%s kernel), %d split partial states\n", plan.ctas(), plan.work.size(),
              kc::to_string(plan.shape.kind), plan.num_partials);

  // 3. K/V of every token (the cached ones stand for earlier steps' writes), into the pool.
  const auto pool_h = paging::kv_pool_view<T>::make(nullptr, nullptr, kv_layout::nhd, kPoolBlocks, kPage, kKvHeads, kHeadDim);
  const std::size_t pool_elems = std::size_t(kPoolBlocks) * kPage * kKvHeads * kHeadDim;
  std::vector<T> k(pool_elems, T(0.f)), v(pool_elems, T(0.f));
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < kv_len[b]; ++t)
      for (int h = 0; h < kKvHeads; ++h) {
        const auto off = pool_h.offset(indices[kv_indptr[b] + t / kPage], t % kPage, h);
        for (int x = 0; x < kHeadDim; ++x) k[off + x] = T(dist(rng)), v[off + x] = T(dist(rng));
      }
  std::vector<T> q(std::size_t(q_indptr.back()) * kQoHeads * kHeadDim);
  for (auto& x : q) x = T(dist(rng));
  T *k_d = to_device(k), *v_d = to_device(v), *q_d = to_device(q);
  T* o_d = to_device(std::vector<T>(q.size()));
  float* lse_d = to_device(std::vector<float>(std::size_t(q_indptr.back()) * kQoHeads));
  std::int32_t *qi_d = to_device(q_indptr), *ki_d = to_device(kv_indptr), *ix_d = to_device(indices),
               *lp_d = to_device(last_page_len);

  // 4. Run: the device page table mirrors the host one the plan checked.
  const auto q_layout = ragged_layout::varlen(qi_d, batch, kQoHeads, kHeadDim);
  const paging::paged_kv<T, paging::csr_page_table> kv{
      paging::kv_pool_view<T>::make(k_d, v_d, kv_layout::nhd, kPoolBlocks, kPage, kKvHeads, kHeadDim),
      {ki_d, ix_d, lp_d, batch}};
  const float scale = 1.f / std::sqrt(float(kHeadDim));
  kc::run_append<causal_mask, kHeadDim>(plan, workspace, dense_tensor<T>{q_d, q_layout}, kv, dense_tensor<T>{o_d, q_layout},
                                        lse_d, {}, scale);

  // 5. Cascade: a system prompt shared by every request lives in its own pages (one level up);
  //    attend to it without a mask and merge with the per-request states.
  const int shared_len = 64;
  std::vector<std::int32_t> s_indptr{0}, s_indices, s_last;
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < shared_len / kPage; ++i) s_indices.push_back(indices[i]);  // request 0's first pages
    s_indptr.push_back(std::int32_t(s_indices.size()));
    s_last.push_back(kPage);
  }
  // The shared level sees every query of the batch (q_len <= kv_len holds for its 64 keys here).
  const paging::csr_page_table s_host{s_indptr.data(), s_indices.data(), s_last.data(), batch};
  const kc::paged_plan s_plan = kc::plan_append<no_mask>(q_indptr.data(), s_host, problem, {}, kc::query_device_limits());
  void* s_ws = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&s_ws, s_plan.workspace_bytes()));
  kc::upload_plan(s_plan, s_ws);
  std::int32_t *si_d = to_device(s_indptr), *sx_d = to_device(s_indices), *sl_d = to_device(s_last);
  T* o2_d = to_device(std::vector<T>(q.size()));
  float* lse2_d = to_device(std::vector<float>(std::size_t(q_indptr.back()) * kQoHeads));
  const paging::paged_kv<T, paging::csr_page_table> shared{kv.pool, {si_d, sx_d, sl_d, batch}};
  kc::run_append<no_mask, kHeadDim>(s_plan, s_ws, dense_tensor<T>{q_d, q_layout}, shared, dense_tensor<T>{o2_d, q_layout},
                                    lse2_d, {}, scale);
  const std::int64_t rows = std::int64_t(q_indptr.back()) * kQoHeads;
  kc::merge_states(o_d, lse_d, o2_d, lse2_d, o_d, lse_d, rows, kHeadDim);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());

  // Check one request against a CPU evaluation of the two levels taken together.
  std::vector<T> o(q.size());
  KVTILE_CUDA_CHECK(cudaMemcpy(o.data(), o_d, o.size() * sizeof(T), cudaMemcpyDeviceToHost));
  double worst = 0;
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < q_len[b]; ++t)
      for (int h = 0; h < kQoHeads; ++h) {
        const int hk = h / (kQoHeads / kKvHeads);
        const T* qr = &q[(std::size_t(q_indptr[b] + t) * kQoHeads + h) * kHeadDim];
        std::vector<double> s;
        std::vector<const T*> vr;
        auto add = [&](std::int32_t block, int slot) {
          const auto off = pool_h.offset(block, slot, hk);
          double dot = 0;
          for (int x = 0; x < kHeadDim; ++x) dot += to_double(qr[x]) * to_double(k[off + x]);
          s.push_back(dot * scale);
          vr.push_back(&v[off]);
        };
        for (int j = 0; j < shared_len; ++j) add(s_indices[s_indptr[b] + j / kPage], j % kPage);
        const int visible = t + kv_len[b] - q_len[b];
        for (int j = 0; j <= visible; ++j) add(indices[kv_indptr[b] + j / kPage], j % kPage);
        double mx = -INFINITY, sum = 0;
        for (double x : s) mx = std::max(mx, x);
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (int x = 0; x < kHeadDim; ++x) {
          double acc = 0;
          for (std::size_t j = 0; j < s.size(); ++j) acc += s[j] / sum * to_double(vr[j][x]);
          worst = std::max(worst, std::abs(acc - to_double(o[(std::size_t(q_indptr[b] + t) * kQoHeads + h) * kHeadDim + x])));
        }
      }
  std::printf("serving step: %d requests, %d query tokens; max |gpu - cpu| = %.2e\n", batch, q_indptr.back(), worst);
  for (void* p : {(void*)k_d, (void*)v_d, (void*)q_d, (void*)o_d, (void*)lse_d, (void*)qi_d, (void*)ki_d, (void*)ix_d,
                  (void*)lp_d, workspace, s_ws, (void*)si_d, (void*)sx_d, (void*)sl_d, (void*)o2_d, (void*)lse2_d})
    cudaFree(p);
  return worst < 2e-2 ? 0 : 1;
}
