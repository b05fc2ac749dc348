#pragma once
// One attention layer, GQA or GQE (AttentionConfig's table says which parts it has), with its
// inference forward, a forward that keeps what the backward pass needs (a tape), and that backward.
//
// GQA: N query heads over G KV heads; head e reads KV head e / M (Hugging Face repeat_kv order).
// GQE: a per-token router keeps, in every group, k of its M query-head experts (the router's
// choice, in descending probability). Slot (g, j), the j-th kept expert of group g, attends against
// KV head g, so all tokens' slot (g, j) form one ordinary attention head over the shared K/V,
// whatever expert each token chose, and only the kept experts' queries are computed (each expert's
// rows gathered and projected as one product). Variant "gqe" adds the renormalised weighted slot
// (the router's gradient path) and an always-on shared head on the mean K/V over groups; o_proj
// reads [slot(0,0) .. slot(G-1,k-1), weighted, shared]. "hard_concat" keeps the hard slots alone;
// "weighted_concat" multiplies each hard slot by its router probability.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gqe/layers/attention_cache.hpp"
#include "gqe/layers/attention_config.hpp"
#include "gqe/layers/router.hpp"
#include "gqe/ops/attention.hpp"
#include "gqe/ops/gemm_backend.hpp"
#include "gqe/ops/linear.hpp"
#include "gqe/ops/rope.hpp"
#include "gqe/tensor/scratch_buffer.hpp"
#include "gqe/tensor/scratch_matrix.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/weight.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

// What a training forward keeps for the backward pass. Slot columns follow o_proj's input:
// S = config.output_slots() blocks of d_h.
template <class Scalar>
struct AttentionTape {
  ScratchMatrix<Scalar> x;                // [R, d]: the layer's input
  std::vector<Segment<Scalar>> segments;  // whose caches hold K (after RoPE) and V
  const RopeTable<Scalar>* rope = nullptr;
  Routing<Scalar> routing;                // GQE only
  // The load-balancing loss's statistics when the tape holds part of a larger batch (training runs
  // a batch sequence by sequence): its f and token count are the whole batch's. Empty: the tape's rows.
  RoutingStats batch_routing;
  ScratchMatrix<Scalar> query;            // [R, H*d_h], after RoPE; H = active heads
  ScratchMatrix<Scalar> out;              // [R, S*d_h]: each head's attention output in its slot
  ScratchMatrix<Scalar> lse;              // [R, S]: log-sum-exp of each head's scores
  ScratchMatrix<Scalar> cat;              // [R, S*d_h]: o_proj's input
};

template <class Scalar>
class Attention {
 public:
  explicit Attention(const AttentionConfig& config) : config_(config) {
    config_.validate();
    const Index d = config_.hidden_size, dh = config_.head_dim;
    q_proj_ = Weight(Shape{config_.num_heads * dh, d});
    k_proj_ = Weight(Shape{config_.num_kv_heads * dh, d});
    v_proj_ = Weight(Shape{config_.num_kv_heads * dh, d});
    if (config_.is_gqe()) router_ = Router<Scalar>(config_);
    if (config_.has_shared_head()) q_shared_ = Weight(Shape{dh, d});
    o_proj_ = Weight(Shape{d, config_.output_slots() * dh});
  }

  const AttentionConfig& config() const { return config_; }
  const Router<Scalar>& router() const { return router_; }

  // Visits the parameters with their names under self_attn. and their shapes ([out, in], docs/checkpoints.md).
  template <class Self, class Fn>
  static void visit(Self& self, Fn&& fn) {
    fn("q_proj.weight", self.q_proj_);
    fn("k_proj.weight", self.k_proj_);
    fn("v_proj.weight", self.v_proj_);
    if (self.config_.is_gqe()) fn("router.weight", self.router_.weight());
    if (self.config_.has_shared_head()) fn("q_shared.weight", self.q_shared_);
    fn("o_proj.weight", self.o_proj_);
  }

