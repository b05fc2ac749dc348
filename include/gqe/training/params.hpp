#pragma once
// The trainable parameters of a Transformer in owning Eigen storage, one member per tensor of the
// spec, so that the library's ops (linear, rms_norm, Router::route) take them as they are. The same
// structure holds gradients and the optimiser's moments. for_each visits the tensors with the
// Hugging Face names and in exactly the order of Transformer::for_each_parameter; copy_from and
// copy_to check name and shape tensor by tensor, so that a drift between the two lists is caught.
#include <cmath>
#include <string>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/layers/router.hpp"
#include "gqe/model/config.hpp"
#include "gqe/model/transformer.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/training/rng.hpp"

namespace gqe::training {

template <class Scalar>
struct LayerParams {
  Vector<Scalar> input_layernorm;           // [d]
  Matrix<Scalar> q_proj;                    // [N*d_h, d], rows of expert e: e*d_h .. (e+1)*d_h
  Matrix<Scalar> k_proj;                    // [G*d_h, d]
  Matrix<Scalar> v_proj;                    // [G*d_h, d]
  Router<Scalar> router;                    // weight [G*M, d], GQE only
  Matrix<Scalar> q_shared;                  // [d_h, d], variant "gqe" only
  Matrix<Scalar> o_proj;                    // [d, S*d_h]
  Vector<Scalar> post_attention_layernorm;  // [d]
  Matrix<Scalar> gate_proj;                 // [I, d]
  Matrix<Scalar> up_proj;                   // [I, d]
  Matrix<Scalar> down_proj;                 // [d, I]
};

template <class Scalar>
class Params {
 public:
  Params() = default;
  // Zero tensors of the config's shapes (norm weights too: call init() for a model to train).
  explicit Params(const ModelConfig& config) : config_(config) {
    config_.validate();
    const AttentionConfig a = config_.attention();
    const Index d = config_.hidden_size, dh = config_.head_dim, V = config_.vocab_size, I = config_.intermediate_size;
    embed_tokens.setZero(V, d);
    layers.resize(static_cast<std::size_t>(config_.num_layers));
    for (auto& l : layers) {
      l.input_layernorm.setZero(d);
      l.q_proj.setZero(a.num_heads * dh, d);
      l.k_proj.setZero(a.num_kv_heads * dh, d);
      l.v_proj.setZero(a.num_kv_heads * dh, d);
      if (a.is_gqe()) l.router = Router<Scalar>(a);  // zero weight
      if (a.has_shared_head()) l.q_shared.setZero(dh, d);
      l.o_proj.setZero(d, a.output_slots() * dh);
      l.post_attention_layernorm.setZero(d);
      l.gate_proj.setZero(I, d);
      l.up_proj.setZero(I, d);
      l.down_proj.setZero(d, I);
    }
    norm.setZero(d);
    if (!config_.tie_word_embeddings) lm_head.setZero(V, d);
  }

  const ModelConfig& config() const { return config_; }
  // The output projection: lm_head, or the embeddings when tied.
  const Matrix<Scalar>& output_weight() const { return config_.tie_word_embeddings ? embed_tokens : lm_head; }

  // fn(const std::string& name, TensorView<Scalar> w), Transformer::for_each_parameter's order.
  template <class Fn>
  void for_each(Fn&& fn) {
    visit(*this, fn);
  }
  template <class Fn>
  void for_each(Fn&& fn) const {
    visit(*this, fn);
  }
  // Views of every tensor, in for_each order.
  std::vector<TensorView<Scalar>> views() {
    std::vector<TensorView<Scalar>> out;
    for_each([&](const std::string&, TensorView<Scalar> w) { out.push_back(w); });
    return out;
  }
  std::vector<TensorView<const Scalar>> views() const {
    std::vector<TensorView<const Scalar>> out;
    for_each([&](const std::string&, TensorView<const Scalar> w) { out.push_back(w); });
    return out;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for_each([&](const std::string& name, TensorView<const Scalar>) { out.push_back(name); });
    return out;
  }
  Index numel() const {
    Index n = 0;
    for_each([&](const std::string&, TensorView<const Scalar> w) { n += w.numel(); });
    return n;
  }
  void set_zero() {
    for_each([](const std::string&, TensorView<Scalar> w) { w.flat().setZero(); });
  }

  // The authors' initialisation: router zeros, Xavier-uniform projections (q, k, v, o, q_shared,
  // and likewise the feed-forward and lm_head), norm weights ones; token embeddings N(0, 1) like
  // torch's nn.Embedding (Xavier-uniform instead when tied, since they then also produce logits).
  // Drawn tensor by tensor in for_each order from one stream of `seed`.
  void init(std::uint64_t seed) {
    Rng rng(derive_seed(seed, 0x1417));
    const bool tied = config_.tie_word_embeddings;
    for_each([&](const std::string& name, TensorView<Scalar> w) {
      if (w.rank() == 1) {
        w.flat().setOnes();
      } else if (name.find(".router.") != std::string::npos) {
        w.flat().setZero();
      } else if (name == "model.embed_tokens.weight" && !tied) {
        for (Index i = 0; i < w.numel(); ++i) w.data()[i] = static_cast<Scalar>(rng.normal());
      } else {
        const double fan_out = static_cast<double>(w.dim(0)), fan_in = static_cast<double>(w.dim(1));
        const double bound = std::sqrt(6.0 / (fan_in + fan_out));
        for (Index i = 0; i < w.numel(); ++i) w.data()[i] = static_cast<Scalar>(rng.uniform(-bound, bound));
      }
    });
  }

