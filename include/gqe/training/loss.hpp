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
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/layers/router.hpp"
#include "gqe/model/transformer.hpp"
#include "gqe/ops/cross_entropy.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/weight.hpp"
#include "gqe/util/thread_pool.hpp"

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

// The forward and backward passes of training steps over one model, with the buffers they reuse.
//
// A batch runs sequence by sequence, in lanes: each lane takes a fixed run of consecutive sequences
// and computes their forward and backward passes on one thread, into its own gradients (lane 0
// into the model's, the others into copies that borrow the model's weights), which are then added
// to the model's in lane order. A thread thus works on rows it wrote itself, and the small steps
// between the large products (norms, slot mixing, the cache) no longer pass data between cores.
// The lane count follows the batch and the model's size alone: bit-identical results for every
// thread count. Only the load-balancing loss spans the batch: its statistics are gathered from
// every sequence's routing after the forward passes and handed to every lane's backward.
template <class Scalar>
class LossAndGrad {
 public:
  // Lanes at most; and their gradients beside the model's take at most kLaneGradientBytes (a large
  // model's products are large enough to share the threads within one sequence).
  static constexpr Index kMaxLanes = 16;
  static constexpr double kLaneGradientBytes = 256.0 * (1 << 20);

  // Runs the model's forward pass over `batch` and returns the losses; keeps what backward() needs.
  LossReport forward(const Transformer<Scalar>& model, const Batch& batch, double aux_coef) {
    check(model.config(), batch, aux_coef);
    ready_ = false;  // until this forward has filled every tape
    model_ = &model;
    aux_coef_ = aux_coef;
    const Index B = batch.batch, T = batch.seq_len, V = model.config().vocab_size;
    lanes_ = lane_count(model.config(), B);
    caches_.resize(static_cast<std::size_t>(B));
    for (auto& c : caches_) {
      if (c.empty() || c.front().config() != model.config()) c.assign(1, model.new_cache());  // none, or another model's
      c.front().clear();  // every sequence starts at position 0
    }
    tapes_.resize(static_cast<std::size_t>(B));
    logits_.resize(B * T, V);
    for_each_sequence(B, [&](Index, Index b) {
      const auto i = static_cast<std::size_t>(b);
      model.forward(TensorView<const std::int32_t>(batch.tokens.data() + b * T, Shape{1, T}), caches_[i],
                    TensorView<Scalar>(logits_.data() + b * T * V, Shape{1, T, V}), false, nullptr, &tapes_[i]);
    });
    targets_ = batch.targets;
    weights_ = batch.weights;
    counted_ = 0;
    for (float w : weights_) counted_ += w;
    if (!(counted_ > 0)) fail<InputError>("the batch counts no position in its loss (every weight is 0); expected at least one");
    const LossSums sums = cross_entropy<Scalar>(logits_, targets_, weights_, 0.0);
    LossReport report;
    report.lm_loss = sums.loss / counted_;
    report.aux_loss = gather_routing(model.config());
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
    if (&model != model_) fail<InputError>("backward() was given another model than the last forward(); expected the same model");
    model.require_gradients();
    ready_ = false;
    cross_entropy<Scalar>(logits_, targets_, weights_, 1.0 / counted_);
    const std::vector<Weight*> weights = parameters(model);
    const std::vector<std::vector<Weight*>> lane_weights = bind_lanes(model, weights);
    const Index B = static_cast<Index>(tapes_.size()), T = logits_.rows() / B;
    for_each_sequence(B, [&](Index lane, Index b) {
      Transformer<Scalar>& lane_model = lane == 0 ? model : lane_models_[static_cast<std::size_t>(lane - 1)];
      lane_model.backward(tapes_[static_cast<std::size_t>(b)], logits_.middleRows(b * T, T), aux_coef_);
    });
    add_lane_gradients(weights, lane_weights);
  }

  // Logits of the last forward ([B*T, V]) before backward() (after it: their gradient).
  const Matrix<Scalar>& logits() const { return logits_; }

 private:
  static std::vector<Weight*> parameters(Transformer<Scalar>& model) {
    std::vector<Weight*> out;
    model.for_each_parameter([&](const std::string&, Weight& w) { out.push_back(&w); });
    return out;
  }

  static Index lane_count(const ModelConfig& config, Index batch) {
    const double bytes = static_cast<double>(config.parameter_count()) * sizeof(Scalar);  // one lane's gradients
    Index lanes = std::min(batch, kMaxLanes);
    while (lanes > 1 && static_cast<double>(lanes - 1) * bytes > kLaneGradientBytes) --lanes;
    return lanes;
  }