  // fn(weight) for the weights that may go into panels (Weight::lay_out_in_panels): all, but a GQE
  // layer's q_proj only when its experts' row blocks (d_h rows each) start on a panel.
  template <class Fn>
  void for_each_panel_candidate(const Fn& fn) {
    visit(*this, [&](const char*, Weight& w) {
      if (&w != &q_proj_ || !config_.is_gqe() || config_.head_dim % kPanelWidth == 0) fn(w);
    });
  }

  // y [R, d] = attention over x [R, d] (normed hidden states), or y += it with accumulate (a
  // residual stream). Each segment's rows continue its cache (its K and V are appended and
  // committed); rope holds the rows' angles [R, d_h/2]. A tape, when given, keeps what backward()
  // needs (training: every segment starts an empty cache); it points at `rope` and the caches,
  // which must live, unchanged, until backward(). `routing`, when given, receives the rows' routing.
  void forward(const Eigen::Ref<const Matrix<Scalar>>& x, const std::vector<Segment<Scalar>>& segments,
               const RopeTable<Scalar>& rope, Eigen::Ref<Matrix<Scalar>> y, AttentionTape<Scalar>* tape = nullptr,
               Routing<Scalar>* routing = nullptr, bool accumulate = false) const {
    check_call(x, segments, rope, y);
    if (tape)
      for (const auto& s : segments)
        if (s.cache->length() != 0)
          fail<InputError>("a KV cache holds ", s.cache->length(),
                           " positions; a forward that fills a tape (training) expected empty caches");
    auto& ws = workspace();
    // A GQE layer routes straight into the caller's `routing` when there is no tape: no copy of
    // it, and no second buffer for a cold process to fault in.
    Routing<Scalar>& routed = tape ? tape->routing : (routing && config_.is_gqe()) ? *routing : ws.routing;
    Buffers b = tape ? Buffers{routed, tape->query, tape->out, tape->lse, tape->cat}
                     : Buffers{routed, ws.query, ws.out, ws.lse, ws.out};
    if (config_.is_gqe()) router_.route(x, b.routing);
    append_key_values(x, rope, segments, ws);
    project_queries(x, b.routing, rope, b.query);
    b.out.resize(x.rows(), config_.output_slots() * config_.head_dim);
    if (tape) b.lse.resize(x.rows(), config_.output_slots());
    query_groups(segments, b.query, b.out, tape ? &b.lse : nullptr, ws.groups);
    causal_attention(ws.groups, config_.head_dim, scale());
    for (const auto& s : segments) s.cache->advance(s.count);
    mix_slots(b.routing, b.out, b.cat);
    linear<Scalar>(b.cat, o_proj_, y, accumulate);
    if (routing && routing != &b.routing) *routing = b.routing;
    if (tape) {
      tape->x.assign(x);
      tape->segments = segments;
      tape->rope = &rope;
    }
  }

