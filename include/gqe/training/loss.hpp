#pragma once
// The training objective of a Transformer, GQA or GQE in its three variants, and its gradient:
//   loss = masked mean cross-entropy + aux_coef * sum over layers of the load-balancing loss
//   L_aux = mean_g M * sum_m f[g, m] * P[g, m]
// over the batch's tokens, the dispatch fraction f held constant and the mean router probability
// P differentiable, as in Switch. The forward is the model's own inference forward with a tape;
// the backward is the model's (each layer's) backward pass. Of GQE's gradients: hard slots give
// the router none (their choice is discrete, their output unscaled); the renormalised weighted slot
// and weighted_concat's p[s] * o[s] carry it; an expert a token did not keep gets nothing from that
// token, its query never computed.
#include <cmath>
#include <cstdint>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/layers/router.hpp"
#include "gqe/model/transformer.hpp"
#include "gqe/ops/cross_entropy.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe::training {

// B sequences of T tokens, with the next-token target and the loss weight of every position.
struct Batch {
  Index batch = 0, seq_len = 0;       // B, T
  std::vector<std::int32_t> tokens;   // [B*T]
  std::vector<std::int32_t> targets;  // [B*T], any value where the weight is 0
  std::vector<float> weights;         // [B*T], 1 where the loss counts, 0 elsewhere

  Index rows() const { return batch * seq_len; }
  void resize(Index b, Index t) {
    batch = b;
    seq_len = t;
    tokens.assign(static_cast<std::size_t>(b * t), 0);
    targets.assign(static_cast<std::size_t>(b * t), 0);
    weights.assign(static_cast<std::size_t>(b * t), 0.0f);
  }
};

// What one forward pass measured.
struct LossReport {
  double lm_loss = 0;   // mean cross-entropy over the counted positions (nats)
  double aux_loss = 0;  // sum over layers of L_aux (0 for GQA), before the coefficient
  double loss = 0;      // lm_loss + aux_coef * aux_loss: what the gradient is of
  double accuracy = 0;  // fraction of counted positions whose argmax is the target
  double counted = 0;   // sum of the weights (positions counted)
  double correct = 0;   // weighted count of correct argmaxes
};

// Sums of L_aux over the layers of a training forward's tape (0 for GQA).
template <class Scalar>
double aux_loss(const ModelTape<Scalar>& tape, const ModelConfig& config) {
  if (!config.attention().is_gqe()) return 0;
  double sum = 0;
  for (const auto& layer : tape.layers) {
    RoutingStats stats;
    stats.add(layer.attention.routing);
    sum += stats.aux_loss();
  }
  return sum;
}

// The forward and backward passes of training steps over one model, with the buffers they reuse.
template <class Scalar>
class LossAndGrad {
 public:
  // Runs the model's forward pass over `batch` and returns the losses; keeps what backward() needs.
  LossReport forward(const Transformer<Scalar>& model, const Batch& batch, double aux_coef) {
    check(model.config(), batch, aux_coef);
    aux_coef_ = aux_coef;
    const Index B = batch.batch, T = batch.seq_len, V = model.config().vocab_size;
    caches_.resize(static_cast<std::size_t>(B), model.new_cache());
    for (auto& c : caches_) c.clear();  // every sequence starts at position 0
    logits_.resize(B * T, V);
    model.forward(TensorView<const std::int32_t>(batch.tokens.data(), Shape{B, T}), caches_,
                  TensorView<Scalar>(logits_.data(), Shape{B, T, V}), false, nullptr, &tape_);
    targets_ = batch.targets;
    weights_ = batch.weights;
    counted_ = 0;
    for (float w : weights_) counted_ += w;
    if (!(counted_ > 0)) fail<InputError>("the batch counts no position in its loss (every weight is 0); expected at least one");
    const LossSums sums = cross_entropy<Scalar>(logits_, targets_, weights_, 0.0);
    LossReport report;
    report.lm_loss = sums.loss / counted_;
    report.aux_loss = aux_loss(tape_, model.config());
    report.loss = report.lm_loss + aux_coef * report.aux_loss;
    report.counted = counted_;
    report.correct = sums.correct;
    report.accuracy = sums.correct / counted_;
    ready_ = true;
    return report;
  }

  // Accumulates the gradient of the last forward's loss into the model's weights' gradients
  // (attached by the caller). The logits of the last forward are overwritten by their gradient.
  void backward(Transformer<Scalar>& model) {
    if (!ready_) fail<InputError>("backward() called without a forward() before it");
    ready_ = false;
    cross_entropy<Scalar>(logits_, targets_, weights_, 1.0 / counted_);
    model.backward(tape_, logits_, aux_coef_);
  }

  // Logits of the last forward ([B*T, V]) before backward() (after it: their gradient).
  const Matrix<Scalar>& logits() const { return logits_; }
  // Routing of layer l in the last forward (GQE).
  const Routing<Scalar>& routing(Index l) const { return tape_.layers[static_cast<std::size_t>(l)].attention.routing; }

 private:
  static void check(const ModelConfig& config, const Batch& batch, double aux_coef) {
    if (batch.batch < 1 || batch.seq_len < 1)
      fail<ShapeError>("batch is ", batch.batch, " x ", batch.seq_len, " tokens; expected at least 1 x 1");
    const auto n = static_cast<std::size_t>(batch.rows());
    if (batch.tokens.size() != n || batch.targets.size() != n || batch.weights.size() != n)
      fail<ShapeError>("batch holds ", batch.tokens.size(), " tokens, ", batch.targets.size(), " targets and ",
                       batch.weights.size(), " weights; expected ", n, " of each");
    for (std::size_t i = 0; i < n; ++i) {
      if (!(batch.weights[i] >= 0) || !std::isfinite(batch.weights[i]))
        fail<InputError>("loss weight ", batch.weights[i], " at batch row ", i, "; expected a finite number >= 0");
      if (batch.weights[i] > 0 && (batch.targets[i] < 0 || batch.targets[i] >= config.vocab_size))
        fail<InputError>("target id ", batch.targets[i], " at batch row ", i, " is out of range; expected 0 to ",
                         config.vocab_size - 1);
    }
    if (!(aux_coef >= 0) || !std::isfinite(aux_coef))
      fail<ConfigError>("aux loss coefficient is ", aux_coef, "; expected a finite number >= 0");
  }

  std::vector<KVCache<Scalar>> caches_;
  ModelTape<Scalar> tape_;
  Matrix<Scalar> logits_;  // [B*T, V]
  std::vector<std::int32_t> targets_;
  std::vector<float> weights_;
  double counted_ = 0, aux_coef_ = 0;
  bool ready_ = false;
};

}  // namespace gqe::training
