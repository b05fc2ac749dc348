#pragma once
// The training forward and backward of a whole Transformer, GQA or GQE in its three variants.
//
// The forward is built from the library's ops (linear, rms_norm, RopeTable/apply_rope,
// Router::route, causal_attention) and saves what the backward needs: each layer's residual input,
// normed inputs, Q/K/V after RoPE, attention outputs and per-row log-sum-exp, routing, and the
// feed-forward's pre-activations. No T x T matrix is kept (see attention_grad.hpp).
//
// Loss = masked mean cross-entropy + aux_coef * sum over layers of the load-balancing loss
//   L_aux = mean_g M * sum_m f[g, m] * P[g, m]
// over the batch's tokens, where the dispatch fraction f is a constant and P (the mean router
// probability) is differentiable, as in Switch. Gradients of GQE:
//  - hard slots give the router no gradient (their choice is discrete and their output unscaled);
//  - the renormalised weighted slot w[s] = p[s] / max(1e-9, sum of kept p) passes its gradient to
//    the kept experts' p, and through the softmax of each group to the router logits;
//  - weighted_concat's p[s] * o[s] passes dL/dout . o to p[s];
//  - an expert a token did not keep gets no gradient from that token, and its query is never
//    computed: queries are projected (and back-propagated) by gathering each expert's rows;
//  - the shared head reads the mean over groups of K and V, whose gradient returns 1/G to each.
#include "gqe/tensor/eigen.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/layers/router.hpp"
#include "gqe/ops/linear.hpp"
#include "gqe/ops/rmsnorm.hpp"
#include "gqe/ops/rope.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/training/attention_grad.hpp"
#include "gqe/training/grad_ops.hpp"
#include "gqe/training/params.hpp"
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

template <class Scalar>
class LossAndGrad {
 public:
  explicit LossAndGrad(const ModelConfig& config) : config_(config), attn_(config.attention()) {
    config_.validate();
    layers_.resize(static_cast<std::size_t>(config_.num_layers));
  }

  const ModelConfig& config() const { return config_; }

  // Runs the forward pass over `batch` and returns the losses; keeps what backward() needs.
  // aux_coef multiplies the load-balancing loss (GQE only).
  LossReport forward(const Params<Scalar>& params, const Batch& batch, double aux_coef) {
    check(params, batch, aux_coef);
    aux_coef_ = aux_coef;
    B_ = batch.batch;
    T_ = batch.seq_len;
    const Index R = B_ * T_, d = config_.hidden_size;
    tokens_ = batch.tokens;
    targets_ = batch.targets;
    weights_ = batch.weights;

    positions_.resize(static_cast<std::size_t>(R));
    for (Index r = 0; r < R; ++r) positions_[static_cast<std::size_t>(r)] = r % T_;
    rope_.compute(positions_, config_.head_dim, config_.rope_theta);
    rope_inverse_ = inverse_rope(rope_);

    Matrix<Scalar>& h = hidden_;
    h.resize(R, d);
    for (Index r = 0; r < R; ++r) h.row(r) = params.embed_tokens.row(tokens_[static_cast<std::size_t>(r)]);
    delta_.resize(R, d);
    LossReport report;
    for (Index l = 0; l < config_.num_layers; ++l) {
      const auto& p = params.layers[static_cast<std::size_t>(l)];
      auto& a = layers_[static_cast<std::size_t>(l)];
      a.h_in = h;
      rms_inverse<Scalar>(h, config_.rms_norm_eps, a.inv1);
      a.xn.resize(R, d);
      rms_norm<Scalar>(h, p.input_layernorm, config_.rms_norm_eps, a.xn);
      if (attn_.is_gqe())
        report.aux_loss += gqe_forward(p, a);
      else
        gqa_forward(p, a);
      h += delta_;
      a.h_mid = h;
      rms_inverse<Scalar>(h, config_.rms_norm_eps, a.inv2);
      a.xn2.resize(R, d);
      rms_norm<Scalar>(h, p.post_attention_layernorm, config_.rms_norm_eps, a.xn2);
      const Index I = config_.intermediate_size;
      a.gate.resize(R, I);
      a.up.resize(R, I);
      a.act.resize(R, I);
      linear<Scalar>(a.xn2, p.gate_proj, a.gate);
      linear<Scalar>(a.xn2, p.up_proj, a.up);
      a.act = a.gate.unaryExpr([](Scalar z) { return silu(z); }).cwiseProduct(a.up);
      linear<Scalar>(a.act, p.down_proj, delta_);
      h += delta_;
    }
    h_final_ = h;
    rms_inverse<Scalar>(h, config_.rms_norm_eps, inv_final_);
    x_final_.resize(R, d);
    rms_norm<Scalar>(h, params.norm, config_.rms_norm_eps, x_final_);
    logits_.resize(R, config_.vocab_size);
    linear<Scalar>(x_final_, params.output_weight(), logits_);

    double counted = 0;
    for (float w : weights_) counted += w;
    if (!(counted > 0)) fail<InputError>("the batch counts no position in its loss (every weight is 0); expected at least one");
    counted_ = counted;
    const LossSums sums = cross_entropy<Scalar>(logits_, targets_, weights_, 0.0);
    report.lm_loss = sums.loss / counted;
    report.counted = counted;
    report.correct = sums.correct;
    report.accuracy = sums.correct / counted;
    report.loss = report.lm_loss + aux_coef_ * report.aux_loss;
    ready_ = true;
    return report;
  }