  // The backward pass of a forward that filled `tape`: dx [R, d] = dL/dx (overwritten) from
  // dy [R, d] = dL/dy, and every weight's gradient accumulated. aux_coef weighs the load-balancing
  // loss (GQE): its gradient is added here.
  void backward(AttentionTape<Scalar>& tape, const Matrix<Scalar>& dy, Matrix<Scalar>& dx, double aux_coef) {
    auto& g = grad_workspace();
    const Index R = tape.x.rows(), dh = config_.head_dim;
    g.d_cat.resize(R, tape.cat.cols());
    linear_backward<Scalar>(tape.cat, o_proj_.matrix(), dy, g.d_cat, false, o_proj_.grad_matrix<Scalar>());
    unmix_slots(tape, g.d_cat, aux_coef, g.d_out, g.d_probs);
    g.d_query.resize(R, tape.query.cols());
    g.d_key.resize(R, config_.num_kv_heads * dh);
    g.d_value.resize(R, config_.num_kv_heads * dh);
    g.d_mean_key.resize(R, config_.has_shared_head() ? dh : 0);
    g.d_mean_value.resize(R, config_.has_shared_head() ? dh : 0);
    attention_backward(tape, g);
    const RopeTable<Scalar> inverse = tape.rope->inverse();
    apply_rope<Scalar>(g.d_query, dh, inverse);
    apply_rope<Scalar>(g.d_key, dh, inverse);
    dx.resize(R, config_.hidden_size);
    linear_backward<Scalar>(tape.x, k_proj_.matrix(), g.d_key, dx, false, k_proj_.grad_matrix<Scalar>());
    linear_backward<Scalar>(tape.x, v_proj_.matrix(), g.d_value, dx, true, v_proj_.grad_matrix<Scalar>());
    queries_backward(tape, g.d_query, dx);
    if (config_.is_gqe()) {
      group_softmax_backward(tape.routing, g.d_probs, g.d_logits);
      linear_backward<Scalar>(tape.x, router_.weight().matrix(), g.d_logits, dx, true,
                              router_.weight().template grad_matrix<Scalar>());
    }
  }

 private:
  struct Buffers {
    Routing<Scalar>& routing;
    ScratchMatrix<Scalar>& query;
    ScratchMatrix<Scalar>& out;
    ScratchMatrix<Scalar>& lse;
    ScratchMatrix<Scalar>& cat;
  };
  // Scratch of one thread's forward calls, reused call after call: no allocation once warm.
  struct Workspace {
    Routing<Scalar> routing;
    ScratchMatrix<Scalar> key, value;  // [R, G*d_h]
    ScratchMatrix<Scalar> query, out, lse;
    detail::ScratchBuffer<Index> expert_rows, expert_slots;  // see group_by_expert
    std::vector<Index> expert_first, expert_next;
    std::vector<std::pair<Index, Index>> units;
    std::vector<QueryGroup<Scalar>> groups;
  };
  // One workspace per thread and layer shape: layers of another shape running in between (a
  // benchmark's dense and GQE layers, a sweep) leave this one as it was, so nothing is reallocated
  // and no fresh page is faulted in once warm.
  Workspace& workspace() const {
    thread_local std::vector<std::pair<AttentionConfig, std::unique_ptr<Workspace>>> spaces;
    const auto same_shape = [&](const AttentionConfig& c) {
      return c.type == config_.type && c.variant == config_.variant && c.hidden_size == config_.hidden_size &&
             c.num_heads == config_.num_heads && c.num_kv_heads == config_.num_kv_heads && c.head_dim == config_.head_dim &&
             c.top_k == config_.top_k;
    };
    for (auto& [config, ws] : spaces)
      if (same_shape(config)) return *ws;
    spaces.emplace_back(config_, std::make_unique<Workspace>());
    return *spaces.back().second;
  }
  struct GradWorkspace {
    Matrix<Scalar> d_cat, d_out, d_probs, d_logits, d_query, d_key, d_value, d_mean_key, d_mean_value;
    detail::ScratchBuffer<Index> expert_rows, expert_slots;
    std::vector<Index> expert_first, expert_next;
    std::vector<ScratchMatrix<Scalar>> expert_dx;  // [rows of expert e, d] each
    std::vector<QueryGroup<Scalar>> groups;
    std::vector<QueryGroupGrad<Scalar>> grads;
  };
  static GradWorkspace& grad_workspace() {
    thread_local GradWorkspace ws;
    return ws;
  }
  static constexpr Index kGatherTile = 1024;

  Scalar scale() const { return Scalar(1) / std::sqrt(Scalar(config_.head_dim)); }
  // Column block of o_proj's input (and of out, lse) where the shared head's output goes.
  Index shared_slot() const { return config_.hard_slots() + (config_.has_weighted_slot() ? 1 : 0); }

