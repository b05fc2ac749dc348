#pragma once
// A Llama-style decoder: token embeddings, L pre-norm blocks of GQA or GQE attention and a SwiGLU
// feed-forward, a final RMSNorm and the lm_head (or the tied embeddings).
//
// One forward call runs a batch of B sequences, each continuing its own KV cache by T tokens:
// prefill (empty caches), a chunk appended to filled caches, or decode (T = 1). A loaded model is
// read-only during inference: several threads may run it at once, each with its own caches. The
// same forward, given a tape, keeps what backward() needs: training composes exactly the layers
// that inference runs.
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "gqe/layers/attention.hpp"
#include "gqe/layers/embedding.hpp"
#include "gqe/layers/feed_forward.hpp"
#include "gqe/layers/norm.hpp"
#include "gqe/model/config.hpp"
#include "gqe/model/kv_cache.hpp"
#include "gqe/tensor/scratch_matrix.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

// What a forward call may report besides the logits.
template <class Scalar>
struct ForwardTrace {
  std::vector<Routing<Scalar>> routing;  // [L], GQE models only; rows in batch order (b*T + t)
};

// What a training forward keeps for the backward pass. Its attention tapes point into the forward's
// KV caches: they must live, unchanged, until backward().
template <class Scalar>
struct ModelTape {
  struct Layer {
    NormTape<Scalar> input_norm;
    AttentionTape<Scalar> attention;
    NormTape<Scalar> post_norm;
    FeedForwardTape<Scalar> mlp;
  };
  std::vector<std::int32_t> tokens;  // [R]
  RopeTable<Scalar> rope;            // the rows' angles
  std::vector<Layer> layers;         // [L]
  NormTape<Scalar> final_norm;
  ScratchMatrix<Scalar> normed;      // [R, d]: the head's input
  ModelConfig config;                // of the model that filled it
  Index rows = 0;                    // R = B*T once a forward has filled it; 0 before
};

template <class Scalar>
class Transformer {
 public:
  // Validates the config; the weights get their shapes but no storage: load_checkpoint binds them,
  // allocate_weights() gives them storage of their own.
  explicit Transformer(const ModelConfig& config) : config_(config) {
    config_.validate();
    embed_ = Embedding<Scalar>(config_.vocab_size, config_.hidden_size);
    for (Index i = 0; i < config_.num_layers; ++i) blocks_.emplace_back(config_);
    norm_ = RmsNorm<Scalar>(config_.hidden_size, config_.rms_norm_eps);
    if (!config_.tie_word_embeddings) lm_head_ = Weight(Shape{config_.vocab_size, config_.hidden_size});
  }

  const ModelConfig& config() const { return config_; }

  // Every weight with its Hugging Face name, in the checkpoint format's order (docs/checkpoints.md): fn(const std::string&, Weight&).
  template <class Fn>
  void for_each_parameter(Fn&& fn) {
    visit(*this, fn);
  }
  template <class Fn>
  void for_each_parameter(Fn&& fn) const {
    visit(*this, fn);
  }

  // Refuses a model to train whose weights have no gradient attached (training::attach_gradients):
  // the backward pass and the optimiser write into them.
  void require_gradients() const {
    for_each_parameter([](const std::string& name, const Weight& w) {
      if (!w.has_grad()) fail<InputError>("weight ", name, " has no gradient; expected attach_gradients(model) before training");
    });
  }