  // Accumulates the gradient of the last forward's loss into grads (same config as params).
  // The logits of the last forward are overwritten by their gradient.
  void backward(const Params<Scalar>& params, Params<Scalar>& grads) {
    if (!ready_) fail<InputError>("backward() called without a forward() before it");
    ready_ = false;
    const Index R = B_ * T_, d = config_.hidden_size;
    cross_entropy<Scalar>(logits_, targets_, weights_, 1.0 / counted_);
    Matrix<Scalar>& dh = hidden_;  // the residual stream's gradient reuses the hidden buffer
    dx_.resize(R, d);
    linear_backward<Scalar>(x_final_, params.output_weight(), logits_, dx_, false,
                            config_.tie_word_embeddings ? grads.embed_tokens : grads.lm_head);
    dh.resize(R, d);
    rms_norm_backward<Scalar>(h_final_, params.norm, inv_final_, dx_, dh, false, grads.norm);

    for (Index l = config_.num_layers - 1; l >= 0; --l) {
      const auto& p = params.layers[static_cast<std::size_t>(l)];
      auto& g = grads.layers[static_cast<std::size_t>(l)];
      auto& a = layers_[static_cast<std::size_t>(l)];
      // Feed-forward: delta = act Wd^T, act = silu(gate) * up.
      d_act_.resize(R, config_.intermediate_size);
      linear_backward<Scalar>(a.act, p.down_proj, dh, d_act_, false, g.down_proj);
      d_up_ = d_act_.cwiseProduct(a.gate.unaryExpr([](Scalar z) { return silu(z); }));
      d_act_ = d_act_.cwiseProduct(a.up).cwiseProduct(a.gate.unaryExpr([](Scalar z) { return silu_grad(z); }));
      linear_backward<Scalar>(a.xn2, p.gate_proj, d_act_, dx_, false, g.gate_proj);
      linear_backward<Scalar>(a.xn2, p.up_proj, d_up_, dx_, true, g.up_proj);
      rms_norm_backward<Scalar>(a.h_mid, p.post_attention_layernorm, a.inv2, dx_, dh, true, g.post_attention_layernorm);
      // Attention: delta = attn(xn); dx_ receives d xn.
      if (attn_.is_gqe())
        gqe_backward(p, g, a, dh);
      else
        gqa_backward(p, g, a, dh);
      rms_norm_backward<Scalar>(a.h_in, p.input_layernorm, a.inv1, dx_, dh, true, g.input_layernorm);
    }
    for (Index r = 0; r < R; ++r) grads.embed_tokens.row(tokens_[static_cast<std::size_t>(r)]) += dh.row(r);
  }

  // Logits of the last forward ([B*T, V]) before backward() (after it: their gradient).
  const Matrix<Scalar>& logits() const { return logits_; }
  // Routing of layer l in the last forward (GQE).
  const Routing<Scalar>& routing(Index l) const { return layers_[static_cast<std::size_t>(l)].route; }