  // Always-on checks of a public call: shapes, segments that tile the rows, caches of this layer.
  void check_call(const Eigen::Ref<const Matrix<Scalar>>& x, const std::vector<Segment<Scalar>>& segments,
                  const RopeTable<Scalar>& rope, const Eigen::Ref<Matrix<Scalar>>& y) const {
    const Index R = x.rows(), d = config_.hidden_size;
    check_shape("attention input", Shape{x.rows(), x.cols()}, Shape{R, d});
    check_shape("attention output", Shape{y.rows(), y.cols()}, Shape{R, d});
    check_shape("RoPE table", Shape{rope.cos.rows(), rope.cos.cols()}, Shape{R, config_.head_dim / 2});
    Index next = 0;
    for (const auto& s : segments) {
      if (!s.cache || s.row_begin != next || s.count < 1)
        fail<ShapeError>("attention segment at row ", s.row_begin, " of ", s.count, " rows; expected consecutive runs of at least ",
                         "one row, each with a cache, covering rows 0 to ", R - 1);
      if (s.cache->kv_heads() != config_.num_kv_heads || s.cache->head_dim() != config_.head_dim ||
          s.cache->has_mean() != config_.has_shared_head())
        fail<ShapeError>("attention segment at row ", s.row_begin, " continues a cache made for another layer; expected one made "
                         "from this layer's config");
      next += s.count;
    }
    if (next != R) fail<ShapeError>("attention segments cover ", next, " rows; expected all ", R);
    // Two segments on one cache would write the same positions.
    thread_local std::vector<const AttentionCache<Scalar>*> caches;
    caches.clear();
    for (const auto& s : segments) caches.push_back(s.cache);
    std::sort(caches.begin(), caches.end(), std::less<const AttentionCache<Scalar>*>());  // a total order, unlike <
    if (std::adjacent_find(caches.begin(), caches.end()) != caches.end())
      fail<ShapeError>("two attention segments continue the same cache; expected one cache per segment");
    const bool bound = q_proj_.bound() && k_proj_.bound() && v_proj_.bound() && o_proj_.bound() &&
                       (!config_.is_gqe() || router_.weight().bound()) && (!config_.has_shared_head() || q_shared_.bound());
    if (!bound) fail<InputError>("attention weights are not loaded; expected a loaded or initialised model");
  }

  // K = x Wk^T and V = x Wv^T for all rows, RoPE on K, written to each segment's cache after its
  // cached positions (and the mean over groups, when the cache keeps one); not committed here.
  void append_key_values(const Eigen::Ref<const Matrix<Scalar>>& x, const RopeTable<Scalar>& rope,
                         const std::vector<Segment<Scalar>>& segments, Workspace& ws) const {
    const Index cols = config_.num_kv_heads * config_.head_dim;
    ws.key.resize(x.rows(), cols);
    ws.value.resize(x.rows(), cols);
    linear<Scalar>(x, k_proj_, ws.key);
    linear<Scalar>(x, v_proj_, ws.value);
    apply_rope<Scalar>(ws.key, config_.head_dim, rope);
    for (const auto& s : segments) {
      const Index past = s.cache->length();
      s.cache->reserve(past + s.count);
      s.cache->write(past, s.count, ws.key.row(s.row_begin).data(), ws.value.row(s.row_begin).data(), cols);
    }
  }

  // query [R, H*d_h] after RoPE: GQA's N heads in order; GQE's kept experts in their slots
  // (g*k + j) and the shared head last.
  void project_queries(const Eigen::Ref<const Matrix<Scalar>>& x, const Routing<Scalar>& route, const RopeTable<Scalar>& rope,
                       ScratchMatrix<Scalar>& query) const {
    const Index dh = config_.head_dim;
    query.resize(x.rows(), config_.active_heads() * dh);
    if (!config_.is_gqe())
      linear<Scalar>(x, q_proj_, query);
    else
      project_kept_queries(x, route, query);
    if (config_.has_shared_head()) linear<Scalar>(x, q_shared_, query.rightCols(dh));
    apply_rope<Scalar>(query, dh, rope);
  }

