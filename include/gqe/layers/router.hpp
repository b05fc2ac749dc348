#pragma once
// The query-head router of GQE: per token, logits over the M experts of each of the G groups, a
// softmax inside each group, and the top k experts of each group.
//
// Selection ranks the logits (softmax keeps their order inside a group, while float rounding in exp
// can make different logits equal): descending, equal logits to the lower expert index. A NaN logit
// ranks below every number, so the kept experts always lie inside their group; the group's
// probabilities are NaN, and the attention layer makes that token's output NaN (propagated, never
// hidden).
#include "gqe/tensor/eigen.hpp"

#include <cmath>
#include <cstdint>
#include <limits>

#include "gqe/layers/attention_config.hpp"
#include "gqe/ops/activations.hpp"
#include "gqe/ops/linear.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/weight.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

using IndexMatrix = Eigen::Matrix<std::int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The routing of R tokens.
template <class Scalar>
struct Routing {
  Index groups = 0, experts_per_group = 0, top_k = 0;  // G, M, k
  Matrix<Scalar> logits;  // [R, G*M]
  Matrix<Scalar> probs;   // [R, G*M], softmax inside each group
  IndexMatrix experts;    // [R, G*k], slot (g, j): index m inside group g of the j-th kept expert
  Matrix<Scalar> weights; // [R, G*k], p of each slot over the sum of the token's kept p (all groups)

  Index rows() const { return probs.rows(); }
};

template <class Scalar>
class Router {
 public:
  Router() = default;
  // Validates first: the sizes below divide by num_key_value_heads. k is checked against M
  // whatever the config's attention type, since a router only makes sense for GQE.
  explicit Router(const AttentionConfig& config) {
    config.validate();
    if (config.top_k < 1 || config.top_k > config.experts_per_group())
      fail<ConfigError>("gqe_top_k is ", config.top_k, "; expected 1 to num_attention_heads / num_key_value_heads = ",
                        config.experts_per_group());
    groups_ = config.num_kv_heads;
    experts_per_group_ = config.experts_per_group();
    top_k_ = config.top_k;
    weight_ = Weight(Shape{groups_ * experts_per_group_, config.hidden_size});
  }

  Index groups() const { return groups_; }
  Index experts_per_group() const { return experts_per_group_; }
  Index top_k() const { return top_k_; }
  Weight& weight() { return weight_; }              // [G*M, d]
  const Weight& weight() const { return weight_; }  // [G*M, d]

  // Routes the rows of x [R, d].
  void route(const Eigen::Ref<const Matrix<Scalar>>& x, Routing<Scalar>& out) const {
    if (!weight_.bound()) fail<InputError>("router weight is not loaded; expected a loaded or initialised model");
    if (x.cols() != weight_.cols())
      fail<ShapeError>("router input has ", x.cols(), " columns; expected hidden_size = ", weight_.cols());
    const Index G = groups_, M = experts_per_group_, k = top_k_, rows = x.rows();
    out.groups = G;
    out.experts_per_group = M;
    out.top_k = k;
    out.logits.resize(rows, G * M);
    out.probs.resize(rows, G * M);
    out.experts.resize(rows, G * k);
    out.weights.resize(rows, G * k);
    linear<Scalar>(x, weight_, out.logits);
    // Scalar work per row (exponentials, comparisons): weighed as a few hundred flops per expert.
    parallel_rows(rows, 200.0 * static_cast<double>(G * M), [&](Index r) {
      Scalar kept_sum = 0;
      for (Index g = 0; g < G; ++g) {
        auto p = out.probs.row(r).segment(g * M, M);
        p = out.logits.row(r).segment(g * M, M);
        softmax_inplace(p);
        select_top_k(out.logits.row(r).data() + g * M, out.experts.row(r).data() + g * k);
        for (Index j = 0; j < k; ++j) kept_sum += p(out.experts(r, g * k + j));
      }
      // Renormalised across all groups, as the paper's weighted slot.
      const Scalar denom = std::max(Scalar(1e-9), kept_sum);
      for (Index s = 0; s < G * k; ++s) out.weights(r, s) = out.probs(r, (s / k) * M + out.experts(r, s)) / denom;
    });
  }