 private:
  struct LayerActivations {
    Matrix<Scalar> h_in, xn;    // [R, d]
    Vector<Scalar> inv1;        // [R]
    Routing<Scalar> route;      // GQE
    Eigen::ArrayXd load;        // [G*M], f: fraction of tokens that kept each expert (a constant)
    Matrix<Scalar> q;           // [R, H*d_h] after RoPE; H = N (gqa) or active heads (gqe)
    Matrix<Scalar> k, v;        // [R, G*d_h], k after RoPE
    Matrix<Scalar> mk, mv;      // [R, d_h], mean over groups (shared head)
    Matrix<Scalar> o;           // [R, H*d_h], each query head's attention output
    Matrix<Scalar> lse;         // [R, H]
    Matrix<Scalar> cat;         // [R, S*d_h], o_proj's input (GQE)
    Matrix<Scalar> h_mid, xn2;  // [R, d]
    Vector<Scalar> inv2;        // [R]
    Matrix<Scalar> gate, up, act;  // [R, I]
  };
  // Rows of x that kept expert e, and the slot j each kept it in.
  struct ExpertRows {
    std::vector<Index> rows;
    std::vector<Index> slots;
  };

  void check(const Params<Scalar>& params, const Batch& batch, double aux_coef) const {
    const ModelConfig& c = params.config();
    if (c.attention_type != config_.attention_type || c.gqe_variant != config_.gqe_variant ||
        c.hidden_size != config_.hidden_size || c.num_layers != config_.num_layers || c.vocab_size != config_.vocab_size ||
        c.num_heads != config_.num_heads || c.num_kv_heads != config_.num_kv_heads || c.head_dim != config_.head_dim ||
        c.top_k != config_.top_k || c.intermediate_size != config_.intermediate_size ||
        c.tie_word_embeddings != config_.tie_word_embeddings)
      fail<ConfigError>("the parameters' config differs from the one this LossAndGrad was built for");
    if (batch.batch < 1 || batch.seq_len < 1)
      fail<ShapeError>("batch is ", batch.batch, " x ", batch.seq_len, " tokens; expected at least 1 x 1");
    if (batch.seq_len > config_.max_position_embeddings)
      fail<InputError>("sequence length ", batch.seq_len, " exceeds max_position_embeddings = ", config_.max_position_embeddings);
    const auto n = static_cast<std::size_t>(batch.rows());
    if (batch.tokens.size() != n || batch.targets.size() != n || batch.weights.size() != n)
      fail<ShapeError>("batch holds ", batch.tokens.size(), " tokens, ", batch.targets.size(), " targets and ",
                       batch.weights.size(), " weights; expected ", n, " of each");
    for (std::size_t i = 0; i < n; ++i) {
      if (batch.tokens[i] < 0 || batch.tokens[i] >= config_.vocab_size)
        fail<InputError>("token id ", batch.tokens[i], " at batch row ", i, " is out of range; expected 0 to ",
                         config_.vocab_size - 1);
      if (!(batch.weights[i] >= 0) || !std::isfinite(batch.weights[i]))
        fail<InputError>("loss weight ", batch.weights[i], " at batch row ", i, "; expected a finite number >= 0");
      if (batch.weights[i] > 0 && (batch.targets[i] < 0 || batch.targets[i] >= config_.vocab_size))
        fail<InputError>("target id ", batch.targets[i], " at batch row ", i, " is out of range; expected 0 to ",
                         config_.vocab_size - 1);
    }
    if (!(aux_coef >= 0) || !std::isfinite(aux_coef))
      fail<ConfigError>("aux loss coefficient is ", aux_coef, "; expected a finite number >= 0");
  }

  // K and V of every row, K after RoPE (and their mean over groups for a shared head).
  void key_values(const LayerParams<Scalar>& p, LayerActivations& a) {
    const Index R = B_ * T_, G = attn_.num_kv_heads, dh = attn_.head_dim;
    a.k.resize(R, G * dh);
    a.v.resize(R, G * dh);
    linear<Scalar>(a.xn, p.k_proj, a.k);
    linear<Scalar>(a.xn, p.v_proj, a.v);
    apply_rope<Scalar>(a.k, dh, rope_);
    if (attn_.has_shared_head()) {
      a.mk.setZero(R, dh);
      a.mv.setZero(R, dh);
      for (Index g = 0; g < G; ++g) {
        a.mk += a.k.middleCols(g * dh, dh);
        a.mv += a.v.middleCols(g * dh, dh);
      }
      a.mk /= Scalar(G);
      a.mv /= Scalar(G);
    }
  }