  // Rows grouped by the expert they kept: rows[first[e] .. first[e+1]) kept expert e = g*M + m,
  // in row order, slots[...] the slot j it holds there.
  void group_by_expert(const Routing<Scalar>& route, detail::ScratchBuffer<Index>& rows, detail::ScratchBuffer<Index>& slots,
                       std::vector<Index>& first, std::vector<Index>& next) const {
    const Index G = config_.num_kv_heads, M = config_.experts_per_group(), k = config_.top_k, R = route.rows();
    first.assign(static_cast<std::size_t>(G * M + 1), 0);
    for (Index r = 0; r < R; ++r)
      for (Index s = 0; s < G * k; ++s) ++first[static_cast<std::size_t>((s / k) * M + route.experts(r, s) + 1)];
    for (std::size_t e = 1; e < first.size(); ++e) first[e] += first[e - 1];
    rows.reserve(R * G * k);  // every entry written below
    slots.reserve(R * G * k);
    next.assign(first.begin(), first.end() - 1);
    for (Index r = 0; r < R; ++r)
      for (Index s = 0; s < G * k; ++s) {
        const Index i = next[static_cast<std::size_t>((s / k) * M + route.experts(r, s))]++;
        rows[i] = r;
        slots[i] = s % k;
      }
  }

  // query[r, (g*k + j)*d_h ...] = x[r] Wq_e^T for the expert e = g*M + m that row r keeps in slot
  // j: each expert's rows gathered and projected together, in tiles; unkept queries never computed.
  void project_kept_queries(const Eigen::Ref<const Matrix<Scalar>>& x, const Routing<Scalar>& route, ScratchMatrix<Scalar>& query) const {
    const Index M = config_.experts_per_group(), k = config_.top_k, dh = config_.head_dim, d = config_.hidden_size;
    auto& ws = workspace();
    group_by_expert(route, ws.expert_rows, ws.expert_slots, ws.expert_first, ws.expert_next);
    ws.units.clear();
    for (Index e = 0; e + 1 < static_cast<Index>(ws.expert_first.size()); ++e)
      for (Index i = ws.expert_first[static_cast<std::size_t>(e)]; i < ws.expert_first[static_cast<std::size_t>(e + 1)]; i += kGatherTile)
        ws.units.emplace_back(e, i);
    thread_pool().parallel_for(static_cast<Index>(ws.units.size()), [&](Index u) {
      const auto [e, begin] = ws.units[static_cast<std::size_t>(u)];
      const Index n = std::min(kGatherTile, ws.expert_first[static_cast<std::size_t>(e + 1)] - begin);
      thread_local std::vector<const Scalar*> rows;  // [kGatherTile]: the expert's rows of x, read in place
      thread_local Matrix<Scalar> projected;         // [kGatherTile, d_h]
      rows.resize(static_cast<std::size_t>(kGatherTile));
      projected.resize(kGatherTile, dh);
      for (Index i = 0; i < n; ++i) rows[static_cast<std::size_t>(i)] = x.row(ws.expert_rows[begin + i]).data();
      backend::weight_product<Scalar>(n, dh, d, rows.data(), rows_from(q_proj_.matrix(), e * dh), projected.data(), dh);
      for (Index i = 0; i < n; ++i) {
        const Index slot = (e / M) * k + ws.expert_slots[begin + i];
        query.row(ws.expert_rows[begin + i]).segment(slot * dh, dh) = projected.row(i);
      }
    }, 2.0 * static_cast<double>(x.rows() * config_.hard_slots()) * static_cast<double>(d * dh));
  }