 private:
  // The k best of logits[0..M) into chosen[0..k), best first.
  void select_top_k(const Scalar* logits, std::int32_t* chosen) const {
    const auto rank_key = [&](Index m) {
      return std::isnan(logits[m]) ? -std::numeric_limits<Scalar>::infinity() : logits[m];
    };
    // better(a, b): a ranks before b. A strict total order on indices (NaN mapped to -inf).
    const auto better = [&](Index a, Index b) {
      const Scalar ka = rank_key(a), kb = rank_key(b);
      return ka > kb || (ka == kb && a < b);
    };
    for (Index j = 0; j < top_k_; ++j) {
      Index best = -1;
      for (Index m = 0; m < experts_per_group_; ++m) {
        bool taken = false;
        for (Index i = 0; i < j; ++i) taken = taken || chosen[i] == m;
        if (!taken && (best < 0 || better(m, best))) best = m;
      }
      chosen[j] = static_cast<std::int32_t>(best);
    }
  }

  Index groups_ = 0, experts_per_group_ = 0, top_k_ = 0;
  Weight weight_;  // [G*M, d]
};

// For p = softmax of each group's logits: d_logits [R, G*M] = p * (dp - sum_m p dp) per group.
template <class Scalar>
void group_softmax_backward(const Routing<Scalar>& route, const Matrix<Scalar>& d_probs, Matrix<Scalar>& d_logits) {
  const Index G = route.groups, M = route.experts_per_group;
  d_logits.resize(route.rows(), G * M);
  for (Index r = 0; r < route.rows(); ++r)
    for (Index g = 0; g < G; ++g) {
      const auto p = route.probs.row(r).segment(g * M, M);
      const auto dp = d_probs.row(r).segment(g * M, M);
      d_logits.row(r).segment(g * M, M) = p.cwiseProduct(dp).array() - p.dot(dp) * p.array();
    }
}

// Routing statistics over any number of routed tokens, accumulated call by call.
struct RoutingStats {
  Index groups = 0, experts_per_group = 0, top_k = 0;
  Index tokens = 0;
  Eigen::ArrayXXd kept;       // [G, M]: tokens whose kept set holds expert m of group g
  Eigen::ArrayXXd prob_sum;   // [G, M]: sum over tokens of p[:, g, m]
  double entropy_sum = 0;     // sum over tokens and groups of the router's entropy (nats)

  template <class Scalar>
  void add(const Routing<Scalar>& r) {
    if (tokens == 0 && kept.size() == 0) {
      groups = r.groups, experts_per_group = r.experts_per_group, top_k = r.top_k;
      kept.setZero(groups, experts_per_group);
      prob_sum.setZero(groups, experts_per_group);
    }
    if (r.groups != groups || r.experts_per_group != experts_per_group || r.top_k != top_k)
      fail<ShapeError>("routing of ", r.groups, " groups x ", r.experts_per_group, " experts (k = ", r.top_k,
                       ") added to statistics of ", groups, " x ", experts_per_group, " (k = ", top_k,
                       "); expected one layer's shape");
    for (Index t = 0; t < r.rows(); ++t)
      for (Index g = 0; g < groups; ++g) {
        for (Index j = 0; j < top_k; ++j) kept(g, r.experts(t, g * top_k + j)) += 1;
        for (Index m = 0; m < experts_per_group; ++m) {
          const double p = static_cast<double>(r.probs(t, g * experts_per_group + m));
          prob_sum(g, m) += p;
          if (p > 0) entropy_sum -= p * std::log(p);
        }
      }
    tokens += r.rows();
  }

  // Fraction of tokens that kept each expert, f[g, m]; sums to k over each group.
  Eigen::ArrayXXd load() const { return kept / std::max<double>(1, static_cast<double>(tokens)); }
  // Mean router probability of each expert, P[g, m].
  Eigen::ArrayXXd mean_prob() const { return prob_sum / std::max<double>(1, static_cast<double>(tokens)); }
  // Switch-style load-balancing loss, averaged over groups: mean_g M * sum_m f[g, m] * P[g, m].
  double aux_loss() const {
    if (groups == 0) return 0;
    return static_cast<double>(experts_per_group) * (load() * mean_prob()).sum() / static_cast<double>(groups);
  }
  // dL_aux / dp[t, g, m] for each of the `tokens` routed rows: (M / G) * f[g, m] / tokens, the
  // dispatch fraction f held constant as in Switch. [G, M]
  Eigen::ArrayXXd aux_loss_gradient() const {
    return load() * (static_cast<double>(experts_per_group) / static_cast<double>(groups) /
                     std::max<double>(1, static_cast<double>(tokens)));
  }
  // Mean entropy of a group's routing distribution (nats); log(M) is uniform.
  double mean_entropy() const {
    return tokens ? entropy_sum / static_cast<double>(tokens * groups) : 0.0;
  }
};

}  // namespace gqe