  // One entry per sequence and K/V head: `heads` query heads at column q_col read K/V head g
  // (g = -1: the mean K/V of the shared head).
  TrainHead<Scalar> entry(LayerActivations& a, Index b, Index q_col, Index heads, Index g) {
    const Index dh = attn_.head_dim, row0 = b * T_;
    TrainHead<Scalar> e;
    e.query = a.q.data() + row0 * a.q.cols() + q_col * dh;
    e.query_stride = a.q.cols();
    const Matrix<Scalar>& key = g < 0 ? a.mk : a.k;
    const Matrix<Scalar>& value = g < 0 ? a.mv : a.v;
    const Index kv_col = g < 0 ? 0 : g * dh;
    e.key = key.data() + row0 * key.cols() + kv_col;
    e.value = value.data() + row0 * value.cols() + kv_col;
    e.kv_stride = key.cols();
    e.out = a.o.data() + row0 * a.o.cols() + q_col * dh;
    e.out_stride = a.o.cols();
    e.lse = a.lse.data() + row0 * a.lse.cols() + q_col;
    e.lse_stride = a.lse.cols();
    e.d_out = d_o_.data() + row0 * d_o_.cols() + q_col * dh;
    e.d_query = d_q_.data() + row0 * d_q_.cols() + q_col * dh;
    Matrix<Scalar>& d_key = g < 0 ? d_mk_ : d_k_;
    Matrix<Scalar>& d_value = g < 0 ? d_mv_ : d_v_;
    e.d_key = d_key.data() + row0 * d_key.cols() + kv_col;
    e.d_value = d_value.data() + row0 * d_value.cols() + kv_col;
    e.d_kv_stride = d_key.cols();
    e.count = T_;
    e.heads = heads;
    return e;
  }

  // Entries of the layer's query heads: GQA's M heads per group; GQE's k slots per group, then the
  // shared head. d_* buffers are sized here too, so that the backward can reuse the list.
  void make_entries(LayerActivations& a) {
    const Index R = B_ * T_, G = attn_.num_kv_heads, dh = attn_.head_dim;
    const Index per_group = attn_.is_gqe() ? attn_.top_k : attn_.experts_per_group();
    const Index H = a.q.cols() / dh;
    d_o_.resize(R, H * dh);
    d_q_.resize(R, H * dh);
    d_k_.resize(R, G * dh);
    d_v_.resize(R, G * dh);
    if (attn_.has_shared_head()) {
      d_mk_.resize(R, dh);
      d_mv_.resize(R, dh);
    }
    entries_.clear();
    for (Index b = 0; b < B_; ++b) {
      for (Index g = 0; g < G; ++g) entries_.push_back(entry(a, b, g * per_group, per_group, g));
      if (attn_.has_shared_head()) entries_.push_back(entry(a, b, G * per_group, 1, -1));
    }
  }

  Scalar scale() const { return Scalar(1) / std::sqrt(Scalar(attn_.head_dim)); }

  void gqa_forward(const LayerParams<Scalar>& p, LayerActivations& a) {
    const Index R = B_ * T_, N = attn_.num_heads, dh = attn_.head_dim;
    key_values(p, a);
    a.q.resize(R, N * dh);
    linear<Scalar>(a.xn, p.q_proj, a.q);
    apply_rope<Scalar>(a.q, dh, rope_);
    a.o.resize(R, N * dh);
    a.lse.resize(R, N);
    make_entries(a);
    attention_forward(entries_, dh, scale());
    linear<Scalar>(a.o, p.o_proj, delta_);
  }