  // The layer's query groups: per segment, one per KV head g (its slots (g, 0..per-1) computed
  // together) and the shared head on the mean K/V. fn(segment, query column block, output slot,
  // heads, KV head index: G for the mean).
  template <class Fn>
  void for_each_group(const std::vector<Segment<Scalar>>& segments, Fn&& fn) const {
    const Index G = config_.num_kv_heads, per = config_.slots_per_group();
    for (const auto& s : segments) {
      for (Index g = 0; g < G; ++g) fn(s, g * per, g * per, per, g);
      if (config_.has_shared_head()) fn(s, config_.hard_slots(), shared_slot(), Index(1), G);
    }
  }

  void query_groups(const std::vector<Segment<Scalar>>& segments, const ScratchMatrix<Scalar>& query, ScratchMatrix<Scalar>& out,
                    ScratchMatrix<Scalar>* lse, std::vector<QueryGroup<Scalar>>& groups) const {
    const Index dh = config_.head_dim;
    groups.clear();
    for_each_group(segments, [&](const Segment<Scalar>& s, Index query_col, Index slot, Index heads, Index kv) {
      QueryGroup<Scalar> q;
      q.query = query.data() + s.row_begin * query.cols() + query_col * dh;
      q.query_stride = query.cols();
      q.kv = s.cache->head(kv);
      q.out = out.data() + s.row_begin * out.cols() + slot * dh;
      q.out_stride = out.cols();
      if (lse) {
        q.lse = lse->data() + s.row_begin * lse->cols() + slot;
        q.lse_stride = lse->cols();
      }
      q.past = s.cache->length();
      q.count = s.count;
      q.heads = heads;
      groups.push_back(q);
    });
  }

  // o_proj's input from the heads' outputs, in place (out has o_proj's slot layout; cat may be out):
  // the weighted slot, or each hard slot times its probability, per the config's table. A token
  // whose router logits hold a NaN gets NaN in every slot: propagated, never hidden by a choice.
  void mix_slots(const Routing<Scalar>& route, const ScratchMatrix<Scalar>& out, ScratchMatrix<Scalar>& cat) const {
    if (!config_.is_gqe()) {
      if (&cat != &out) cat.assign(out);
      return;
    }
    const Index hard = config_.hard_slots(), dh = config_.head_dim, M = config_.experts_per_group(), k = config_.top_k;
    if (&cat != &out) cat.assign(out);
    parallel_rows(out.rows(), 2.0 * static_cast<double>(hard * dh), [&](Index r) {
      if (config_.has_weighted_slot()) {
        auto weighted = cat.row(r).segment(hard * dh, dh);
        weighted.setZero();
        for (Index s = 0; s < hard; ++s) weighted += route.weights(r, s) * out.row(r).segment(s * dh, dh);
      }
      if (config_.scales_slots_by_prob())
        for (Index s = 0; s < hard; ++s) cat.row(r).segment(s * dh, dh) *= route.probs(r, (s / k) * M + route.experts(r, s));
      if (route.probs.row(r).hasNaN()) cat.row(r).setConstant(std::numeric_limits<Scalar>::quiet_NaN());
    });
  }