  // Owned Scalar storage for every weight: zeros, norm weights ones (a model to initialise or fill).
  void allocate_weights() {
    for_each_parameter([](const std::string&, Weight& w) {
      Scalar* data = w.allocate<Scalar>();
      std::fill(data, data + w.numel(), Scalar(w.shape().rank() == 1 ? 1 : 0));
    });
  }
  // Lays the matrices that the products read out in panels (tensor/panels.hpp), for inference: a
  // decode step then streams every weight in order. Same values and bits, so the same logits; the
  // embeddings stay as they are unless they serve as lm_head. Such a model cannot be trained.
  // Only the matrices for which which(weight) holds; `consumed` is told of the old storage of each
  // as it is read (Weight::lay_out_in_panels), from the library's threads.
  template <class Which, class Consumed>
  void lay_out_in_panels(const Which& which, const Consumed& consumed) {
    static_assert(std::is_same_v<Scalar, float>, "panels are the float kernels' layout");
    const auto on_threads = [](Index count, const auto& fn) {
      thread_pool().parallel_for(count, fn);
    };
    for_each_panel_candidate([&](Weight& w) {
      if (which(static_cast<const Weight&>(w))) w.lay_out_in_panels(consumed, on_threads);
    });
  }
  // fn(weight) for every weight that lay_out_in_panels may re-lay: the products' matrices.
  template <class Fn>
  void for_each_panel_candidate(const Fn& fn) {
    for (auto& block : blocks_) {
      block.attention.for_each_panel_candidate(fn);
      FeedForward<Scalar>::visit(block.mlp, [&](const char*, Weight& w) { fn(w); });
    }
    fn(head_weight());
  }
  void lay_out_in_panels() {
    lay_out_in_panels([](const Weight&) { return true; }, [](const void*, std::size_t) {});
  }

  // Bytes the weights keep in memory of their own (mapped ones are the file's).
  std::size_t owned_bytes() const {
    std::size_t n = 0;
    for_each_parameter([&](const std::string&, const Weight& w) { n += w.owned_bytes(); });
    return n;
  }

  // A cache for one sequence of this model.
  KVCache<Scalar> new_cache() const { return KVCache<Scalar>(config_); }

