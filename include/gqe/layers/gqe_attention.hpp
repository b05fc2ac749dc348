#pragma once
// Grouped Query Experts attention (arXiv 2606.20945). In each of the G KV groups a per-token router
// keeps k of the group's M query heads. Only the kept experts' queries are computed: for each expert,
// the tokens that chose it, as one GEMM. Slot (g, j) of every token attends against KV head g, so
// the G*k slots are ordinary causal heads whichever expert each token chose.
//
// Variant "gqe" adds the renormalised weighted slot (the router's gradient path) and an always-on
// shared head on the mean K/V over groups; o_proj reads (kG + 2)*d_h inputs in the order
// [slot(0,0), ..., slot(G-1,k-1), weighted, shared]. "hard_concat" keeps the hard slots alone;
// "weighted_concat" multiplies each hard slot by its router probability.
#include <limits>
#include <string>
#include <vector>

#include "gqe/layers/attention_common.hpp"
#include "gqe/layers/router.hpp"

namespace gqe {

template <class Scalar>
class GQEAttention {
 public:
  explicit GQEAttention(const AttentionConfig& config) : config_(config), router_() {
    config_.validate();
    if (!config_.is_gqe())
      fail<ConfigError>("GQEAttention needs attention_type \"gqe\"; got \"", to_string(config_.type), "\"");
    router_ = Router<Scalar>(config_);
    const Index d = config_.hidden_size, dh = config_.head_dim;
    q_proj_.setZero(config_.num_heads * dh, d);
    k_proj_.setZero(config_.num_kv_heads * dh, d);
    v_proj_.setZero(config_.num_kv_heads * dh, d);
    if (config_.has_shared_head()) q_shared_.setZero(dh, d);
    o_proj_.setZero(d, config_.output_slots() * dh);
  }

  const AttentionConfig& config() const { return config_; }
  const Router<Scalar>& router() const { return router_; }

  // Visits the parameters with their names under self_attn. and the spec's shapes.
  template <class Self, class Fn>
  static void visit(Self& self, Fn&& fn) {
    fn("q_proj.weight", self.q_proj_);
    fn("k_proj.weight", self.k_proj_);
    fn("v_proj.weight", self.v_proj_);
    fn("router.weight", self.router_.weight());
    if (self.config_.has_shared_head()) fn("q_shared.weight", self.q_shared_);
    fn("o_proj.weight", self.o_proj_);
  }

  // y [R, d] = attention over x [R, d]; see GQAAttention::forward. When `routing` is given it
  // receives this call's routing of the R rows.
  void forward(const Eigen::Ref<const Matrix<Scalar>>& x, const std::vector<Segment<Scalar>>& segments,
               const RopeTable<Scalar>& rope, Eigen::Ref<Matrix<Scalar>> y, Routing<Scalar>* routing = nullptr) const {
    const Index G = config_.num_kv_heads, M = config_.experts_per_group(), k = config_.top_k;
    const Index dh = config_.head_dim, rows = x.rows(), hard = G * k;
    auto& ws = detail::attention_workspace<Scalar>();
    auto& route = gqe_workspace().routing;
    router_.route(x, route);
    detail::append_key_values(config_, x, k_proj_, v_proj_, rope, segments, ws);

    // Queries [R, (hard + shared)*d_h]: slot (g, j) in columns (g*k + j)*d_h, the shared head last.
    const Index query_heads = config_.active_heads();
    ws.query.resize(rows, query_heads * dh);
    project_kept_queries(x, route, ws.query);
    if (config_.has_shared_head()) linear<Scalar>(x, q_shared_, ws.query.rightCols(dh));
    apply_rope<Scalar>(ws.query, dh, rope);

    ws.out.resize(rows, config_.output_slots() * dh);  // [R, S*d_h]
    ws.heads.clear();
    for (const auto& s : segments) {
      // Slots (g, 0..k-1) all read KV head g, computed together.
      for (Index g = 0; g < G; ++g)
        ws.heads.push_back(detail::make_head(s, ws.query, g * k * dh, s.cache->key(g), s.cache->value(g), ws.out,
                                             g * k * dh, dh, k));
      if (config_.has_shared_head())
        ws.heads.push_back(detail::make_head(s, ws.query, hard * dh, s.cache->mean_key(), s.cache->mean_value(),
                                             ws.out, (hard + 1) * dh, dh));
    }
    causal_attention(ws.heads, dh, detail::attention_scale<Scalar>(dh));
    detail::advance_caches(segments);

    if (config_.variant == GqeVariant::gqe) {
      // Weighted slot: sum over all kept slots of the renormalised weight times the slot's output.
      for (Index r = 0; r < rows; ++r) {
        auto weighted = ws.out.row(r).segment(hard * dh, dh);
        weighted.setZero();
        for (Index slot = 0; slot < hard; ++slot) weighted += route.weights(r, slot) * ws.out.row(r).segment(slot * dh, dh);
      }
    } else if (config_.variant == GqeVariant::weighted_concat) {
      for (Index r = 0; r < rows; ++r)
        for (Index slot = 0; slot < hard; ++slot)
          ws.out.row(r).segment(slot * dh, dh) *= route.probs(r, (slot / k) * M + route.experts(r, slot));
    }
    // A token whose router logits hold a NaN gets NaN outputs in every variant: the NaN is
    // propagated, never hidden behind a choice of experts (hard_concat would otherwise drop it).
    for (Index r = 0; r < rows; ++r)
      if (route.probs.row(r).hasNaN()) ws.out.row(r).setConstant(std::numeric_limits<Scalar>::quiet_NaN());
    linear<Scalar>(ws.out, o_proj_, y);
    if (routing) *routing = route;
  }

