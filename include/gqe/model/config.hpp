#pragma once
// The configuration of a whole model, the C++ face of config.json.
#include <cstdint>
#include <tuple>
#include <vector>

#include "gqe/layers/attention_config.hpp"

namespace gqe {

struct ModelConfig {
  Index vocab_size = 0;         // V
  Index hidden_size = 0;        // d
  Index intermediate_size = 0;  // I
  Index num_layers = 0;         // L
  AttentionType attention_type = AttentionType::gqa;
  GqeVariant gqe_variant = GqeVariant::gqe;
  Index num_heads = 0;          // N
  Index num_kv_heads = 0;       // G
  Index head_dim = 0;           // d_h
  Index top_k = 1;              // k
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  Index max_position_embeddings = 4096;
  // Token ids that end generation (config.json's eos_token_id, an int or a list); empty: none.
  std::vector<std::int32_t> eos_token_ids;

  // Every field equal (a model built from one config computes what a model built from the other does).
  friend bool operator==(const ModelConfig& a, const ModelConfig& b) {
    const auto fields = [](const ModelConfig& c) {
      return std::tie(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.attention_type, c.gqe_variant,
                      c.num_heads, c.num_kv_heads, c.head_dim, c.top_k, c.rms_norm_eps, c.rope_theta, c.tie_word_embeddings,
                      c.max_position_embeddings, c.eos_token_ids);
    };
    return fields(a) == fields(b);
  }
  friend bool operator!=(const ModelConfig& a, const ModelConfig& b) { return !(a == b); }

  AttentionConfig attention() const {
    AttentionConfig a;
    a.type = attention_type;
    a.variant = gqe_variant;
    a.hidden_size = hidden_size;
    a.num_heads = num_heads;
    a.num_kv_heads = num_kv_heads;
    a.head_dim = head_dim;
    a.top_k = top_k;
    a.rope_theta = rope_theta;
    return a;
  }

  // Parameters the model holds, by docs/checkpoints.md's tensor list (checked against Transformer's own).
  Index parameter_count() const {
    const AttentionConfig a = attention();
    const Index d = hidden_size, dh = head_dim;
    const Index attn = (num_heads + 2 * num_kv_heads) * dh * d + (a.is_gqe() ? num_heads * d : 0) +
                       (a.has_shared_head() ? dh * d : 0) + d * a.output_slots() * dh;
    const Index block = 2 * d + attn + 3 * d * intermediate_size;
    return vocab_size * d * (tie_word_embeddings ? 1 : 2) + num_layers * block + d;
  }

  void validate() const {
    check_size("vocab_size", vocab_size, Limits::max_vocab);
    check_size("intermediate_size", intermediate_size, Limits::max_intermediate);
    check_size("num_hidden_layers", num_layers, Limits::max_layers);
    check_size("max_position_embeddings", max_position_embeddings, Limits::max_positions);
    if (!(rms_norm_eps > 0) || rms_norm_eps > 1)
      fail<ConfigError>("rms_norm_eps is ", rms_norm_eps, "; expected a number in (0, 1]");
    for (const std::int32_t id : eos_token_ids)
      if (id < 0 || id >= vocab_size)
        fail<ConfigError>("eos_token_id ", id, " is not a token of this model; expected an id from 0 to vocab_size - 1 = ",
                          vocab_size - 1);
    attention().validate();
  }
};

}  // namespace gqe