  // The forward pass, writing into caller-owned logits (no allocation once warm): tokens [B, T],
  // sequence b continuing caches[b] by T tokens; logits [B, T, V], or [B, V] with only each
  // sequence's last token when last_only. A trace receives the routing; a tape keeps what backward()
  // needs (training: empty caches, every row's logits). On an exception every cache keeps its length.
  void forward(TensorView<const std::int32_t> tokens, std::vector<KVCache<Scalar>>& caches, TensorView<Scalar> logits,
               bool last_only = false, ForwardTrace<Scalar>* trace = nullptr, ModelTape<Scalar>* tape = nullptr) const {
    check_inputs(tokens, caches);
    const Index B = tokens.dim(0), T = tokens.dim(1), V = config_.vocab_size;
    check_shape("logits", logits.shape(), last_only ? Shape{B, V} : Shape{B, T, V});
    if (tape) {  // (its caches must be empty: the attention layers refuse others)
      tape->rows = 0;  // until this forward has filled it
      if (last_only) fail<InputError>("a forward that fills a tape needs every row's logits; expected last_only = false");
    }
    std::vector<Index>& lengths = workspace().lengths;
    lengths.clear();
    for (const auto& c : caches) lengths.push_back(c.length());
    try {
      run_blocks(tokens, caches, trace, tape);
      head(B, T, last_only, logits, tape);
      if (tape) {
        tape->config = config_;
        tape->rows = B * T;
      }
    } catch (...) {
      for (std::size_t b = 0; b < caches.size(); ++b) caches[b].truncate(lengths[b]);
      throw;
    }
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

  // The backward pass of a forward that filled `tape` (full logits, not last_only): from d_logits
  // [R, V] = dL/dlogits, accumulates every weight's gradient (training attaches them). aux_coef
  // weighs each layer's load-balancing loss (GQE).
  void backward(ModelTape<Scalar>& tape, const Eigen::Ref<const Matrix<Scalar>>& d_logits, double aux_coef) {
    require_gradients();
    check_tape(tape, d_logits);
    thread_local Matrix<Scalar> d_hidden, d_normed, d_inner;  // [R, d]
    const Index R = d_logits.rows(), d = config_.hidden_size;
    d_normed.resize(R, d);
    d_hidden.resize(R, d);
    Weight& head = head_weight();
    linear_backward<Scalar>(tape.normed, head.matrix(), d_logits, d_normed, false, head.grad_matrix<Scalar>());
    norm_.backward(tape.final_norm, d_normed, d_hidden, false);
    for (Index l = config_.num_layers - 1; l >= 0; --l) {
      Block& block = blocks_[static_cast<std::size_t>(l)];
      auto& t = tape.layers[static_cast<std::size_t>(l)];
      block.mlp.backward(t.mlp, d_hidden, d_inner);
      block.post_norm.backward(t.post_norm, d_inner, d_hidden, true);
      block.attention.backward(t.attention, d_hidden, d_inner, aux_coef);
      block.input_norm.backward(t.input_norm, d_inner, d_hidden, true);
    }
    embed_.backward(tape.tokens.data(), d_hidden);
  }

 private:
  struct Block {
    explicit Block(const ModelConfig& c)
        : input_norm(c.hidden_size, c.rms_norm_eps), attention(c.attention()), post_norm(c.hidden_size, c.rms_norm_eps),
          mlp(c.hidden_size, c.intermediate_size) {}
    RmsNorm<Scalar> input_norm;
    Attention<Scalar> attention;
    RmsNorm<Scalar> post_norm;
    FeedForward<Scalar> mlp;
  };
  // Scratch of one thread's calls, reused: a decode step allocates nothing once warm.
  struct Workspace {
    RopeTable<Scalar> rope;
    ScratchMatrix<Scalar> hidden, normed;  // [R, d]
    ScratchMatrix<Scalar> last;            // [B, d]: each sequence's last hidden row, for last_only
    std::vector<Segment<Scalar>> segments;
    std::vector<Index> positions;  // [R]
    std::vector<Index> lengths;    // [B]: the caches' lengths before the call
  };
  static Workspace& workspace() {
    thread_local Workspace ws;
    return ws;
  }

  // Embeddings, then every block (x += attn(norm(x)); x += mlp(norm(x))), into the workspace's
  // hidden rows [B*T, d]; each cache gets its sequence's K and V. The blocks' output products add
  // into the hidden rows where they lie (no buffer of deltas, no separate pass to add them).
  void run_blocks(TensorView<const std::int32_t> tokens, std::vector<KVCache<Scalar>>& caches, ForwardTrace<Scalar>* trace,
                  ModelTape<Scalar>* tape) const {
    auto& ws = workspace();
    const Index B = tokens.dim(0), T = tokens.dim(1), rows = B * T, d = config_.hidden_size;
    ws.positions.clear();
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < T; ++t) ws.positions.push_back(caches[static_cast<std::size_t>(b)].length() + t);
    RopeTable<Scalar>& rope = tape ? tape->rope : ws.rope;
    rope.compute(ws.positions, config_.head_dim, config_.rope_theta);
    ws.hidden.resize(rows, d);
    ws.normed.resize(rows, d);
    embed_.forward(tokens.data(), ws.hidden);
    if (trace) trace->routing.resize(config_.attention().is_gqe() ? static_cast<std::size_t>(config_.num_layers) : 0);
    if (tape) {
      tape->tokens.assign(tokens.data(), tokens.data() + rows);
      tape->layers.resize(static_cast<std::size_t>(config_.num_layers));
    }
    for (Index l = 0; l < config_.num_layers; ++l) {
      const Block& block = blocks_[static_cast<std::size_t>(l)];
      auto* t = tape ? &tape->layers[static_cast<std::size_t>(l)] : nullptr;
      ws.segments.clear();
      for (Index b = 0; b < B; ++b) ws.segments.push_back({&caches[static_cast<std::size_t>(b)].layer(l), b * T, T});
      block.input_norm.forward(ws.hidden, ws.normed, t ? &t->input_norm : nullptr);
      constexpr bool kAddToHidden = true;
      block.attention.forward(ws.normed, ws.segments, rope, ws.hidden, t ? &t->attention : nullptr,
                              trace && config_.attention().is_gqe() ? &trace->routing[static_cast<std::size_t>(l)] : nullptr,
                              kAddToHidden);
      block.post_norm.forward(ws.hidden, ws.normed, t ? &t->post_norm : nullptr);
      block.mlp.forward(ws.normed, ws.hidden, t ? &t->mlp : nullptr, kAddToHidden);
    }
  }

  // The final norm and the lm_head, of every row or of each sequence's last.
  void head(Index B, Index T, bool last_only, TensorView<Scalar> logits, ModelTape<Scalar>* tape) const {
    auto& ws = workspace();
    const Index rows = last_only ? B : B * T;
    if (last_only) {
      ws.last.resize(B, config_.hidden_size);
      for (Index b = 0; b < B; ++b) ws.last.row(b) = ws.hidden.row(b * T + T - 1);
    }
    const auto final_rows = last_only ? ws.last.topRows(B) : ws.hidden.topRows(rows);
    ScratchMatrix<Scalar>& normed = tape ? tape->normed : ws.normed;
    if (tape) normed.resize(rows, config_.hidden_size);
    norm_.forward(final_rows, normed.topRows(rows), tape ? &tape->final_norm : nullptr);
    linear<Scalar>(normed.topRows(rows), head_weight(), logits.matrix(rows));
  }

