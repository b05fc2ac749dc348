#pragma once
// A Llama-style decoder: token embeddings, L pre-norm blocks of GQA or GQE attention and a SwiGLU
// feed-forward, a final RMSNorm and the lm_head (or the tied embeddings).
//
// One forward call runs a batch of B sequences, each continuing its own KV cache by T tokens:
// prefill (empty caches), a chunk appended to filled caches, or decode (T = 1). A loaded model is
// read-only during inference: several threads may run it at once, each with its own caches.
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "gqe/layers/feed_forward.hpp"
#include "gqe/layers/gqa_attention.hpp"
#include "gqe/layers/gqe_attention.hpp"
#include "gqe/model/config.hpp"
#include "gqe/model/kv_cache.hpp"
#include "gqe/ops/rmsnorm.hpp"

namespace gqe {

// What a forward call may report besides the logits.
template <class Scalar>
struct ForwardTrace {
  std::vector<Routing<Scalar>> routing;  // [L], GQE models only; rows in batch order (b*T + t)
};

template <class Scalar>
class Transformer {
 public:
  // Validates the config and allocates zero weights of the spec's shapes.
  explicit Transformer(const ModelConfig& config) : config_(config) {
    config_.validate();
    const Index d = config_.hidden_size, V = config_.vocab_size;
    embed_tokens_.setZero(V, d);
    for (Index i = 0; i < config_.num_layers; ++i) layers_.emplace_back(config_);
    norm_.setOnes(d);
    if (!config_.tie_word_embeddings) lm_head_.setZero(V, d);
  }

  const ModelConfig& config() const { return config_; }

  // Visits every parameter with its Hugging Face name and a view of its data in the spec's shape
  // ([out, in] like torch): fn(const std::string& name, TensorView<Scalar> w).
  template <class Fn>
  void for_each_parameter(Fn&& fn) {
    visit(*this, fn);
  }
  // fn(const std::string& name, TensorView<const Scalar> w).
  template <class Fn>
  void for_each_parameter(Fn&& fn) const {
    visit(*this, fn);
  }

  // A cache for one sequence of this model.
  KVCache<Scalar> new_cache() const { return KVCache<Scalar>(config_); }

  // The forward pass, writing into caller-owned logits (no allocation once warm): tokens [B, T],
  // sequence b continuing caches[b] by T tokens; logits [B, T, V], or [B, V] with only each
  // sequence's last token when last_only. A trace, when given, receives the routing.
  void forward(TensorView<const std::int32_t> tokens, std::vector<KVCache<Scalar>>& caches, TensorView<Scalar> logits,
               bool last_only = false, ForwardTrace<Scalar>* trace = nullptr) const {
    check_inputs(tokens, caches);
    const Index B = tokens.dim(0), T = tokens.dim(1), d = config_.hidden_size, V = config_.vocab_size;
    const Index rows = B * T, out_rows = last_only ? B : rows;
    check_shape("logits", logits.shape(), last_only ? Shape{B, V} : Shape{B, T, V});
    auto& ws = workspace();

    ws.positions.clear();
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < T; ++t) ws.positions.push_back(caches[static_cast<std::size_t>(b)].length() + t);
    ws.rope.compute(ws.positions, config_.head_dim, config_.rope_theta);

    ws.hidden.resize(rows, d);  // [R, d], the residual stream
    for (Index r = 0; r < rows; ++r) ws.hidden.row(r) = embed_tokens_.row(tokens.data()[r]);
    ws.normed.resize(rows, d);  // [R, d]
    ws.delta.resize(rows, d);   // [R, d]
    if (trace) trace->routing.resize(config_.attention_type == AttentionType::gqe ? static_cast<std::size_t>(config_.num_layers) : 0);

    for (Index l = 0; l < config_.num_layers; ++l) {
      const Block& block = layers_[static_cast<std::size_t>(l)];
      ws.segments.clear();
      for (Index b = 0; b < B; ++b) ws.segments.push_back({&caches[static_cast<std::size_t>(b)].layer(l), b * T, T});
      rms_norm<Scalar>(ws.hidden, block.input_layernorm, config_.rms_norm_eps, ws.normed);
      if (const auto* gqa = std::get_if<GQAAttention<Scalar>>(&block.attention))
        gqa->forward(ws.normed, ws.segments, ws.rope, ws.delta);
      else
        std::get<GQEAttention<Scalar>>(block.attention)
            .forward(ws.normed, ws.segments, ws.rope, ws.delta, trace ? &trace->routing[static_cast<std::size_t>(l)] : nullptr);
      ws.hidden += ws.delta;
      rms_norm<Scalar>(ws.hidden, block.post_attention_layernorm, config_.rms_norm_eps, ws.normed);
      block.mlp.forward(ws.normed, ws.delta);
      ws.hidden += ws.delta;
    }

    if (last_only)
      for (Index b = 0; b < B; ++b) ws.delta.row(b) = ws.hidden.row(b * T + T - 1);
    const auto final_rows = last_only ? ws.delta.topRows(B) : ws.hidden.topRows(rows);
    rms_norm<Scalar>(final_rows, norm_, config_.rms_norm_eps, ws.normed.topRows(out_rows));
    linear<Scalar>(ws.normed.topRows(out_rows), config_.tie_word_embeddings ? embed_tokens_ : lm_head_,
                   logits.matrix(out_rows));
  }