  // The backward of mix_slots and of the load-balancing loss: d_out (out's layout) and dL/dp
  // [R, G*M] (zero for GQA). The weighted slot w[s] = p[s] / D, D = max(1e-9, sum of kept p):
  // dp[s] = (dw[s] - sum_s' dw[s'] w[s']) / D, or dw[s] / 1e-9 where the clamp holds D constant.
  void unmix_slots(const AttentionTape<Scalar>& tape, const Matrix<Scalar>& d_cat, double aux_coef, Matrix<Scalar>& d_out,
                   Matrix<Scalar>& d_probs) const {
    const Index R = d_cat.rows(), G = config_.num_kv_heads, M = config_.experts_per_group(), k = config_.top_k;
    const Index hard = config_.hard_slots(), dh = config_.head_dim;
    d_out = d_cat;
    d_probs.setZero(R, config_.is_gqe() ? G * M : 0);
    if (!config_.is_gqe()) return;
    const Routing<Scalar>& route = tape.routing;
    const auto expert = [&](Index r, Index s) { return (s / k) * M + route.experts(r, s); };
    for (Index r = 0; r < R; ++r) {
      if (config_.has_weighted_slot()) {
        d_out.row(r).segment(hard * dh, dh).setZero();  // the weighted slot is no head's output
        const auto d_weighted = d_cat.row(r).segment(hard * dh, dh);
        Scalar kept_sum = 0, mixed = 0;
        for (Index s = 0; s < hard; ++s) {
          d_out.row(r).segment(s * dh, dh) += route.weights(r, s) * d_weighted;
          kept_sum += route.probs(r, expert(r, s));
        }
        const bool clamped = !(kept_sum > Scalar(1e-9));
        for (Index s = 0; s < hard && !clamped; ++s)
          mixed += d_weighted.dot(tape.out.row(r).segment(s * dh, dh)) * route.weights(r, s);
        const Scalar denom = clamped ? Scalar(1e-9) : kept_sum;
        for (Index s = 0; s < hard; ++s)
          d_probs(r, expert(r, s)) += (d_weighted.dot(tape.out.row(r).segment(s * dh, dh)) - mixed) / denom;
      }
      if (config_.scales_slots_by_prob())
        for (Index s = 0; s < hard; ++s) {
          d_probs(r, expert(r, s)) += d_cat.row(r).segment(s * dh, dh).dot(tape.out.row(r).segment(s * dh, dh));
          d_out.row(r).segment(s * dh, dh) *= route.probs(r, expert(r, s));
        }
    }
    if (aux_coef == 0) return;
    RoutingStats own;
    if (tape.batch_routing.tokens == 0) own.add(route);
    const RoutingStats& stats = tape.batch_routing.tokens == 0 ? own : tape.batch_routing;
    const Eigen::ArrayXXd grad = stats.aux_loss_gradient() * aux_coef;  // [G, M]
    for (Index e = 0; e < G * M; ++e) d_probs.col(e).array() += static_cast<Scalar>(grad(e / M, e % M));
  }

  // d_query, d_key, d_value (and the mean head's, spread back to the groups) from d_out. Training
  // runs every sequence from an empty cache, so each segment's keys start at position 0.
  void attention_backward(AttentionTape<Scalar>& tape, GradWorkspace& g) const {
    const Index G = config_.num_kv_heads, dh = config_.head_dim;
    std::vector<QueryGroup<Scalar>>& groups = g.groups;
    std::vector<QueryGroupGrad<Scalar>>& grads = g.grads;
    query_groups(tape.segments, tape.query, tape.out, &tape.lse, groups);
    grads.clear();
    for_each_group(tape.segments, [&](const Segment<Scalar>& s, Index query_col, Index slot, Index, Index kv) {
      Matrix<Scalar>& d_key = kv < G ? g.d_key : g.d_mean_key;
      Matrix<Scalar>& d_value = kv < G ? g.d_value : g.d_mean_value;
      const Index kv_col = kv < G ? kv * dh : 0;
      grads.push_back({g.d_out.data() + s.row_begin * g.d_out.cols() + slot * dh,
                       g.d_query.data() + s.row_begin * g.d_query.cols() + query_col * dh,
                       d_key.data() + s.row_begin * d_key.cols() + kv_col, d_value.data() + s.row_begin * d_value.cols() + kv_col,
                       d_key.cols()});
    });
    for (std::size_t i = 0; i < groups.size(); ++i) {
      assert(groups[i].past == groups[i].count && "training runs each sequence from an empty cache");
      groups[i].past = 0;
    }
    causal_attention_backward(groups, grads, dh, scale());
    if (!config_.has_shared_head()) return;
    for (Index grp = 0; grp < G; ++grp) {
      g.d_key.middleCols(grp * dh, dh) += g.d_mean_key / Scalar(G);
      g.d_value.middleCols(grp * dh, dh) += g.d_mean_value / Scalar(G);
    }
  }