 private:
  struct GqeWorkspace {
    Routing<Scalar> routing;
    std::vector<std::vector<Index>> rows_of;  // [G*M]: rows that kept expert e
    std::vector<std::vector<Index>> slot_of;  // [G*M]: slot j of that row's choice
    std::vector<std::pair<Index, Index>> units;  // (expert, first entry of its row list)
  };
  static GqeWorkspace& gqe_workspace() {
    thread_local GqeWorkspace ws;
    return ws;
  }
  static constexpr Index kGatherTile = 256;

  // query[r, (g*k + j)*d_h ...] = x[r] Wq_e^T for the expert e = g*M + m that row r keeps in slot j.
  // Each expert's rows are gathered and projected as one GEMM per tile of rows; unkept experts'
  // queries are never computed.
  void project_kept_queries(const Eigen::Ref<const Matrix<Scalar>>& x, const Routing<Scalar>& route,
                            Matrix<Scalar>& query) const {
    const Index G = config_.num_kv_heads, M = config_.experts_per_group(), k = config_.top_k;
    const Index dh = config_.head_dim, d = config_.hidden_size, rows = x.rows();
    auto& ws = gqe_workspace();
    ws.rows_of.resize(static_cast<std::size_t>(G * M));
    ws.slot_of.resize(static_cast<std::size_t>(G * M));
    for (auto& v : ws.rows_of) v.clear(), v.reserve(static_cast<std::size_t>(rows));  // at most every row
    for (auto& v : ws.slot_of) v.clear(), v.reserve(static_cast<std::size_t>(rows));
    for (Index r = 0; r < rows; ++r)
      for (Index g = 0; g < G; ++g)
        for (Index j = 0; j < k; ++j) {
          const auto e = static_cast<std::size_t>(g * M + route.experts(r, g * k + j));
          ws.rows_of[e].push_back(r);
          ws.slot_of[e].push_back(j);
        }
    ws.units.clear();
    for (Index e = 0; e < G * M; ++e)
      for (Index first = 0; first < static_cast<Index>(ws.rows_of[static_cast<std::size_t>(e)].size()); first += kGatherTile)
        ws.units.emplace_back(e, first);

    thread_pool().parallel_for(static_cast<Index>(ws.units.size()), [&](Index u) {
      const auto [e, first] = ws.units[static_cast<std::size_t>(u)];
      const auto& row_list = ws.rows_of[static_cast<std::size_t>(e)];
      const auto& slot_list = ws.slot_of[static_cast<std::size_t>(e)];
      const Index n = std::min(kGatherTile, static_cast<Index>(row_list.size()) - first);
      // Full-tile buffers whatever n, so that their size never changes (no allocation per token).
      thread_local Matrix<Scalar> gathered_tile, projected_tile;
      gathered_tile.resize(kGatherTile, d);
      projected_tile.resize(kGatherTile, dh);
      auto gathered = gathered_tile.topRows(n);    // [n, d]
      auto projected = projected_tile.topRows(n);  // [n, d_h]
      for (Index i = 0; i < n; ++i) gathered.row(i) = x.row(row_list[static_cast<std::size_t>(first + i)]);
      detail::gemm_tile<Scalar>(gathered, q_proj_.middleRows(e * dh, dh), projected);
      const Index g = e / M;
      for (Index i = 0; i < n; ++i) {
        const Index slot = g * k + slot_list[static_cast<std::size_t>(first + i)];
        query.row(row_list[static_cast<std::size_t>(first + i)]).segment(slot * dh, dh) = projected.row(i);
      }
    }, 2.0 * static_cast<double>(rows * G * k) * static_cast<double>(d * dh));
  }

  AttentionConfig config_;
  Router<Scalar> router_;    // weight [G*M, d]
  Matrix<Scalar> q_proj_;    // [N*d_h, d], rows of expert e: e*d_h .. (e+1)*d_h
  Matrix<Scalar> k_proj_;    // [G*d_h, d]
  Matrix<Scalar> v_proj_;    // [G*d_h, d]
  Matrix<Scalar> q_shared_;  // [d_h, d], variant "gqe" only
  Matrix<Scalar> o_proj_;    // [d, S*d_h], S = kG + 2 (gqe) or kG
};

}  // namespace gqe
