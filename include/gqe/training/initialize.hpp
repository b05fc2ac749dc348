#pragma once
// The authors' initialisation of a model to train: router zeros, Xavier-uniform projections (q, k,
// v, o, q_shared, and likewise the feed-forward and lm_head), norm weights ones; token embeddings
// N(0, 1) like torch's nn.Embedding (Xavier-uniform instead when tied, since they then also produce
// logits). Drawn tensor by tensor in the model's parameter order from one stream of `seed`.
#include <cmath>
#include <cstdint>
#include <string>

#include "gqe/model/transformer.hpp"
#include "gqe/training/rng.hpp"

namespace gqe::training {

// Gives every weight owned Scalar storage and draws its initial values.
template <class Scalar>
void initialize(Transformer<Scalar>& model, std::uint64_t seed) {
  Rng rng(derive_seed(seed, 0x1417));
  const bool tied = model.config().tie_word_embeddings;
  model.for_each_parameter([&](const std::string& name, Weight& w) {
    Scalar* data = w.allocate<Scalar>();
    const Index n = w.numel();
    if (w.shape().rank() == 1) {
      std::fill(data, data + n, Scalar(1));
    } else if (name.find(".router.") != std::string::npos) {
      std::fill(data, data + n, Scalar(0));
    } else if (name == "model.embed_tokens.weight" && !tied) {
      for (Index i = 0; i < n; ++i) data[i] = static_cast<Scalar>(rng.normal());
    } else {
      const double fan_out = static_cast<double>(w.rows()), fan_in = static_cast<double>(w.cols());
      const double bound = std::sqrt(6.0 / (fan_in + fan_out));
      for (Index i = 0; i < n; ++i) data[i] = static_cast<Scalar>(rng.uniform(-bound, bound));
    }
  });
}

}  // namespace gqe::training