  void gqa_backward(const LayerParams<Scalar>& p, LayerParams<Scalar>& g, LayerActivations& a, const Matrix<Scalar>& dh_out) {
    const Index dh = attn_.head_dim;
    make_entries(a);
    linear_backward<Scalar>(a.o, p.o_proj, dh_out, d_o_, false, g.o_proj);
    attention_backward(entries_, dh, scale());
    apply_rope<Scalar>(d_q_, dh, rope_inverse_);
    apply_rope<Scalar>(d_k_, dh, rope_inverse_);
    linear_backward<Scalar>(a.xn, p.q_proj, d_q_, dx_, false, g.q_proj);
    linear_backward<Scalar>(a.xn, p.k_proj, d_k_, dx_, true, g.k_proj);
    linear_backward<Scalar>(a.xn, p.v_proj, d_v_, dx_, true, g.v_proj);
  }

  // Rows that kept each expert, from the routing.
  void group_rows(const Routing<Scalar>& route) {
    const Index G = attn_.num_kv_heads, M = attn_.experts_per_group(), k = attn_.top_k, R = route.rows();
    experts_.resize(static_cast<std::size_t>(G * M));
    for (auto& e : experts_) e.rows.clear(), e.slots.clear();
    for (Index r = 0; r < R; ++r)
      for (Index g = 0; g < G; ++g)
        for (Index j = 0; j < k; ++j) {
          auto& e = experts_[static_cast<std::size_t>(g * M + route.experts(r, g * k + j))];
          e.rows.push_back(r);
          e.slots.push_back(j);
        }
  }

  // Returns this layer's L_aux; delta_ receives the attention output.
  double gqe_forward(const LayerParams<Scalar>& p, LayerActivations& a) {
    const Index R = B_ * T_, G = attn_.num_kv_heads, M = attn_.experts_per_group(), k = attn_.top_k;
    const Index dh = attn_.head_dim, d = attn_.hidden_size, hard = G * k, H = attn_.active_heads();
    p.router.route(a.xn, a.route);
    key_values(p, a);
    group_rows(a.route);

    // Queries: slot (g, j) in columns (g*k + j)*d_h from its expert's rows of q_proj, gathered per
    // expert (one GEMM each); the shared head last.
    a.q.resize(R, H * dh);
    thread_pool().parallel_for(G * M, [&](Index e) {
      const ExpertRows& rows = experts_[static_cast<std::size_t>(e)];
      const Index n = static_cast<Index>(rows.rows.size());
      if (n == 0) return;
      Matrix<Scalar> gathered(n, d), projected(n, dh);
      for (Index i = 0; i < n; ++i) gathered.row(i) = a.xn.row(rows.rows[static_cast<std::size_t>(i)]);
      projected.noalias() = gathered * p.q_proj.middleRows(e * dh, dh).transpose();
      const Index g = e / M;
      for (Index i = 0; i < n; ++i)
        a.q.row(rows.rows[static_cast<std::size_t>(i)]).segment((g * k + rows.slots[static_cast<std::size_t>(i)]) * dh, dh) =
            projected.row(i);
    }, 2.0 * static_cast<double>(R * hard * d * dh));
    if (attn_.has_shared_head()) linear<Scalar>(a.xn, p.q_shared, a.q.rightCols(dh));
    apply_rope<Scalar>(a.q, dh, rope_);

    a.o.resize(R, H * dh);
    a.lse.resize(R, H);
    make_entries(a);
    attention_forward(entries_, dh, scale());

    a.cat.resize(R, attn_.output_slots() * dh);
    a.cat.leftCols(hard * dh) = a.o.leftCols(hard * dh);
    if (attn_.variant == GqeVariant::gqe) {
      for (Index r = 0; r < R; ++r) {
        auto weighted = a.cat.row(r).segment(hard * dh, dh);
        weighted.setZero();
        for (Index s = 0; s < hard; ++s) weighted += a.route.weights(r, s) * a.o.row(r).segment(s * dh, dh);
      }
      a.cat.rightCols(dh) = a.o.rightCols(dh);
    } else if (attn_.variant == GqeVariant::weighted_concat) {
      for (Index r = 0; r < R; ++r)
        for (Index s = 0; s < hard; ++s)
          a.cat.row(r).segment(s * dh, dh) *= a.route.probs(r, (s / k) * M + a.route.experts(r, s));
    }
    linear<Scalar>(a.cat, p.o_proj, delta_);

    // L_aux = mean_g M * sum_m f[g, m] * P[g, m] over the batch's tokens.
    a.load.setZero(G * M);
    for (Index e = 0; e < G * M; ++e)
      a.load(e) = static_cast<double>(experts_[static_cast<std::size_t>(e)].rows.size()) / static_cast<double>(R);
    const Eigen::ArrayXd mean_prob = a.route.probs.template cast<double>().colwise().mean().transpose().array();
    return static_cast<double>(M) * (a.load * mean_prob).sum() / static_cast<double>(G);
  }

