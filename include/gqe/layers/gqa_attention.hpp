#pragma once
// Grouped-query attention, the dense baseline: N query heads over G KV heads; head e reads KV head
// e / M (Hugging Face repeat_kv order).
#include <string>

#include "gqe/layers/attention_common.hpp"

namespace gqe {

template <class Scalar>
class GQAAttention {
 public:
  explicit GQAAttention(const AttentionConfig& config) : config_(config) {
    config_.validate();
    if (config_.is_gqe())
      fail<ConfigError>("GQAAttention needs attention_type \"gqa\"; got \"", to_string(config_.type), "\"");
    const Index d = config_.hidden_size, dh = config_.head_dim;
    q_proj_.setZero(config_.num_heads * dh, d);
    k_proj_.setZero(config_.num_kv_heads * dh, d);
    v_proj_.setZero(config_.num_kv_heads * dh, d);
    o_proj_.setZero(d, config_.num_heads * dh);
  }

  const AttentionConfig& config() const { return config_; }

  // Visits the parameters with their names under self_attn. and views in the spec's shapes.
  template <class Self, class Fn>
  static void visit(Self& self, Fn&& fn) {
    fn("q_proj.weight", self.q_proj_);
    fn("k_proj.weight", self.k_proj_);
    fn("v_proj.weight", self.v_proj_);
    fn("o_proj.weight", self.o_proj_);
  }

  // y [R, d] = attention over x [R, d] (normed hidden states). Each segment's rows continue its
  // cache; rope holds the rows' angles. Appends the rows' K and V to the caches.
  void forward(const Eigen::Ref<const Matrix<Scalar>>& x, const std::vector<Segment<Scalar>>& segments,
               const RopeTable<Scalar>& rope, Eigen::Ref<Matrix<Scalar>> y) const {
    const Index N = config_.num_heads, dh = config_.head_dim, M = config_.experts_per_group(), rows = x.rows();
    auto& ws = detail::attention_workspace<Scalar>();
    detail::append_key_values(config_, x, k_proj_, v_proj_, rope, segments, ws);
    ws.query.resize(rows, N * dh);  // [R, N*d_h]
    linear<Scalar>(x, q_proj_, ws.query);
    apply_rope<Scalar>(ws.query, dh, rope);
    ws.out.resize(rows, N * dh);  // [R, N*d_h], heads in order
    ws.heads.clear();
    for (const auto& s : segments) {
      // Query heads g*M .. g*M + M-1 read KV head g (kv_head = head / M), computed together.
      for (Index g = 0; g < config_.num_kv_heads; ++g)
        ws.heads.push_back(detail::make_head(s, ws.query, g * M * dh, s.cache->key(g), s.cache->value(g), ws.out,
                                             g * M * dh, dh, M));
    }
    causal_attention(ws.heads, dh, detail::attention_scale<Scalar>(dh));
    detail::advance_caches(segments);
    linear<Scalar>(ws.out, o_proj_, y);
  }

 private:
  AttentionConfig config_;
  Matrix<Scalar> q_proj_;  // [N*d_h, d]
  Matrix<Scalar> k_proj_;  // [G*d_h, d]
  Matrix<Scalar> v_proj_;  // [G*d_h, d]
  Matrix<Scalar> o_proj_;  // [d, N*d_h]
};

}  // namespace gqe