  // The output head's weight [V, d]: the embeddings when tied.
  Weight& head_weight() { return config_.tie_word_embeddings ? embed_.weight() : lm_head_; }
  const Weight& head_weight() const { return config_.tie_word_embeddings ? embed_.weight() : lm_head_; }

  template <class Self, class Fn>
  static void visit(Self& self, Fn& fn) {
    fn(std::string("model.embed_tokens.weight"), self.embed_.weight());
    for (std::size_t i = 0; i < self.blocks_.size(); ++i) {
      auto& block = self.blocks_[i];
      const std::string prefix = "model.layers." + std::to_string(i) + ".";
      fn(prefix + "input_layernorm.weight", block.input_norm.weight());
      Attention<Scalar>::visit(block.attention, [&](const char* name, auto& w) { fn(prefix + "self_attn." + name, w); });
      fn(prefix + "post_attention_layernorm.weight", block.post_norm.weight());
      FeedForward<Scalar>::visit(block.mlp, [&](const char* name, auto& w) { fn(prefix + "mlp." + name, w); });
    }
    fn(std::string("model.norm.weight"), self.norm_.weight());
    if (!self.config_.tie_word_embeddings) fn(std::string("lm_head.weight"), self.lm_head_);
  }

  // A tape that backward() can use: filled by a forward of a model of this config, its caches as
  // that forward left them, and d_logits of its rows. Points its layers at its own RoPE table (the
  // tape may have moved since).
  void check_tape(ModelTape<Scalar>& tape, const Eigen::Ref<const Matrix<Scalar>>& d_logits) const {
    if (tape.rows == 0) fail<InputError>("backward() was given a tape that no forward filled; expected the tape of a forward");
    if (tape.config != config_)
      fail<InputError>("backward() was given the tape of a model of another configuration; expected this model's");
    if (d_logits.rows() != tape.rows || d_logits.cols() != config_.vocab_size)
      fail<ShapeError>("d_logits has shape [", d_logits.rows(), ", ", d_logits.cols(), "]; expected [", tape.rows, ", ",
                       config_.vocab_size, "] (the tape's rows, full logits)");
    for (auto& layer : tape.layers) {
      for (const Segment<Scalar>& s : layer.attention.segments)
        if (s.cache->length() != s.count)
          fail<InputError>("a KV cache of the tape's forward holds ", s.cache->length(), " positions, not its ", s.count,
                           "; expected the caches left as the forward left them until backward()");
      layer.attention.rope = &tape.rope;
    }
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
      if (c.config() != config_)
        fail<InputError>("KV cache ", b, " was made for a model of another configuration",
                         c.num_layers() == 0 ? " (or none)" : "", "; expected one from this model's new_cache()");
      for (Index l = 1; l < c.num_layers(); ++l)
        if (c.layer(l).length() != c.length())
          fail<InputError>("KV cache ", b, " holds ", c.layer(l).length(), " positions in layer ", l, " but ", c.length(),
                           " in layer 0; expected every layer to hold as many (KVCache's clear and truncate keep them so)");
      if (c.length() + tokens.dim(1) > config_.max_position_embeddings)
        fail<InputError>("sequence ", b, " would reach ", c.length() + tokens.dim(1),
                         " positions; expected at most max_position_embeddings = ", config_.max_position_embeddings);
    }
    // The layers check their own weights as they run; the head runs last, so its weight is checked
    // here, before any cache is written.
    if (!head_weight().bound()) fail<InputError>("lm_head weight is not loaded; expected a loaded or initialised model");
  }

  ModelConfig config_;
  Embedding<Scalar> embed_;     // [V, d]
  std::vector<Block> blocks_;   // [L]
  RmsNorm<Scalar> norm_;        // [d]
  Weight lm_head_;              // [V, d], unused when tied
};

}  // namespace gqe