  // Copies the weights of a Transformer of the same config (a loaded checkpoint) into this.
  void copy_from(const Transformer<Scalar>& model) {
    check_config(model.config());
    const auto mine = views();
    std::size_t i = 0;
    const auto my_names = names();
    model.for_each_parameter([&](const std::string& name, TensorView<const Scalar> w) {
      check_entry(i, my_names, mine, name, w.shape());
      std::copy_n(w.data(), w.numel(), mine[i].data());
      ++i;
    });
    if (i != mine.size()) fail<FormatError>("the model has ", i, " tensors; the training parameters have ", mine.size());
  }
  // Writes these weights into a Transformer of the same config (to save or run it).
  void copy_to(Transformer<Scalar>& model) const {
    check_config(model.config());
    const auto mine = views();
    const auto my_names = names();
    std::size_t i = 0;
    model.for_each_parameter([&](const std::string& name, TensorView<Scalar> w) {
      check_entry(i, my_names, mine, name, w.shape());
      std::copy_n(mine[i].data(), w.numel(), w.data());
      ++i;
    });
    if (i != mine.size()) fail<FormatError>("the model has ", i, " tensors; the training parameters have ", mine.size());
  }
  Transformer<Scalar> to_model() const {
    Transformer<Scalar> model(config_);
    copy_to(model);
    return model;
  }

  Matrix<Scalar> embed_tokens;     // [V, d]
  std::vector<LayerParams<Scalar>> layers;  // [L]
  Vector<Scalar> norm;             // [d]
  Matrix<Scalar> lm_head;          // [V, d], empty when tied

 private:
  template <class Self, class Fn>
  static void visit(Self& self, Fn& fn) {
    using Value = std::conditional_t<std::is_const_v<Self>, const Scalar, Scalar>;
    const auto matrix = [&](const std::string& name, auto& m) {
      fn(name, TensorView<Value>(m.data(), Shape{m.rows(), m.cols()}));
    };
    const auto vector = [&](const std::string& name, auto& v) { fn(name, TensorView<Value>(v.data(), Shape{v.size()})); };
    const AttentionConfig a = self.config_.attention();
    matrix("model.embed_tokens.weight", self.embed_tokens);
    for (std::size_t i = 0; i < self.layers.size(); ++i) {
      auto& l = self.layers[i];
      const std::string p = "model.layers." + std::to_string(i) + ".";
      vector(p + "input_layernorm.weight", l.input_layernorm);
      matrix(p + "self_attn.q_proj.weight", l.q_proj);
      matrix(p + "self_attn.k_proj.weight", l.k_proj);
      matrix(p + "self_attn.v_proj.weight", l.v_proj);
      if (a.is_gqe()) matrix(p + "self_attn.router.weight", l.router.weight());
      if (a.has_shared_head()) matrix(p + "self_attn.q_shared.weight", l.q_shared);
      matrix(p + "self_attn.o_proj.weight", l.o_proj);
      vector(p + "post_attention_layernorm.weight", l.post_attention_layernorm);
      matrix(p + "mlp.gate_proj.weight", l.gate_proj);
      matrix(p + "mlp.up_proj.weight", l.up_proj);
      matrix(p + "mlp.down_proj.weight", l.down_proj);
    }
    vector("model.norm.weight", self.norm);
    if (!self.config_.tie_word_embeddings) matrix("lm_head.weight", self.lm_head);
  }

  void check_config(const ModelConfig& other) const {
    if (other.attention_type != config_.attention_type || other.num_layers != config_.num_layers ||
        other.hidden_size != config_.hidden_size || other.vocab_size != config_.vocab_size ||
        other.tie_word_embeddings != config_.tie_word_embeddings)
      fail<ConfigError>("the model's config (", to_string(other.attention_type), ", ", other.num_layers, " layers, d = ",
                        other.hidden_size, ", V = ", other.vocab_size, ") differs from the training parameters' (",
                        to_string(config_.attention_type), ", ", config_.num_layers, " layers, d = ", config_.hidden_size,
                        ", V = ", config_.vocab_size, ")");
  }
  template <class View>
  static void check_entry(std::size_t i, const std::vector<std::string>& names, const std::vector<View>& mine,
                          const std::string& name, const Shape& shape) {
    if (i >= mine.size() || names[i] != name || mine[i].shape() != shape)
      fail<FormatError>("model tensor ", i, " is ", name, " ", shape.str(), "; the training parameters have ",
                        i < mine.size() ? names[i] + " " + mine[i].shape().str() : std::string("no tensor there"));
  }

  ModelConfig config_;
};

}  // namespace gqe::training