  // The queries' projections backward: dx += d_query's contribution, weights' gradients.
  void queries_backward(const AttentionTape<Scalar>& tape, const Matrix<Scalar>& d_query, Matrix<Scalar>& dx) {
    const Index dh = config_.head_dim;
    if (!config_.is_gqe())
      linear_backward<Scalar>(tape.x, q_proj_.matrix(), d_query, dx, true, q_proj_.grad_matrix<Scalar>());
    else
      kept_queries_backward(tape, d_query, dx);
    if (config_.has_shared_head())
      linear_backward<Scalar>(tape.x, q_shared_.matrix(), d_query.rightCols(dh), dx, true, q_shared_.grad_matrix<Scalar>());
  }

  // Per expert: gather its rows' x and d_query; dWq_e += dQ_e^T X_e and dX_e = dQ_e Wq_e, added back
  // to the rows in expert order afterwards (the same sums for any thread count).
  void kept_queries_backward(const AttentionTape<Scalar>& tape, const Matrix<Scalar>& d_query, Matrix<Scalar>& dx) {
    const Index M = config_.experts_per_group(), k = config_.top_k, dh = config_.head_dim, d = config_.hidden_size;
    auto& g = grad_workspace();
    group_by_expert(tape.routing, g.expert_rows, g.expert_slots, g.expert_first, g.expert_next);
    const Index experts = static_cast<Index>(g.expert_first.size()) - 1;
    g.expert_dx.resize(static_cast<std::size_t>(experts));
    auto d_weight = q_proj_.grad_matrix<Scalar>();
    thread_pool().parallel_for(experts, [&](Index e) {
      const Index begin = g.expert_first[static_cast<std::size_t>(e)], n = g.expert_first[static_cast<std::size_t>(e + 1)] - begin;
      ScratchMatrix<Scalar>& dx_e = g.expert_dx[static_cast<std::size_t>(e)];
      dx_e.resize(n, d);
      if (n == 0) return;
      // Grow-only, per thread: fresh matrices every call were faulted in anew, on every thread.
      thread_local ScratchMatrix<Scalar> gathered, dq;
      gathered.resize(n, d);
      dq.resize(n, dh);
      for (Index i = 0; i < n; ++i) {
        const Index r = g.expert_rows[begin + i];
        gathered.row(i) = tape.x.row(r);
        dq.row(i) = d_query.row(r).segment(((e / M) * k + g.expert_slots[begin + i]) * dh, dh);
      }
      const WeightMatrix w_e{q_proj_.data<Scalar>() + e * dh * d, dtype_of<Scalar>(), d};
      linear_backward<Scalar>(gathered, w_e, dq, dx_e, false, d_weight.middleRows(e * dh, dh));
    }, 4.0 * static_cast<double>(tape.x.rows() * config_.hard_slots() * d * dh));
    for (Index e = 0; e < experts; ++e)
      for (Index i = 0; i < g.expert_dx[static_cast<std::size_t>(e)].rows(); ++i)
        dx.row(g.expert_rows[g.expert_first[static_cast<std::size_t>(e)] + i]) +=
            g.expert_dx[static_cast<std::size_t>(e)].row(i);
  }

  AttentionConfig config_;
  Weight q_proj_;    // [N*d_h, d], rows of expert e: e*d_h .. (e+1)*d_h
  Weight k_proj_;    // [G*d_h, d]
  Weight v_proj_;    // [G*d_h, d]
  Router<Scalar> router_;  // weight [G*M, d], GQE only
  Weight q_shared_;  // [d_h, d], variant "gqe" only
  Weight o_proj_;    // [d, S*d_h]
};

}  // namespace gqe