  void gqe_backward(const LayerParams<Scalar>& p, LayerParams<Scalar>& g, LayerActivations& a, const Matrix<Scalar>& dh_out) {
    const Index R = B_ * T_, G = attn_.num_kv_heads, M = attn_.experts_per_group(), k = attn_.top_k;
    const Index dh = attn_.head_dim, d = attn_.hidden_size, hard = G * k;
    make_entries(a);
    group_rows(a.route);
    d_cat_.resize(R, a.cat.cols());
    linear_backward<Scalar>(a.cat, p.o_proj, dh_out, d_cat_, false, g.o_proj);

    // d o of every query head, and dL/dp of every expert (d_probs_ [R, G*M]).
    d_probs_.setZero(R, G * M);
    d_o_.leftCols(hard * dh) = d_cat_.leftCols(hard * dh);
    if (attn_.variant == GqeVariant::gqe) {
      d_o_.rightCols(dh) = d_cat_.rightCols(dh);
      Vector<Scalar> d_w(hard);
      for (Index r = 0; r < R; ++r) {
        const auto d_weighted = d_cat_.row(r).segment(hard * dh, dh);
        Scalar kept_sum = 0;
        for (Index s = 0; s < hard; ++s) {
          d_o_.row(r).segment(s * dh, dh) += a.route.weights(r, s) * d_weighted;
          d_w(s) = d_weighted.dot(a.o.row(r).segment(s * dh, dh));
          kept_sum += a.route.probs(r, (s / k) * M + a.route.experts(r, s));
        }
        // w[s] = p[s] / D, D = max(1e-9, sum of kept p): dp[s] = (dw[s] - sum_s' dw[s'] w[s']) / D,
        // or dw[s] / 1e-9 where the clamp holds D constant.
        const bool clamped = !(kept_sum > Scalar(1e-9));
        const Scalar denom = clamped ? Scalar(1e-9) : kept_sum;
        const Scalar mixed = clamped ? Scalar(0) : d_w.dot(a.route.weights.row(r).transpose());
        for (Index s = 0; s < hard; ++s)
          d_probs_(r, (s / k) * M + a.route.experts(r, s)) += (d_w(s) - mixed) / denom;
      }
    } else if (attn_.variant == GqeVariant::weighted_concat) {
      for (Index r = 0; r < R; ++r)
        for (Index s = 0; s < hard; ++s) {
          const Index e = (s / k) * M + a.route.experts(r, s);
          d_probs_(r, e) += d_cat_.row(r).segment(s * dh, dh).dot(a.o.row(r).segment(s * dh, dh));
          d_o_.row(r).segment(s * dh, dh) *= a.route.probs(r, e);
        }
    }
    // Load balancing: d/dp[r, g, m] of aux_coef * (M / G) * sum f P, with P the mean over R rows.
    if (aux_coef_ != 0)
      for (Index e = 0; e < G * M; ++e)
        d_probs_.col(e).array() += static_cast<Scalar>(aux_coef_ * static_cast<double>(M) / static_cast<double>(G) *
                                                      a.load(e) / static_cast<double>(R));
    // Softmax inside each group: dz = p * (dp - sum_m p dp).
    d_logits_.resize(R, G * M);
    for (Index r = 0; r < R; ++r)
      for (Index grp = 0; grp < G; ++grp) {
        const auto pr = a.route.probs.row(r).segment(grp * M, M);
        const auto dp = d_probs_.row(r).segment(grp * M, M);
        d_logits_.row(r).segment(grp * M, M) = pr.cwiseProduct(dp).array() - pr.dot(dp) * pr.array();
      }

    attention_backward(entries_, dh, scale());
    if (attn_.has_shared_head())
      for (Index grp = 0; grp < G; ++grp) {
        d_k_.middleCols(grp * dh, dh) += d_mk_ / Scalar(G);
        d_v_.middleCols(grp * dh, dh) += d_mv_ / Scalar(G);
      }
    apply_rope<Scalar>(d_q_, dh, rope_inverse_);
    apply_rope<Scalar>(d_k_, dh, rope_inverse_);

    linear_backward<Scalar>(a.xn, p.k_proj, d_k_, dx_, false, g.k_proj);
    linear_backward<Scalar>(a.xn, p.v_proj, d_v_, dx_, true, g.v_proj);
    if (attn_.has_shared_head()) linear_backward<Scalar>(a.xn, p.q_shared, d_q_.rightCols(dh), dx_, true, g.q_shared);
    linear_backward<Scalar>(a.xn, p.router.weight(), d_logits_, dx_, true, g.router.weight());

    // Kept experts' queries: per expert, gather its rows' x and d q; dWq_e += dQ_e^T X_e and
    // dX_e = dQ_e Wq_e, scattered back to the rows in a fixed order afterwards.
    expert_dx_.resize(static_cast<std::size_t>(G * M));
    thread_pool().parallel_for(G * M, [&](Index e) {
      const ExpertRows& rows = experts_[static_cast<std::size_t>(e)];
      const Index n = static_cast<Index>(rows.rows.size());
      Matrix<Scalar>& dx_e = expert_dx_[static_cast<std::size_t>(e)];
      dx_e.resize(n, d);
      if (n == 0) return;
      Matrix<Scalar> gathered(n, d), d_query(n, dh);
      const Index grp = e / M;
      for (Index i = 0; i < n; ++i) {
        const Index r = rows.rows[static_cast<std::size_t>(i)];
        gathered.row(i) = a.xn.row(r);
        d_query.row(i) = d_q_.row(r).segment((grp * k + rows.slots[static_cast<std::size_t>(i)]) * dh, dh);
      }
      g.q_proj.middleRows(e * dh, dh).noalias() += d_query.transpose() * gathered;
      dx_e.noalias() = d_query * p.q_proj.middleRows(e * dh, dh);
    }, 4.0 * static_cast<double>(R * hard * d * dh));
    for (Index e = 0; e < G * M; ++e) {
      const ExpertRows& rows = experts_[static_cast<std::size_t>(e)];
      for (std::size_t i = 0; i < rows.rows.size(); ++i)
        dx_.row(rows.rows[i]) += expert_dx_[static_cast<std::size_t>(e)].row(static_cast<Index>(i));
    }
  }