  // fn(lane, b) for every sequence b, each lane's sequences in order on one thread.
  template <class Fn>
  void for_each_sequence(Index batch, const Fn& fn) const {
    thread_pool().parallel_for(lanes_, [&](Index lane) {
      for (Index b = lane * batch / lanes_; b < (lane + 1) * batch / lanes_; ++b) fn(lane, b);
    }, ThreadPool::kMinParallelFlops);
  }

  // The load-balancing statistics of the whole batch, layer by layer, given to every sequence's
  // tape; returns the sum over layers of L_aux (0 for GQA).
  double gather_routing(const ModelConfig& config) {
    if (!config.attention().is_gqe()) return 0;
    double sum = 0;
    for (std::size_t l = 0; l < static_cast<std::size_t>(config.num_layers); ++l) {
      RoutingStats stats;
      for (const auto& tape : tapes_) stats.add(tape.layers[l].attention.routing);
      for (auto& tape : tapes_) tape.layers[l].attention.batch_routing = stats;
      sum += stats.aux_loss();
    }
    return sum;
  }

  // Lanes 1.. get models of the model's config whose weights borrow `weights` (the model's), with
  // zeroed gradients of their own; returns their weights, lane by lane.
  std::vector<std::vector<Weight*>> bind_lanes(const Transformer<Scalar>& model, const std::vector<Weight*>& weights) {
    const auto with_gradients = [&] {
      Transformer<Scalar> lane(model.config());
      for (Weight* w : parameters(lane)) w->attach_grad<Scalar>();
      return lane;
    };
    const auto count = static_cast<std::size_t>(lanes_ - 1);
    if (lane_models_.size() > count) lane_models_.erase(lane_models_.begin() + static_cast<std::ptrdiff_t>(count), lane_models_.end());
    for (auto& lane : lane_models_)
      if (lane.config() != model.config()) lane = with_gradients();  // made for another model
    while (lane_models_.size() < count) lane_models_.push_back(with_gradients());
    std::vector<std::vector<Weight*>> lanes;
    for (auto& lane : lane_models_) {
      lanes.push_back(parameters(lane));
      for (std::size_t i = 0; i < weights.size(); ++i) {
        lanes.back()[i]->borrow(weights[i]->raw(), weights[i]->dtype(), nullptr);
        std::fill_n(lanes.back()[i]->grad<Scalar>(), lanes.back()[i]->numel(), Scalar(0));
      }
    }
    return lanes;
  }

  // The model's gradients += every other lane's, in lane order.
  void add_lane_gradients(const std::vector<Weight*>& weights, const std::vector<std::vector<Weight*>>& lanes) {
    if (lanes.empty()) return;
    thread_pool().parallel_for(static_cast<Index>(weights.size()), [&](Index i) {
      const auto p = static_cast<std::size_t>(i);
      Eigen::Map<Vector<Scalar>> sum(weights[p]->grad<Scalar>(), weights[p]->numel());
      for (const auto& lane : lanes) sum += Eigen::Map<const Vector<Scalar>>(lane[p]->grad<Scalar>(), lane[p]->numel());
    }, ThreadPool::kMinParallelFlops);
  }

  static void check(const ModelConfig& config, const Batch& batch, double aux_coef) {
    if (batch.batch < 1 || batch.seq_len < 1)
      fail<ShapeError>("batch is ", batch.batch, " x ", batch.seq_len, " tokens; expected at least 1 x 1");
    if (static_cast<Index>(batch.tokens.size()) != batch.rows())
      fail<ShapeError>("batch holds ", batch.tokens.size(), " tokens; expected ", batch.rows());
    check_loss_rows(batch.targets, batch.weights, batch.rows(), config.vocab_size);  // before any forward
    if (!(aux_coef >= 0) || !std::isfinite(aux_coef))
      fail<ConfigError>("aux loss coefficient is ", aux_coef, "; expected a finite number >= 0");
  }

  Index lanes_ = 1;
  std::vector<std::vector<KVCache<Scalar>>> caches_;  // [B], one cache each
  std::vector<ModelTape<Scalar>> tapes_;              // [B]
  std::vector<Transformer<Scalar>> lane_models_;      // [lanes - 1]
  Matrix<Scalar> logits_;  // [B*T, V]
  std::vector<std::int32_t> targets_;
  std::vector<float> weights_;
  double counted_ = 0, aux_coef_ = 0;
  bool ready_ = false;
  const Transformer<Scalar>* model_ = nullptr;  // the last forward's, which backward() must be given
};

}  // namespace gqe::training