  // Prefill (or a chunk appended to each cache): tokens [B, T] -> logits [B, T, V].
  Tensor<Scalar> prefill(TensorView<const std::int32_t> tokens, std::vector<KVCache<Scalar>>& caches,
                         ForwardTrace<Scalar>* trace = nullptr) const {
    if (tokens.rank() != 2) fail<ShapeError>("prefill tokens have shape ", tokens.shape().str(), "; expected [B, T]");
    Tensor<Scalar> logits(Shape{tokens.dim(0), tokens.dim(1), config_.vocab_size});
    forward(tokens, caches, logits, false, trace);
    return logits;
  }
  // One decode step of every sequence: tokens [B] -> logits [B, V].
  Tensor<Scalar> decode(TensorView<const std::int32_t> tokens, std::vector<KVCache<Scalar>>& caches,
                        ForwardTrace<Scalar>* trace = nullptr) const {
    if (tokens.rank() != 1) fail<ShapeError>("decode tokens have shape ", tokens.shape().str(), "; expected [B]");
    Tensor<Scalar> logits(Shape{tokens.dim(0), config_.vocab_size});
    forward(tokens.reshape(Shape{tokens.dim(0), 1}), caches, logits, true, trace);
    return logits;
  }

 private:
  using Attention = std::variant<GQAAttention<Scalar>, GQEAttention<Scalar>>;
  struct Block {
    explicit Block(const ModelConfig& c)
        : input_layernorm(Vector<Scalar>::Ones(c.hidden_size)),
          attention(make_attention(c.attention())),
          post_attention_layernorm(Vector<Scalar>::Ones(c.hidden_size)),
          mlp(c.hidden_size, c.intermediate_size) {}
    Vector<Scalar> input_layernorm;  // [d]
    Attention attention;
    Vector<Scalar> post_attention_layernorm;  // [d]
    FeedForward<Scalar> mlp;
  };
  struct Workspace {
    RopeTable<Scalar> rope;
    Matrix<Scalar> hidden, normed, delta;  // [R, d]
    std::vector<Segment<Scalar>> segments;
    std::vector<Index> positions;  // [R]
  };
  static Workspace& workspace() {
    thread_local Workspace ws;  // reused: a decode step allocates nothing once warm
    return ws;
  }

  static Attention make_attention(const AttentionConfig& c) {
    if (c.is_gqe()) return GQEAttention<Scalar>(c);
    return GQAAttention<Scalar>(c);
  }

  template <class Self, class Fn>
  static void visit(Self& self, Fn& fn) {
    using Value = std::conditional_t<std::is_const_v<Self>, const Scalar, Scalar>;
    const auto matrix = [&](const std::string& name, auto& m) {
      fn(name, TensorView<Value>(m.data(), Shape{m.rows(), m.cols()}));
    };
    const auto vector = [&](const std::string& name, auto& v) { fn(name, TensorView<Value>(v.data(), Shape{v.size()})); };
    matrix("model.embed_tokens.weight", self.embed_tokens_);
    for (std::size_t i = 0; i < self.layers_.size(); ++i) {
      auto& block = self.layers_[i];
      const std::string prefix = "model.layers." + std::to_string(i) + ".";
      vector(prefix + "input_layernorm.weight", block.input_layernorm);
      std::visit([&](auto& attn) {
        std::decay_t<decltype(attn)>::visit(attn, [&](const char* name, auto& m) { matrix(prefix + "self_attn." + name, m); });
      }, block.attention);
      vector(prefix + "post_attention_layernorm.weight", block.post_attention_layernorm);
      FeedForward<Scalar>::visit(block.mlp, [&](const char* name, auto& m) { matrix(prefix + "mlp." + name, m); });
    }
    vector("model.norm.weight", self.norm_);
    if (!self.config_.tie_word_embeddings) matrix("lm_head.weight", self.lm_head_);
  }

  void check_inputs(TensorView<const std::int32_t> tokens, const std::vector<KVCache<Scalar>>& caches) const {
    if (tokens.rank() != 2 || tokens.dim(0) < 1 || tokens.dim(1) < 1)
      fail<ShapeError>("tokens have shape ", tokens.shape().str(), "; expected [B, T] with B, T >= 1");
    if (static_cast<Index>(caches.size()) != tokens.dim(0))
      fail<ShapeError>("got ", caches.size(), " KV caches for a batch of ", tokens.dim(0), "; expected one per sequence");
    for (Index i = 0; i < tokens.numel(); ++i) {
      const std::int32_t id = tokens.data()[i];
      if (id < 0 || id >= config_.vocab_size)
        fail<InputError>("token id ", id, " at position ", i % tokens.dim(1), " of sequence ", i / tokens.dim(1),
                         " is out of range; expected 0 to ", config_.vocab_size - 1);
    }
    for (std::size_t b = 0; b < caches.size(); ++b) {
      const KVCache<Scalar>& c = caches[b];
      if (c.num_layers() != config_.num_layers || c.layer(0).kv_heads() != config_.num_kv_heads ||
          c.layer(0).head_dim() != config_.head_dim || c.layer(0).has_mean() != config_.attention().has_shared_head())
        fail<InputError>("KV cache ", b, " was not made for this model; expected one from new_cache()");
      if (c.length() + tokens.dim(1) > config_.max_position_embeddings)
        fail<InputError>("sequence ", b, " would reach ", c.length() + tokens.dim(1),
                         " positions; expected at most max_position_embeddings = ", config_.max_position_embeddings);
    }
  }

  ModelConfig config_;
  Matrix<Scalar> embed_tokens_;  // [V, d]
  std::vector<Block> layers_;    // [L]
  Vector<Scalar> norm_;          // [d]
  Matrix<Scalar> lm_head_;       // [V, d], empty when tied
};

}  // namespace gqe