  ModelConfig config_;
  AttentionConfig attn_;
  Index B_ = 0, T_ = 0;
  double aux_coef_ = 0, counted_ = 0;
  bool ready_ = false;
  std::vector<std::int32_t> tokens_, targets_;
  std::vector<float> weights_;
  std::vector<Index> positions_;
  RopeTable<Scalar> rope_, rope_inverse_;
  std::vector<LayerActivations> layers_;
  Matrix<Scalar> hidden_, delta_;  // [R, d]: the residual stream (forward), its gradient (backward)
  Matrix<Scalar> h_final_, x_final_;  // [R, d]
  Vector<Scalar> inv_final_;          // [R]
  Matrix<Scalar> logits_;             // [R, V]
  // Backward buffers.
  Matrix<Scalar> dx_;                 // [R, d]
  Matrix<Scalar> d_act_, d_up_;       // [R, I]
  Matrix<Scalar> d_cat_;              // [R, S*d_h]
  Matrix<Scalar> d_o_, d_q_;          // [R, H*d_h]
  Matrix<Scalar> d_k_, d_v_;          // [R, G*d_h]
  Matrix<Scalar> d_mk_, d_mv_;        // [R, d_h]
  Matrix<Scalar> d_probs_, d_logits_; // [R, G*M]
  std::vector<TrainHead<Scalar>> entries_;
  std::vector<ExpertRows> experts_;
  std::vector<Matrix<Scalar>> expert_dx_;
};

}  // namespace gqe::training
