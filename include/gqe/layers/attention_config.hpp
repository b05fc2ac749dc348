#pragma once
// The configuration of one attention layer, GQA or GQE, validated once on construction of a layer.
#include <string>

#include "gqe/error.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

enum class AttentionType { gqa, gqe };
// The paper's full method and its two ablations (Table 2).
enum class GqeVariant { gqe, hard_concat, weighted_concat };

inline const char* to_string(AttentionType t) { return t == AttentionType::gqa ? "gqa" : "gqe"; }
inline const char* to_string(GqeVariant v) {
  switch (v) {
    case GqeVariant::gqe: return "gqe";
    case GqeVariant::hard_concat: return "hard_concat";
    case GqeVariant::weighted_concat: return "weighted_concat";
  }
  return "?";
}
inline AttentionType attention_type_from_string(const std::string& s) {
  if (s == "gqa") return AttentionType::gqa;
  if (s == "gqe") return AttentionType::gqe;
  fail<ConfigError>("attention_type is \"", s, "\"; expected \"gqa\" or \"gqe\"");
}
inline GqeVariant gqe_variant_from_string(const std::string& s) {
  if (s == "gqe") return GqeVariant::gqe;
  if (s == "hard_concat") return GqeVariant::hard_concat;
  if (s == "weighted_concat") return GqeVariant::weighted_concat;
  fail<ConfigError>("gqe_variant is \"", s, "\"; expected \"gqe\", \"hard_concat\" or \"weighted_concat\"");
}

// Upper bounds that no sane model exceeds; they keep a hostile config from asking for absurd memory.
struct Limits {
  static constexpr Index max_hidden = 1 << 16;
  static constexpr Index max_heads = 1 << 10;
  static constexpr Index max_head_dim = 1 << 11;
  static constexpr Index max_intermediate = 1 << 18;
  static constexpr Index max_vocab = 1 << 22;
  static constexpr Index max_layers = 1 << 10;
  static constexpr Index max_positions = 1 << 24;
};

// Throws ConfigError unless 1 <= value <= max; `name` is the config.json key.
inline void check_size(const char* name, Index value, Index max) {
  if (value <= 0 || value > max) fail<ConfigError>(name, " is ", value, "; expected 1 to ", max);
}

struct AttentionConfig {
  AttentionType type = AttentionType::gqa;
  GqeVariant variant = GqeVariant::gqe;
  Index hidden_size = 0;   // d
  Index num_heads = 0;     // N: query heads (GQE: routed experts)
  Index num_kv_heads = 0;  // G: KV heads = groups
  Index head_dim = 0;      // d_h
  Index top_k = 1;         // k: experts kept per group per token (GQE only)
  double rope_theta = 10000.0;

  // What differs between GQA and the GQE variants, in one table (the paper's Table 2; docs/model.md):
  //
  //                      query heads computed    weighted slot   shared head   hard slots
  //                      per group (slots)       (renormalised)  (mean K/V)    scaled by p
  //   gqa                M (all, dense)          -               -             -
  //   gqe "gqe"          k (routed)              yes             yes           -
  //   gqe "hard_concat"  k (routed)              -               -             -
  //   gqe "weighted_concat" k (routed)           -               -             yes
  //
  // o_proj reads [slot(0,0) .. slot(G-1, per_group-1), weighted slot?, shared head?]. Every layer
  // branch asks one of these predicates; none looks at the type or variant itself.
  bool is_gqe() const { return type == AttentionType::gqe; }
  // M = N / G. Query head e = g*M + m belongs to group g and reads KV head g = e / M.
  Index experts_per_group() const { return num_heads / num_kv_heads; }
  // Query heads computed per group, each reading the group's KV head: M (gqa) or k (gqe).
  Index slots_per_group() const { return is_gqe() ? top_k : experts_per_group(); }
  // Hard slots per token: G*k for GQE, N for GQA.
  Index hard_slots() const { return num_kv_heads * slots_per_group(); }
  bool has_weighted_slot() const { return is_gqe() && variant == GqeVariant::gqe; }
  bool has_shared_head() const { return is_gqe() && variant == GqeVariant::gqe; }
  bool scales_slots_by_prob() const { return is_gqe() && variant == GqeVariant::weighted_concat; }
  // Slots of head_dim concatenated into o_proj: N (gqa), kG+2 (gqe), kG (ablations).
  Index output_slots() const { return hard_slots() + (has_weighted_slot() ? 1 : 0) + (has_shared_head() ? 1 : 0); }
  // Query-attention heads computed per token: N (gqa), kG+1 (gqe), kG (ablations).
  Index active_heads() const { return hard_slots() + (has_shared_head() ? 1 : 0); }

  // The FLOP model (docs/flop-model.md) of one layer's prefill over T tokens (a multiply-add is 2 FLOPs; causal
  // attention counts T(T+1)/2 score pairs): projections of the computed query heads, K, V and
  // o_proj, the router, and attention of every active head.
  double prefill_flops(Index tokens) const {
    const double T = static_cast<double>(tokens), d = static_cast<double>(hidden_size),
                 dh = static_cast<double>(head_dim);
    const double projections = 2 * T * d * static_cast<double>(active_heads() + 2 * num_kv_heads + output_slots()) * dh;
    const double router = is_gqe() ? 2 * T * d * static_cast<double>(num_heads) : 0.0;
    return projections + router + 4 * static_cast<double>(active_heads()) * dh * T * (T + 1) / 2;
  }

  void validate() const {
    check_size("hidden_size", hidden_size, Limits::max_hidden);
    check_size("num_attention_heads", num_heads, Limits::max_heads);
    check_size("num_key_value_heads", num_kv_heads, Limits::max_heads);
    check_size("head_dim", head_dim, Limits::max_head_dim);
    if (head_dim % 2 != 0) fail<ConfigError>("head_dim is ", head_dim, "; expected an even number (RoPE pairs)");
    if (num_heads % num_kv_heads != 0)
      fail<ConfigError>("num_attention_heads is ", num_heads, "; expected a multiple of num_key_value_heads (",
                        num_kv_heads, ")");
    if (is_gqe() && (top_k < 1 || top_k > experts_per_group()))
      fail<ConfigError>("gqe_top_k is ", top_k, "; expected 1 to num_attention_heads / num_key_value_heads = ",
                        experts_per_group());
    if (!(rope_theta > 0) || rope_theta > 1e12)
      fail<ConfigError>("rope_theta is ", rope_theta, "; expected a positive number up to 1e12");
  }
};

}  // namespace gqe
