// Training: every backward pass against central finite differences in double (the ops one by one,
// then whole GQA and GQE models in all three variants with k = 1 and k = M, tied and untied, through
// the layers' own backward passes), the training forward (the model's forward with a tape) equal to
// inference bit for bit, hard_concat's router getting gradient from
// the load-balancing loss alone, the optimiser and schedule, the data generators, determinism
// across thread counts, and resume: N steps straight equal k steps, save, load, N - k steps.
#include <gtest/gtest.h>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "gqe/training.hpp"
#include "support.hpp"

namespace {

using gqe::Index;
using gqe::training::Rng;
using MatD = gqe::Matrix<double>;
using VecD = gqe::Vector<double>;

MatD random_matrix(Index rows, Index cols, Rng& rng, double sigma = 1.0) {
  MatD m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = sigma * rng.normal();
  return m;
}

// Central difference of f with respect to every entry of x (restored afterwards).
template <class F>
std::vector<double> numeric_gradient(double* x, Index n, F&& f, double h = 1e-6) {
  std::vector<double> g(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = f();
    x[i] = keep - h;
    const double down = f();
    x[i] = keep;
    g[static_cast<std::size_t>(i)] = (up - down) / (2 * h);
  }
  return g;
}

// ||analytic - numeric|| <= tol * max(||numeric||, floor): norm-wise over a whole tensor.
void expect_close(const std::string& what, const double* analytic, const std::vector<double>& numeric, double tol = 1e-6,
                  double floor = 1e-8) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < numeric.size(); ++i) {
    diff += (analytic[i] - numeric[i]) * (analytic[i] - numeric[i]);
    norm += numeric[i] * numeric[i];
  }
  diff = std::sqrt(diff);
  norm = std::sqrt(norm);
  EXPECT_LE(diff, tol * std::max(norm, floor)) << what << ": |analytic - numeric| = " << diff << ", |numeric| = " << norm;
}

// ---- ops ----------------------------------------------------------------------------------------

TEST(TrainingOps, LinearBackwardMatchesFiniteDifferences) {
  Rng rng(1);
  // Sizes past the tiles (256 rows, 64 output features) so that several units run.
  MatD x = random_matrix(300, 7, rng), w = random_matrix(70, 7, rng), probe = random_matrix(300, 70, rng);
  const auto loss = [&] {
    MatD y(300, 70);
    gqe::linear<double>(x, w, y);
    return (y.array() * probe.array()).sum();
  };
  MatD dx(300, 7), dw = MatD::Zero(70, 7);
  const gqe::WeightMatrix wm{w.data(), gqe::DType::F64, 7};
  gqe::linear_backward<double>(x, wm, probe, dx, false, dw);
  expect_close("dx", dx.data(), numeric_gradient(x.data(), x.size(), loss));
  expect_close("dw", dw.data(), numeric_gradient(w.data(), w.size(), loss));
  // Accumulation: a second call adds the same again.
  MatD dx2 = dx;
  MatD dw2 = dw;
  gqe::linear_backward<double>(x, wm, probe, dx2, true, dw2);
  EXPECT_LE((dx2 - 2 * dx).norm(), 1e-12 * dx.norm());
  EXPECT_LE((dw2 - 2 * dw).norm(), 1e-12 * dw.norm());
}

TEST(TrainingOps, RmsNormBackwardMatchesFiniteDifferences) {
  Rng rng(2);
  MatD x = random_matrix(5, 9, rng), probe = random_matrix(5, 9, rng);
  VecD w = VecD::Ones(9) + 0.3 * random_matrix(9, 1, rng);
  const double eps = 1e-5;
  const auto loss = [&] {
    MatD y(5, 9);
    gqe::rms_norm<double>(x, w.data(), eps, y);
    return (y.array() * probe.array()).sum();
  };
  VecD inv(5);
  MatD y(5, 9);
  gqe::rms_norm<double>(x, w.data(), eps, y, inv.data());
  MatD dx(5, 9);
  VecD dw = VecD::Zero(9);
  gqe::rms_norm_backward<double>(x, w.data(), inv.data(), probe, dx, false, dw.data());
  expect_close("dx", dx.data(), numeric_gradient(x.data(), x.size(), loss));
  expect_close("dweight", dw.data(), numeric_gradient(w.data(), w.size(), loss));
}

TEST(TrainingOps, RopeBackwardIsTheInverseRotation) {
  Rng rng(3);
  const Index rows = 6, dh = 8, heads = 3;
  std::vector<Index> positions = {0, 1, 5, 17, 100, 4095};
  gqe::RopeTable<double> table;
  table.compute(positions, dh, 10000.0);
  MatD x = random_matrix(rows, heads * dh, rng), probe = random_matrix(rows, heads * dh, rng);
  const auto loss = [&] {
    MatD y = x;
    gqe::apply_rope<double>(y, dh, table);
    return (y.array() * probe.array()).sum();
  };
  MatD dx = probe;
  gqe::apply_rope<double>(dx, dh, table.inverse());
  expect_close("dx", dx.data(), numeric_gradient(x.data(), x.size(), loss));
}

TEST(TrainingOps, CrossEntropyGradientAndMask) {
  Rng rng(4);
  MatD logits = random_matrix(6, 5, rng);
  const std::vector<std::int32_t> targets = {0, 4, 2, 3, 1, 1};
  const std::vector<float> weights = {1, 0, 1, 1, 0, 1};
  const auto loss = [&] {
    MatD copy = logits;
    return gqe::cross_entropy<double>(copy, targets, weights, 0).loss / 4.0;
  };
  MatD grad = logits;
  const auto sums = gqe::cross_entropy<double>(grad, targets, weights, 0.25);
  EXPECT_EQ(sums.weight, 4.0);
  // The reference: -log softmax of the target, summed over counted rows.
  double want = 0;
  for (Index r = 0; r < 6; ++r)
    if (weights[static_cast<std::size_t>(r)] > 0)
      want += std::log(logits.row(r).array().exp().sum()) - logits(r, targets[static_cast<std::size_t>(r)]);
  EXPECT_NEAR(sums.loss, want, 1e-12);
  expect_close("dlogits", grad.data(), numeric_gradient(logits.data(), logits.size(), loss));
  EXPECT_EQ(grad.row(1).norm(), 0.0);
  // A counted row's target outside [0, V), a negative or NaN weight, or a row without its target and
  // weight is refused; an uncounted row's target is never read.
  std::vector<std::int32_t> bad_targets = targets;
  bad_targets[1] = 5;
  MatD copy = logits;
  EXPECT_NO_THROW(gqe::cross_entropy<double>(copy, bad_targets, weights, 0));
  bad_targets[2] = 5;
  EXPECT_THROW(gqe::cross_entropy<double>(copy, bad_targets, weights, 0), gqe::InputError);
  bad_targets[2] = -1;
  EXPECT_THROW(gqe::cross_entropy<double>(copy, bad_targets, weights, 0), gqe::InputError);
  for (const float w : {-1.0f, std::nanf("")}) {
    std::vector<float> bad_weights = weights;
    bad_weights[3] = w;
    EXPECT_THROW(gqe::cross_entropy<double>(copy, targets, bad_weights, 0), gqe::InputError) << w;
  }
  const std::vector<std::int32_t> short_targets(targets.begin(), targets.end() - 1);
  EXPECT_THROW(gqe::cross_entropy<double>(copy, short_targets, weights, 0), gqe::ShapeError);
  EXPECT_EQ(copy, logits);  // nothing refused wrote the logits
}

// Attention over several query and key tiles, with GQA-like heads sharing K/V, against finite
// differences of sum(probe * out); the forward and its log-sum-exp against a plain softmax reference.
TEST(TrainingOps, AttentionBackwardMatchesFiniteDifferences) {
  Rng rng(5);
  const Index T = 300, dh = 4, heads = 2;  // 300 > the 128-query and 256-key tiles
  MatD q = random_matrix(T, heads * dh, rng), k = random_matrix(T, dh, rng), v = random_matrix(T, dh, rng);
  const MatD probe = random_matrix(T, heads * dh, rng);
  const double scale = 1.0 / std::sqrt(double(dh));
  MatD out(T, heads * dh), lse(T, heads), d_q(T, heads * dh), d_k(T, dh), d_v(T, dh);
  gqe::AttentionConfig one_head;
  one_head.num_kv_heads = 1;
  one_head.head_dim = dh;
  gqe::AttentionCache<double> cache(one_head);
  cache.reserve(T);
  const auto group = [&] {
    for (Index t = 0; t < T; ++t) cache.write(t, k.row(t).data(), v.row(t).data());  // K and V as they are now
    gqe::QueryGroup<double> g;
    g.query = q.data();
    g.query_stride = q.cols();
    g.kv = cache.head(0);
    g.out = out.data();
    g.out_stride = out.cols();
    g.lse = lse.data();
    g.lse_stride = heads;
    g.count = T;
    g.heads = heads;
    return std::vector<gqe::QueryGroup<double>>{g};
  };
  const auto loss = [&] {
    gqe::causal_attention(group(), dh, scale);
    return (out.array() * probe.array()).sum();
  };
  loss();
  // Reference forward and log-sum-exp.
  double err = 0;
  for (Index h = 0; h < heads; ++h)
    for (Index t = 0; t < T; ++t) {
      VecD s = (k.topRows(t + 1) * q.row(t).segment(h * dh, dh).transpose()) * scale;
      const double m = s.maxCoeff();
      const double l = m + std::log((s.array() - m).exp().sum());
      err = std::max(err, std::abs(l - lse(t, h)));
      VecD p = (s.array() - l).exp();
      const VecD o = v.topRows(t + 1).transpose() * p;
      err = std::max(err, (o.transpose() - out.row(t).segment(h * dh, dh)).norm());
    }
  EXPECT_LT(err, 1e-12);
  const std::vector<gqe::QueryGroupGrad<double>> grads = {{probe.data(), d_q.data(), d_k.data(), d_v.data(), dh}};
  gqe::causal_attention_backward(group(), grads, dh, scale);
  const MatD dq = d_q, dk = d_k, dv = d_v;
  expect_close("dq", dq.data(), numeric_gradient(q.data(), q.size(), loss));
  expect_close("dk", dk.data(), numeric_gradient(k.data(), k.size(), loss));
  expect_close("dv", dv.data(), numeric_gradient(v.data(), v.size(), loss));
}

// ---- whole models -------------------------------------------------------------------------------

gqe::ModelConfig tiny_config(gqe::AttentionType type, gqe::GqeVariant variant, Index top_k, bool tied) {
  gqe::ModelConfig c;
  c.attention_type = type;
  c.gqe_variant = variant;
  c.vocab_size = 11;
  c.hidden_size = 12;
  c.intermediate_size = 10;
  c.num_layers = 2;
  c.num_heads = 6;
  c.num_kv_heads = 2;  // M = 3
  c.head_dim = 4;
  c.top_k = top_k;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = tied;
  c.max_position_embeddings = 64;
  return c;
}

// A model of random weights (a random router too, so that routing varies and no two logits of a
// group are close enough for a finite difference to swap them), gradients attached.
template <class Scalar = double>
gqe::Transformer<Scalar> random_model(const gqe::ModelConfig& c, std::uint64_t seed) {
  gqe::Transformer<Scalar> model(c);
  Rng rng(seed);
  model.for_each_parameter([&](const std::string& name, gqe::Weight& w) {
    const bool norm = w.shape().rank() == 1;
    const double sigma = norm ? 0.2 : (name.find("router") != std::string::npos ? 1.0 : 0.5);
    Scalar* data = w.allocate<Scalar>();
    for (Index i = 0; i < w.numel(); ++i) data[i] = static_cast<Scalar>((norm ? 1.0 : 0.0) + sigma * rng.normal());
  });
  gqe::training::attach_gradients(model);
  return model;
}

// The gradient of the weight `name` (as a matrix), from a model with gradients attached.
MatD grad_of(const gqe::Transformer<double>& model, const std::string& name) {
  MatD g;
  model.for_each_parameter([&](const std::string& n, const gqe::Weight& w) {
    if (n == name) g = w.grad_matrix<double>();
  });
  return g;
}

gqe::training::Batch random_batch(const gqe::ModelConfig& c, Index B, Index T, std::uint64_t seed) {
  gqe::training::Batch b;
  b.resize(B, T);
  Rng rng(seed);
  for (Index i = 0; i < B * T; ++i) {
    b.tokens[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
    b.targets[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
    b.weights[static_cast<std::size_t>(i)] = rng.uniform() < 0.7 ? 1.0f : 0.0f;
  }
  b.weights[0] = 1.0f;
  return b;
}

// Every parameter's gradient against central differences of the total loss.
void check_model_gradient(const gqe::ModelConfig& c, double aux_coef, std::uint64_t seed, Index B = 2, Index T = 7) {
  auto model = random_model(c, seed);
  const auto batch = random_batch(c, B, T, seed + 100);
  gqe::training::LossAndGrad<double> graph;
  graph.forward(model, batch, aux_coef);
  graph.backward(model);
  const auto loss = [&] { return graph.forward(model, batch, aux_coef).loss; };
  model.for_each_parameter([&](const std::string& name, gqe::Weight& w) {
    expect_close(name, w.grad<double>(), numeric_gradient(w.mutable_data<double>(), w.numel(), loss, 1e-5), 1e-6);
  });
}

struct ModelCase {
  const char* name;
  gqe::AttentionType type;
  gqe::GqeVariant variant;
  Index top_k;
  bool tied;
};

class ModelGradient : public ::testing::TestWithParam<ModelCase> {};

TEST_P(ModelGradient, MatchesFiniteDifferences) {
  const ModelCase& m = GetParam();
  check_model_gradient(tiny_config(m.type, m.variant, m.top_k, m.tied), 0.01, 7);
}

const ModelCase kModelCases[] = {
    {"gqa", gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, false},
    {"gqa_tied", gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, true},
    {"gqe_k1", gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, false},
    {"gqe_k2", gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 2, false},
    {"gqe_kM", gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 3, false},
    {"gqe_k1_tied", gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, true},
    {"hard_concat_k1", gqe::AttentionType::gqe, gqe::GqeVariant::hard_concat, 1, false},
    {"hard_concat_kM", gqe::AttentionType::gqe, gqe::GqeVariant::hard_concat, 3, false},
    {"weighted_concat_k1", gqe::AttentionType::gqe, gqe::GqeVariant::weighted_concat, 1, false},
    {"weighted_concat_kM", gqe::AttentionType::gqe, gqe::GqeVariant::weighted_concat, 3, false},
};
INSTANTIATE_TEST_SUITE_P(Training, ModelGradient, ::testing::ValuesIn(kModelCases),
                         [](const auto& info) { return std::string(info.param.name); });

// A batch runs in lanes of consecutive sequences (LossAndGrad::kMaxLanes of them at most), each
// with gradients of its own, added up afterwards; the load-balancing loss still spans the whole
// batch. 18 sequences: lanes of one and of two sequences, and a large coefficient so that a
// per-lane f or token count would show.
TEST(TrainingModel, GradientOfABatchLargerThanTheLanes) {
  static_assert(gqe::training::LossAndGrad<double>::kMaxLanes < 18);
  check_model_gradient(tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, false), 0.5, 31, 18, 3);
  check_model_gradient(tiny_config(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, true), 0.0, 32, 18, 3);
}

// One LossAndGrad serves any model: its lanes follow the model's config, not only its shapes
// (hard_concat and weighted_concat have the same weights but not the same backward).
TEST(TrainingModel, OneLossAndGradServesModelsOfAnotherConfig) {
  const auto hard = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::hard_concat, 1, false);
  const auto soft = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::weighted_concat, 1, false);
  const auto batch = random_batch(soft, 3, 5, 41);
  auto first = random_model(hard, 40), reused = random_model(soft, 40), fresh = random_model(soft, 40);
  gqe::training::LossAndGrad<double> graph, own;
  graph.forward(first, batch, 0.01);
  graph.backward(first);
  graph.forward(reused, batch, 0.01);
  graph.backward(reused);
  own.forward(fresh, batch, 0.01);
  own.backward(fresh);
  fresh.for_each_parameter([&](const std::string& name, const gqe::Weight& w) {
    EXPECT_TRUE((grad_of(reused, name).array() == w.grad_matrix<double>().array()).all()) << name;
  });
  // A model whose caches have another shape (three KV heads, dense): the caches are made anew.
  auto wide = tiny_config(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, false);
  wide.num_kv_heads = 3;
  auto other = random_model(wide, 42), other_fresh = random_model(wide, 42);
  graph.forward(other, batch, 0.01);
  graph.backward(other);
  gqe::training::LossAndGrad<double> other_own;
  other_own.forward(other_fresh, batch, 0.01);
  other_own.backward(other_fresh);
  other_fresh.for_each_parameter([&](const std::string& name, const gqe::Weight& w) {
    EXPECT_TRUE((grad_of(other, name).array() == w.grad_matrix<double>().array()).all()) << name;
  });
}

// call() must throw a gqe::Error whose message contains `says`; `what` names the case.
void refused(const char* what, const std::function<void()>& call, const std::string& says) {
  try {
    call();
    ADD_FAILURE() << what << ": accepted";
  } catch (const gqe::Error& e) {
    EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << what << ": " << e.what();
  }
}

// Public entry points misused as a hand-written loop might: each refusal a gqe::Error, never a
// crash or a silent result (the debug asserts behind them are for the library's own invariants).
TEST(TrainingModel, MisuseOfThePublicEntryPointsIsRefused) {
  using gqe::training::LossAndGrad;
  const auto c = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, false);
  const auto batch = random_batch(c, 2, 5, 3);
  // Weights without gradients (initialised only).
  gqe::Transformer<double> bare(c);
  bare.allocate_weights();
  LossAndGrad<double> graph;
  graph.forward(bare, batch, 0.01);
  refused("backward", [&] { graph.backward(bare); }, "has no gradient; expected attach_gradients");
  refused("zero_gradients", [&] { gqe::training::zero_gradients(bare); }, "has no gradient");
  refused("global_norm", [&] { gqe::training::global_norm(bare); }, "has no gradient");
  gqe::training::AdamW<double> bare_adam(bare, gqe::training::OptimizerConfig{});
  refused("AdamW::update", [&] { bare_adam.update(bare, 1e-3); }, "has no gradient");
  // backward() and the optimiser given another model than their own.
  auto model = random_model(c, 4), wider = random_model(tiny_config(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, true), 4);
  graph.forward(model, batch, 0.01);
  refused("backward of another model", [&] { graph.backward(wider); }, "another model than the last forward()");
  graph.backward(model);  // the forward's own model still goes through
  gqe::training::AdamW<double> adam(model, gqe::training::OptimizerConfig{});
  refused("AdamW of another model", [&] { adam.update(wider, 1e-3); }, "expected the model it was made for");
  refused("AdamW made for nothing", [&] { gqe::training::AdamW<double>{}.update(model, 1e-3); }, "expected the model it was made for");
  refused("AdamW lr NaN", [&] { adam.update(model, std::nan("")); }, "learning rate is nan");
  refused("AdamW moments of no parameter", [&] { adam.exp_avg(999); }, "no parameter 999");
  EXPECT_EQ(adam.step(), 0);  // nothing refused moved it
  // A default TextData holds nothing to draw from.
  gqe::training::Batch out;
  refused("TextData{} train", [&] { gqe::training::TextData{}.train_batch(1, 0, 0, out); }, "holds no text");
  refused("TextData{} held out", [&] { gqe::training::TextData{}.heldout_batch(1, 0, out); }, "holds no text");
  refused("TextData{} windows", [&] { gqe::training::TextData{}.heldout_windows(); }, "holds no text");
  // Schedule and clipping outside their ranges.
  refused("learning rate of step -1", [&] { gqe::training::learning_rate(gqe::training::OptimizerConfig{}, -1); },
          "expected a step >= 0");
  refused("clip norm NaN", [&] { gqe::training::clip_global_norm(model, std::nan("")); }, "clip norm is nan");
  refused("clip norm -1", [&] { gqe::training::clip_global_norm(model, -1.0); }, "clip norm is -1");
}

// Inference objects used directly: unbound weights, shapes and ranges are refused with gqe::Error.
TEST(TrainingModel, MisuseOfTheInferenceObjectsIsRefused) {
  const auto c = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, false);
  const std::vector<std::int32_t> ids = {1, 2, 3};
  // Every weight given storage but one: lm_head, the router, the shared query head in turn.
  for (const std::string left_out : {"lm_head.weight", "model.layers.1.self_attn.router.weight", "model.layers.0.self_attn.q_shared.weight"}) {
    gqe::Transformer<float> model(c);
    model.for_each_parameter([&](const std::string& name, gqe::Weight& w) {
      if (name != left_out) std::fill_n(w.allocate<float>(), w.numel(), 0.0f);
    });
    std::vector<gqe::KVCache<float>> caches{model.new_cache()};
    refused(left_out.c_str(), [&] { model.prefill({ids.data(), gqe::Shape{1, 3}}, caches); }, "not loaded");
    refused("save without values", [&] { gqe::save_checkpoint(model, std::filesystem::temp_directory_path() / "gqe-never-made"); },
            "has no values");
    EXPECT_FALSE(std::filesystem::exists(std::filesystem::temp_directory_path() / "gqe-never-made"));
  }
  // The router alone, on rows of another width.
  gqe::Router<float> router(c.attention());
  std::fill_n(router.weight().allocate<float>(), router.weight().numel(), 0.0f);
  gqe::Routing<float> routing;
  refused("router width", [&] { router.route(gqe::Matrix<float>::Zero(2, c.hidden_size + 1), routing); }, "expected hidden_size = 12");
  router.route(gqe::Matrix<float>::Zero(2, c.hidden_size), routing);
  gqe::RoutingStats stats;
  stats.add(routing);
  gqe::Routing<float> other = routing;
  other.experts_per_group = 2;
  refused("stats of two shapes", [&] { stats.add(other); }, "expected one layer's shape");
  // Caches: a negative truncation, a layer or position that does not exist.
  const auto model = random_model<float>(c, 8);
  std::vector<gqe::KVCache<float>> caches{model.new_cache()};
  model.prefill({ids.data(), gqe::Shape{1, 3}}, caches);
  refused("truncate(-2)", [&] { caches[0].truncate(-2); }, "expected 0 or more");
  refused("layer 5", [&] { caches[0].layer(5); }, "layer 5 does not exist");
  std::vector<float> k(4), v(4);
  refused("read head 9", [&] { caches[0].layer(0).read(9, 0, k.data(), v.data()); }, "no KV head 9");
  refused("read past the tiles", [&] { caches[0].layer(0).read(0, 1 << 20, k.data(), v.data()); }, "at position 1048576");
  refused("layer truncate past length", [&] { caches[0].layer(0).truncate(4); }, "expected 0 to 3");
  refused("commit past the tiles", [&] { caches[0].layer(0).advance(1 << 20); }, "cannot commit 1048576 positions");
  refused("commit a negative count", [&] { caches[0].layer(0).advance(-1); }, "cannot commit -1 positions");
  EXPECT_THROW(caches[0].reserve(std::numeric_limits<Index>::max()), std::bad_alloc);
  EXPECT_EQ(caches[0].length(), 3);
  // A layer given another length than the others (through layer()): the next call is refused.
  caches[0].layer(1).clear();
  const std::int32_t next = 4;
  refused("layers of two lengths", [&] { model.decode({&next, gqe::Shape{1}}, caches); },
          "holds 0 positions in layer 1 but 3 in layer 0");
  // A cache of a model whose caches have the same shape but whose keys carry another RoPE.
  gqe::ModelConfig other_rope = c;
  other_rope.rope_theta = 5e5;
  std::vector<gqe::KVCache<float>> other_caches{gqe::KVCache<float>(other_rope)};
  refused("a cache of another config", [&] { model.prefill({ids.data(), gqe::Shape{1, 3}}, other_caches); },
          "KV cache 0 was made for a model of another configuration");
  gqe::ModelConfig broken = c;
  broken.num_layers = -1;
  refused("a cache of a bad config", [&] { gqe::KVCache<float>{broken}; }, "num_hidden_layers is -1");
}

// Transformer::backward takes a tape only as a forward left it: filled (by a training forward:
// empty caches, every row's logits), of a model of this config, its caches unchanged, with
// d_logits of its rows. A tape moved after its forward still serves, to the same bits.
TEST(TrainingModel, TapesAreCheckedAndMayMove) {
  const auto c = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 2, false);
  const Index T = 5, V = c.vocab_size;
  auto model = random_model(c, 50);
  const std::vector<std::int32_t> ids = {1, 4, 2, 8, 5}, other_ids = {3, 9, 7};
  const gqe::TensorView<const std::int32_t> tokens(ids.data(), gqe::Shape{1, T}), other_tokens(other_ids.data(), gqe::Shape{1, 3});
  gqe::Tensor<double> logits(gqe::Shape{1, T, V}), other_logits(gqe::Shape{1, 3, V}), last(gqe::Shape{1, V});
  Rng rng(51);
  const MatD d_logits = random_matrix(T, V, rng);
  const auto filled = [&](std::vector<gqe::KVCache<double>>& caches, gqe::ModelTape<double>& tape) {
    caches.assign(1, model.new_cache());
    model.forward(tokens, caches, logits, false, nullptr, &tape);
  };
  const auto gradients = [&] {
    std::vector<MatD> out;
    model.for_each_parameter([&](const std::string&, const gqe::Weight& w) { out.push_back(w.grad_matrix<double>()); });
    return out;
  };

  gqe::training::zero_gradients(model);
  std::vector<gqe::KVCache<double>> caches;
  gqe::ModelTape<double> tape;
  filled(caches, tape);
  model.backward(tape, d_logits, 0.01);
  const std::vector<MatD> want = gradients();

  gqe::ModelTape<double> unfilled;
  refused("a tape no forward filled", [&] { model.backward(unfilled, d_logits, 0.01); }, "no forward filled");
  refused("d_logits of other rows", [&] { model.backward(tape, d_logits.topRows(3), 0.01); }, "expected [5, 11]");
  auto dense = random_model(tiny_config(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, false), 52);
  refused("another model's tape", [&] { dense.backward(tape, d_logits, 0.01); }, "another configuration");
  refused("last_only with a tape", [&] { model.forward(tokens, caches, last, true, nullptr, &unfilled); }, "last_only = false");
  std::vector<gqe::KVCache<double>> started{model.new_cache()};
  model.forward(other_tokens, started, other_logits);
  refused("a tape over a started cache", [&] { model.forward(tokens, started, logits, false, nullptr, &unfilled); },
          "expected empty caches");
  EXPECT_EQ(started[0].length(), 3);  // rolled back
  EXPECT_EQ(unfilled.rows, 0);
  caches[0].clear();
  refused("caches changed since the forward", [&] { model.backward(tape, d_logits, 0.01); }, "as the forward left them");

  // Moved, and the moved-from tape filled again by another forward: the same gradients.
  gqe::training::zero_gradients(model);
  filled(caches, tape);
  gqe::ModelTape<double> moved = std::move(tape);
  std::vector<gqe::KVCache<double>> other_caches{model.new_cache()};
  model.forward(other_tokens, other_caches, other_logits, false, nullptr, &tape);
  model.backward(moved, d_logits, 0.01);
  const std::vector<MatD> got = gradients();
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_TRUE((got[i].array() == want[i].array()).all()) << "parameter " << i;
}

// hard_concat: the hard slots give the router nothing, so its gradient is the load-balancing
// loss's alone: zero with coefficient 0, and with coefficient c exactly c times that of c = 1.
TEST(TrainingModel, HardConcatRouterLearnsFromTheAuxLossOnly) {
  const auto c = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::hard_concat, 1, false);
  auto model = random_model(c, 9);
  const auto batch = random_batch(c, 2, 7, 10);
  gqe::training::LossAndGrad<double> graph;
  const auto router_grads = [&](double coef) {
    gqe::training::zero_gradients(model);
    graph.forward(model, batch, coef);
    graph.backward(model);
    std::vector<MatD> out;
    for (Index l = 0; l < c.num_layers; ++l)
      out.push_back(grad_of(model, "model.layers." + std::to_string(l) + ".self_attn.router.weight"));
    return out;
  };
  const auto zero = router_grads(0.0), one = router_grads(1.0), some = router_grads(0.01);
  for (std::size_t l = 0; l < zero.size(); ++l) {
    EXPECT_EQ(zero[l].norm(), 0.0) << "layer " << l;
    EXPECT_GT(one[l].norm(), 0.0) << "layer " << l;
    EXPECT_LE((some[l] - 0.01 * one[l]).norm(), 1e-12 * one[l].norm()) << "layer " << l;
  }
  // And the variant gqe's router does learn from the language-model loss.
  const auto cg = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, false);
  auto mg = random_model(cg, 9);
  gqe::training::LossAndGrad<double> gg;
  gg.forward(mg, batch, 0.0);
  gg.backward(mg);
  EXPECT_GT(grad_of(mg, "model.layers.0.self_attn.router.weight").norm(), 0.0);
}

}  // namespace

// An expert that no token keeps gets exactly zero gradient: with a zero router every logit of a
// group ties and every token keeps expert 0 (ties go to the lower index), so q_proj's rows of the
// other experts receive nothing, while the router still learns through the weighted slot.
TEST(TrainingModel, UnkeptExpertsGetNoGradient) {
  const auto c = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, false);
  auto model = random_model(c, 12);
  model.for_each_parameter([](const std::string& name, gqe::Weight& w) {
    if (name.find("router") != std::string::npos) gqe::testing::matrix_of<double>(w).setZero();
  });
  const auto batch = random_batch(c, 2, 7, 13);
  gqe::training::LossAndGrad<double> graph;
  graph.forward(model, batch, 0.01);
  graph.backward(model);
  const Index M = 3, dh = c.head_dim;
  for (Index l = 0; l < c.num_layers; ++l) {
    const std::string layer = "model.layers." + std::to_string(l) + ".self_attn.";
    const MatD q = grad_of(model, layer + "q_proj.weight");
    for (Index e = 0; e < c.num_heads; ++e) {
      const double norm = q.middleRows(e * dh, dh).norm();
      if (e % M == 0)
        EXPECT_GT(norm, 0.0) << "layer " << l << " expert " << e;
      else
        EXPECT_EQ(norm, 0.0) << "layer " << l << " expert " << e;
    }
    EXPECT_GT(grad_of(model, layer + "router.weight").norm(), 0.0) << "layer " << l;
  }
}

// ---- the training forward against the inference model ------------------------------------------

namespace more {

// The training forward is the model's own forward with a tape: the same logits, bit for bit, as a
// prefill of the same batch.
template <class Scalar>
void check_forward_matches_transformer(gqe::AttentionType type, gqe::GqeVariant variant, Index k, bool tied) {
  auto c = tiny_config(type, variant, k, tied);
  c.max_position_embeddings = 200;
  auto model = random_model<Scalar>(c, 21);
  const Index B = 2, T = 137;  // past one query tile
  const auto batch = random_batch(c, B, T, 22);
  gqe::training::LossAndGrad<Scalar> graph;
  graph.forward(model, batch, 0.01);
  std::vector<gqe::KVCache<Scalar>> caches;
  for (Index b = 0; b < B; ++b) caches.push_back(model.new_cache());
  const gqe::TensorView<const std::int32_t> tokens(batch.tokens.data(), gqe::Shape{B, T});
  const auto logits = model.prefill(tokens, caches);
  const gqe::Matrix<Scalar> want = logits.view().matrix(B * T);
  EXPECT_TRUE((graph.logits().array() == want.array()).all());
}

}  // namespace more

TEST(TrainingModel, ForwardEqualsTheInferenceTransformer) {
  more::check_forward_matches_transformer<double>(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, false);
  more::check_forward_matches_transformer<float>(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, true);
  for (auto v : {gqe::GqeVariant::gqe, gqe::GqeVariant::hard_concat, gqe::GqeVariant::weighted_concat})
    for (Index k : {1, 3}) {
      more::check_forward_matches_transformer<double>(gqe::AttentionType::gqe, v, k, false);
      more::check_forward_matches_transformer<float>(gqe::AttentionType::gqe, v, k, false);
    }
}

// Training updates the model's own weights in place; a model whose weights it does not own (mapped
// from a checkpoint) is refused by name before any step.
TEST(TrainingModel, TrainsOnlyWeightsTheModelOwns) {
  const auto c = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, false);
  auto model = random_model(c, 5);
  Index count = 0;
  model.for_each_parameter([&](const std::string&, const gqe::Weight& w) { count += w.numel(); });
  EXPECT_EQ(count, c.parameter_count());
  const auto dir = std::filesystem::temp_directory_path() / "gqe_test_training_owned";
  gqe::save_checkpoint(model, dir, gqe::DType::F64);
  auto mapped = gqe::load_checkpoint<double>(dir);
  try {
    gqe::training::attach_gradients(mapped);
    ADD_FAILURE() << "attached gradients to borrowed weights";
  } catch (const gqe::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("borrowed"), std::string::npos) << e.what();
  }
  auto owned = gqe::load_checkpoint<double>(dir, gqe::LoadOptions{true, true, true});
  EXPECT_NO_THROW(gqe::training::attach_gradients(owned));
  std::filesystem::remove_all(dir);
}

TEST(TrainingModel, InitialisationIsTheAuthorsAndSeeded) {
  const auto c = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1, false);
  gqe::Transformer<float> a(c), b(c), other(c);
  gqe::training::initialize(a, 3);
  gqe::training::initialize(b, 3);
  gqe::training::initialize(other, 4);
  std::vector<gqe::TensorView<const float>> va, vb, vo;
  std::vector<std::string> names;
  a.for_each_parameter([&](const std::string& name, const gqe::Weight& w) {
    va.push_back(w.view<float>());
    names.push_back(name);
  });
  b.for_each_parameter([&](const std::string&, const gqe::Weight& w) { vb.push_back(w.view<float>()); });
  other.for_each_parameter([&](const std::string&, const gqe::Weight& w) { vo.push_back(w.view<float>()); });
  bool differs = false;
  for (std::size_t i = 0; i < va.size(); ++i) {
    EXPECT_EQ(va[i].flat(), vb[i].flat()) << names[i];
    differs = differs || va[i].flat() != vo[i].flat();
    if (names[i].find("router") != std::string::npos) {
      EXPECT_EQ(va[i].flat().norm(), 0.0f) << names[i];
    }
    if (va[i].rank() == 1) {
      EXPECT_EQ(va[i].flat(), gqe::Vector<float>::Ones(va[i].numel())) << names[i];
    }
    if (names[i].find("proj") != std::string::npos) {
      const double bound = std::sqrt(6.0 / static_cast<double>(va[i].dim(0) + va[i].dim(1)));
      EXPECT_LE(va[i].flat().cwiseAbs().maxCoeff(), bound) << names[i];
      EXPECT_GT(va[i].flat().cwiseAbs().maxCoeff(), 0.5 * bound) << names[i];
    }
  }
  EXPECT_TRUE(differs);
}

// ---- optimiser ------------------------------------------------------------------------------------

TEST(TrainingOptimizer, ScheduleWarmsUpThenDecays) {
  gqe::training::OptimizerConfig c;
  c.lr = 1.0;
  c.warmup_steps = 10;
  c.total_steps = 110;
  c.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(gqe::training::learning_rate(c, 0), 0.1);
  EXPECT_DOUBLE_EQ(gqe::training::learning_rate(c, 9), 1.0);
  EXPECT_NEAR(gqe::training::learning_rate(c, 10), 1.0, 1e-12);
  EXPECT_NEAR(gqe::training::learning_rate(c, 109), 0.1, 1e-12);
  for (Index s = 10; s < 109; ++s)
    EXPECT_GE(gqe::training::learning_rate(c, s), gqe::training::learning_rate(c, s + 1));
  c.schedule = gqe::training::Schedule::wsd;
  c.decay_fraction = 0.2;  // steps 88..109 decay
  EXPECT_DOUBLE_EQ(gqe::training::learning_rate(c, 50), 1.0);
  EXPECT_DOUBLE_EQ(gqe::training::learning_rate(c, 87), 1.0);
  EXPECT_LT(gqe::training::learning_rate(c, 90), 1.0);
  EXPECT_NEAR(gqe::training::learning_rate(c, 109), 0.1, 1e-12);
  c.warmup_steps = 200;
  EXPECT_THROW(c.validate(), gqe::ConfigError);
  EXPECT_THROW(gqe::training::schedule_from_string("linear"), gqe::ConfigError);
}

TEST(TrainingOptimizer, AdamWMatchesItsFormulaAndSkipsDecayOnNorms) {
  const auto c = tiny_config(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, false);
  gqe::training::OptimizerConfig oc;
  oc.weight_decay = 0.1;
  auto p = random_model(c, 30);
  const auto p0 = random_model(c, 30), g1 = random_model(c, 31), g2 = random_model(c, 32);
  gqe::training::AdamW<double> adam(p, oc);
  const auto views = [](const gqe::Transformer<double>& m) {
    std::vector<gqe::TensorView<const double>> v;
    m.for_each_parameter([&](const std::string&, const gqe::Weight& w) { v.push_back(w.view<double>()); });
    return v;
  };
  const auto p0v = views(p0), g1v = views(g1), g2v = views(g2);
  const auto set_grads = [&](const std::vector<gqe::TensorView<const double>>& g) {  // g's weights as p's gradient
    std::size_t i = 0;
    p.for_each_parameter([&](const std::string&, gqe::Weight& w) {
      std::copy_n(g[i++].data(), w.numel(), w.grad<double>());
    });
  };
  set_grads(g1v);
  adam.update(p, 0.01);
  set_grads(g2v);
  adam.update(p, 0.02);
  const auto pv = views(p);
  for (std::size_t t = 0; t < pv.size(); ++t)
    for (Index i = 0; i < pv[t].numel(); i += 7) {
      const double wd = pv[t].rank() == 2 ? 0.1 : 0.0;
      double x = p0v[t].data()[i], m = 0, v = 0;
      const double lrs[2] = {0.01, 0.02};
      const double gs[2] = {g1v[t].data()[i], g2v[t].data()[i]};
      for (int s = 0; s < 2; ++s) {
        x *= 1 - lrs[s] * wd;
        m = 0.9 * m + 0.1 * gs[s];
        v = 0.95 * v + 0.05 * gs[s] * gs[s];
        const double mh = m / (1 - std::pow(0.9, s + 1)), vh = v / (1 - std::pow(0.95, s + 1));
        x -= lrs[s] * mh / (std::sqrt(vh) + 1e-8);
      }
      EXPECT_NEAR(pv[t].data()[i], x, 1e-12);
    }
}

TEST(TrainingOptimizer, ClippingBoundsTheGlobalNorm) {
  const auto c = tiny_config(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, false);
  auto g = random_model(c, 40);
  g.for_each_parameter([](const std::string&, gqe::Weight& w) { std::copy_n(w.data<double>(), w.numel(), w.grad<double>()); });
  const double before = gqe::training::global_norm(g);
  ASSERT_GT(before, 1.0);
  EXPECT_DOUBLE_EQ(gqe::training::clip_global_norm(g, 1.0), before);
  EXPECT_NEAR(gqe::training::global_norm(g), 1.0, 1e-5);
  const auto grad0 = grad_of(g, "model.embed_tokens.weight");
  gqe::training::clip_global_norm(g, 5.0);  // already below: unchanged
  EXPECT_EQ(grad_of(g, "model.embed_tokens.weight"), grad0);
}

// ---- data ---------------------------------------------------------------------------------------

TEST(TrainingData, MqarQueriesEveryKeyOnceAndCountsOnlyThem) {
  gqe::training::MqarConfig c;
  c.vocab_size = 41;
  c.seq_len = 50;
  c.num_pairs = 8;
  gqe::training::Batch a, b;
  gqe::training::mqar_batch(c, 5, 7, 3, a);
  gqe::training::mqar_batch(c, 5, 7, 3, b);
  EXPECT_EQ(a.tokens, b.tokens);  // a pure function of (seed, index)
  gqe::training::mqar_batch(c, 5, 7, 4, b);
  EXPECT_NE(a.tokens, b.tokens);
  const Index K = c.num_keys();
  for (Index s = 0; s < 5; ++s) {
    std::map<std::int32_t, std::int32_t> value_of;
    for (Index i = 0; i < c.num_pairs; ++i) {
      const auto key = a.tokens[static_cast<std::size_t>(s * 50 + 2 * i)], value = a.tokens[static_cast<std::size_t>(s * 50 + 2 * i + 1)];
      EXPECT_TRUE(key >= 1 && key <= K);
      EXPECT_TRUE(value > K && value < 41);
      EXPECT_TRUE(value_of.emplace(key, value).second) << "keys are distinct";
      EXPECT_EQ(a.weights[static_cast<std::size_t>(s * 50 + 2 * i)], 0.0f);
    }
    std::map<std::int32_t, int> queried;
    for (Index t = 2 * c.num_pairs; t < 50; ++t) {
      const auto i = static_cast<std::size_t>(s * 50 + t);
      if (a.weights[i] > 0) {
        ++queried[a.tokens[i]];
        EXPECT_EQ(a.targets[i], value_of.at(a.tokens[i]));
      } else {
        EXPECT_EQ(a.tokens[i], 0);
      }
    }
    EXPECT_EQ(queried.size(), value_of.size());
    for (const auto& [key, n] : queried) EXPECT_EQ(n, 1) << key;
  }
  c.seq_len = 23;  // < 3 * 8
  EXPECT_THROW(gqe::training::mqar_batch(c, 1, 0, 0, a), gqe::ConfigError);
  c.seq_len = Index(1) << 40;  // past any model's positions: refused before a byte is allocated
  EXPECT_THROW(gqe::training::mqar_batch(c, 1, 0, 0, a), gqe::ConfigError);
  c.seq_len = 50;
  c.num_pairs = 21;  // > 20 keys
  EXPECT_THROW(c.validate(), gqe::ConfigError);
}

TEST(TrainingData, TextWindowsAndHeldOutTail) {
  const auto path = std::filesystem::temp_directory_path() / "gqe_test_training_text.txt";
  std::string text;
  for (int i = 0; i < 1000; ++i) text += static_cast<char>('a' + i % 26);
  std::ofstream(path, std::ios::binary) << text;
  gqe::training::TextData data(path, 16, 0.1);
  EXPECT_EQ(data.train_bytes(), 900);
  EXPECT_EQ(data.heldout_bytes(), 100);
  gqe::training::Batch b;
  data.train_batch(4, 1, 2, b);
  for (std::size_t i = 0; i < b.tokens.size(); ++i) {
    EXPECT_EQ((b.tokens[i] - 'a' + 1) % 26, b.targets[i] - 'a');
    EXPECT_EQ(b.weights[i], 1.0f);
  }
  data.heldout_batch(2, 0, b);
  EXPECT_EQ(b.tokens[0], static_cast<unsigned char>(text[900]));
  EXPECT_THROW(gqe::training::TextData(path, 200, 0.1), gqe::InputError);
  EXPECT_THROW(gqe::training::TextData(path.string() + ".missing", 16), gqe::IoError);
  // The size a refusal asks for is the least that fits: with sequence length 1 (windows of 2
  // bytes) and a tail of 10%, 20 bytes (2 held out), and 19 are too few.
  std::ofstream(path, std::ios::binary) << text.substr(0, 20);
  EXPECT_EQ(gqe::training::TextData(path, 1, 0.1).heldout_bytes(), 2);
  std::ofstream(path, std::ios::binary) << text.substr(0, 19);
  try {
    gqe::training::TextData(path, 1, 0.1);
    ADD_FAILURE() << "19 bytes were accepted";
  } catch (const gqe::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("needs at least 20 bytes"), std::string::npos) << e.what();
  }
  std::filesystem::remove(path);
}

// ---- runs: determinism and resume -----------------------------------------------------------------

gqe::training::RunConfig tiny_run(gqe::AttentionType type, Index steps) {
  gqe::training::RunConfig r;
  r.model = tiny_config(type, gqe::GqeVariant::gqe, 1, false);
  r.model.vocab_size = 21;
  r.mqar.vocab_size = 21;
  r.mqar.seq_len = 24;
  r.mqar.num_pairs = 4;
  r.seq_len = 24;
  r.batch = 3;
  r.optimizer.total_steps = steps;
  r.optimizer.warmup_steps = 2;
  r.eval_batches = 1;
  r.final_eval_batches = 2;
  r.seed = 11;
  return r;
}

template <class Scalar>
std::vector<std::vector<Scalar>> snapshot(const gqe::Transformer<Scalar>& model) {
  std::vector<std::vector<Scalar>> out;
  model.for_each_parameter([&](const std::string&, const gqe::Weight& w) {
    out.emplace_back(static_cast<std::size_t>(w.numel()));
    gqe::convert_values(w.raw(), w.dtype(), out.back().size(), out.back().data());
  });
  return out;
}

TEST(TrainingRun, ResumeContinuesBitIdentically) {
  const auto dir = std::filesystem::temp_directory_path() / "gqe_test_training_resume";
  std::filesystem::remove_all(dir);
  for (auto type : {gqe::AttentionType::gqa, gqe::AttentionType::gqe}) {
    const auto config = tiny_run(type, 7);
    gqe::training::Run<float> straight(config);
    ASSERT_TRUE(straight.train(dir / "straight", [] { return false; }, [](const auto&) {}));

    gqe::training::Run<float> first(config);
    int steps = 0;
    EXPECT_FALSE(first.train(dir / "split", [&] { return ++steps == 3; }, [](const auto&) {}));
    EXPECT_EQ(first.step(), 3);
    auto resumed = gqe::training::Run<float>::load(dir / "split");
    EXPECT_EQ(resumed.step(), 3);
    ASSERT_TRUE(resumed.train(dir / "split", [] { return false; }, [](const auto&) {}));
    EXPECT_EQ(snapshot(straight.model()), snapshot(resumed.model())) << gqe::to_string(type);
    ASSERT_EQ(straight.history().size(), resumed.history().size());
    EXPECT_EQ(straight.history().back().loss, resumed.history().back().loss);
    EXPECT_EQ(straight.final_eval().accuracy, resumed.final_eval().accuracy);
    // The saved checkpoint is one that the inference side loads, with the trained weights.
    EXPECT_EQ(snapshot(gqe::load_checkpoint<float>(dir / "split")), snapshot(straight.model()));
    // A finished run loads as finished.
    EXPECT_TRUE(gqe::training::Run<float>::load(dir / "split").finished());
    EXPECT_THROW(gqe::training::Run<double>::load(dir / "split"), gqe::FormatError);
    std::filesystem::remove_all(dir);
  }
  EXPECT_THROW(gqe::training::Run<float>::load(dir / "nothing"), gqe::IoError);
}

// A saved run whose train_state.json is damaged is refused with a FormatError that names the file
// and what is wrong, never a JSON library exception or a crash.
TEST(TrainingRun, DamagedStateIsRefused) {
  const auto dir = std::filesystem::temp_directory_path() / "gqe_test_training_damaged";
  std::filesystem::remove_all(dir);
  gqe::training::Run<float> run(tiny_run(gqe::AttentionType::gqe, 2));
  ASSERT_TRUE(run.train(dir, [] { return false; }, [](const auto&) {}));
  std::ifstream in(dir / "train_state.json");
  const std::string good((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::vector<std::pair<std::string, std::string>> cases = {
      {good.substr(0, good.size() / 2), "is not valid JSON"},
      {"[1, 2]", "is not a gqe-train state"},
      {R"({"format": 5})", "is not a gqe-train state"},
      {"{\"format\": \"gqe-train-state\", " + good.substr(1), "names \"format\" twice"},
      {R"({"format": "gqe-train-state", "scalar": ["F32"]})", "was saved by a run in [\"F32\"]"},
  };
  for (const auto& [text, says] : cases) {
    std::ofstream(dir / "train_state.json", std::ios::trunc) << text;
    try {
      gqe::training::Run<float>::load(dir);
      ADD_FAILURE() << "accepted: " << text.substr(0, 80);
    } catch (const gqe::FormatError& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find((dir / "train_state.json").string()), std::string::npos) << message;
      EXPECT_NE(message.find(says), std::string::npos) << message;
    }
  }
  std::filesystem::remove_all(dir);
}

// A save stopped at any of its steps (as a crash would stop it: the test hook throws) leaves the
// run loadable at the step before the save or the step it saved, never earlier; the next save
// recovers and leaves one folder. Also from a lone <dir>.old, which the earlier protocol could leave.
TEST(TrainingRun, SaveSurvivesACrashAtEveryStep) {
  namespace fs = std::filesystem;
  struct Crash {};
  const fs::path dir = fs::temp_directory_path() / "gqe_test_training_crash" / "run";
  fs::remove_all(dir.parent_path());
  const auto config = tiny_run(gqe::AttentionType::gqe, 40);
  gqe::training::Run<float>(config).save(dir);
  auto& hook = gqe::detail::run_folder_fault_hook();
  const auto only_the_run = [&] {
    return std::distance(fs::directory_iterator(dir.parent_path()), fs::directory_iterator()) == 1 && fs::exists(dir);
  };
  for (const bool lone_old : {false, true}) {
    for (int crash_at = 0;; ++crash_at) {
      if (lone_old) fs::rename(dir, dir.parent_path() / "run.old");
      auto run = gqe::training::Run<float>::load(dir);
      const Index before = run.step();
      run.train_step();
      int calls = 0;
      hook = [&](const char*) {
        if (calls++ == crash_at) throw Crash{};
      };
      bool crashed = false;
      try {
        run.save(dir);
      } catch (const Crash&) {
        crashed = true;
      }
      hook = nullptr;
      const auto after = gqe::training::Run<float>::load(dir);
      EXPECT_TRUE(after.step() == before || after.step() == before + 1)
          << "crash at hook call " << crash_at << ": step " << after.step() << ", saved " << before;
      if (!crashed) {
        EXPECT_EQ(after.step(), before + 1);
        EXPECT_TRUE(only_the_run());
        break;
      }
      // The next save finishes or undoes the crashed one and leaves the run folder alone.
      after.save(dir);
      EXPECT_TRUE(only_the_run()) << "after a crash at hook call " << crash_at;
      EXPECT_EQ(gqe::training::Run<float>::load(dir).step(), after.step());
      ASSERT_LT(crash_at, 20) << "the save never completed";
    }
  }
  fs::remove_all(dir.parent_path());
}

// "--resume ." from inside the run's folder: the folder itself is replaced (not a "..saving" made
// inside it), by way of its absolute path.
TEST(TrainingRun, SavesIntoTheCurrentFolderByItsAbsolutePath) {
  namespace fs = std::filesystem;
  const fs::path parent = fs::temp_directory_path() / "gqe_test_training_dot";
  fs::remove_all(parent);
  const fs::path dir = parent / "run";
  gqe::training::Run<float> run(tiny_run(gqe::AttentionType::gqa, 5));
  run.train_step();
  run.save(dir);
  const fs::path home = fs::current_path();
  fs::current_path(dir);
  auto resumed = gqe::training::Run<float>::load("./");
  resumed.train_step();
  resumed.save(".");  // the working folder is now the replaced copy, removed: "." names nothing any more
  fs::current_path(home);
  EXPECT_EQ(gqe::training::Run<float>::load(dir).step(), 2);
  EXPECT_EQ(std::distance(fs::directory_iterator(parent), fs::directory_iterator()), 1);
  EXPECT_FALSE(fs::exists(dir / "..saving"));
  fs::remove_all(parent);
}

// One process at a time on a folder: a second lock is refused at once, in this process or another.
TEST(TrainingRun, FolderLockRefusesASecondHolder) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "gqe_test_training_lock";
  fs::create_directories(dir);
  {
    gqe::FolderLock first(dir, "a test");
    EXPECT_TRUE(first.held());
    try {
      gqe::FolderLock second(dir, "a test");
      ADD_FAILURE() << "a second lock was granted";
    } catch (const gqe::IoError& e) {
      EXPECT_NE(std::string(e.what()).find("is in use by another process"), std::string::npos) << e.what();
    }
    gqe::FolderLock moved = std::move(first);
    EXPECT_TRUE(moved.held());
    EXPECT_FALSE(first.held());
    EXPECT_THROW(gqe::FolderLock(dir, "a test"), gqe::IoError);
  }
  EXPECT_TRUE(gqe::FolderLock(dir, "a test").held());  // released with its holder
  EXPECT_THROW(gqe::FolderLock(dir / "missing", "a test"), gqe::IoError);
  fs::remove_all(dir);
}

// The message of the gqe::Error that fn throws, or "out of memory" when it runs out first: with the
// address space limited to what the process holds + 256 MB (not under sanitizers, which reserve
// terabytes), a check that should refuse before allocating cannot be passed by allocating first.
template <class Fn>
std::string refusal_under_a_memory_limit(const Fn& fn) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  const bool limit = false;
#elif defined(__has_feature)
  const bool limit = !(__has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer));
#else
  const bool limit = true;
#endif
  rlimit old{};
  if (getrlimit(RLIMIT_AS, &old) != 0) return "getrlimit failed";
  if (limit) {
    long pages = 0;
    std::ifstream("/proc/self/statm") >> pages;
    rlimit low = old;
    low.rlim_cur = static_cast<rlim_t>(pages) * static_cast<rlim_t>(sysconf(_SC_PAGESIZE)) + (rlim_t(256) << 20);
    if (setrlimit(RLIMIT_AS, &low) != 0) return "setrlimit failed";
  }
  std::string message = "nothing thrown";
  try {
    fn();
  } catch (const gqe::Error& e) {
    message = e.what();
  } catch (const std::bad_alloc&) {
    message = "out of memory";
  }
  if (limit && setrlimit(RLIMIT_AS, &old) != 0) return "setrlimit failed to restore the limit";
  return message;
}

// An edited train_state.json that promises a far larger model than the files beside it is refused
// from the files' headers, before the parameters, gradients and moments (1.6 GB here) are allocated:
// under an address-space limit well below that, loading must fail with the FormatError, not run
// out of memory. (Sanitizers reserve terabytes of address space: there only the error is checked.)
TEST(TrainingRun, ResumeChecksSizesBeforeAllocating) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "gqe_test_training_sizes";
  fs::remove_all(dir);
  gqe::training::Run<float>(tiny_run(gqe::AttentionType::gqe, 3)).save(dir);
  nlohmann::json state = nlohmann::json::parse(std::ifstream(dir / "train_state.json"));
  state["run"]["model"]["hidden_size"] = 2048;
  state["run"]["model"]["intermediate_size"] = 8192;
  std::ofstream(dir / "train_state.json", std::ios::trunc) << state.dump();
  const std::string message = refusal_under_a_memory_limit([&] { gqe::training::Run<float>::load(dir); });
  EXPECT_NE(message.find("describes a model of"), std::string::npos) << message;
  fs::remove_all(dir);
}

// A model whose weights, gradients and moments alone exceed any machine's memory (about 850 TB) is
// refused before it is built: overcommitted memory would let its allocation succeed.
TEST(TrainingRun, AModelBeyondTheMachinesMemoryIsRefusedBeforeAllocating) {
  ASSERT_GT(gqe::physical_memory_bytes(), std::uint64_t(1) << 20);  // the system says, on the test machines
  gqe::training::RunConfig r = tiny_run(gqe::AttentionType::gqe, 3);
  r.model.hidden_size = 65536;
  r.model.intermediate_size = 1 << 18;
  r.model.num_layers = 1024;
  const std::string message = refusal_under_a_memory_limit([&] { gqe::training::Run<float> run(r); });
  EXPECT_NE(message.find("parameters needs at least"), std::string::npos) << message;
  EXPECT_NE(message.find("GiB of memory"), std::string::npos) << message;
  EXPECT_NO_THROW(gqe::training::check_fits_in_memory<float>(tiny_run(gqe::AttentionType::gqe, 3).model));
  gqe::ModelConfig negative = tiny_run(gqe::AttentionType::gqe, 3).model;
  negative.hidden_size = -64;  // would count as a small model
  EXPECT_THROW(gqe::training::check_fits_in_memory<float>(negative), gqe::ConfigError);
}

// --resume with --steps: the run goes on to the new total and evaluates at its new end; fewer steps
// than it has done are refused.
TEST(TrainingRun, SetTotalStepsExtendsAFinishedRun) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "gqe_test_training_extend";
  fs::remove_all(dir);
  gqe::training::Run<float> run(tiny_run(gqe::AttentionType::gqa, 3));
  ASSERT_TRUE(run.train(dir, [] { return false; }, [](const auto&) {}));
  auto resumed = gqe::training::Run<float>::load(dir);
  EXPECT_TRUE(resumed.finished());
  EXPECT_THROW(resumed.set_total_steps(2), gqe::ConfigError);
  resumed.set_total_steps(5);
  EXPECT_FALSE(resumed.finished());
  EXPECT_FALSE(resumed.has_final_eval());
  ASSERT_TRUE(resumed.train(dir, [] { return false; }, [](const auto&) {}));
  const auto done = gqe::training::Run<float>::load(dir);
  EXPECT_EQ(done.step(), 5);
  EXPECT_EQ(done.config().steps(), 5);
  EXPECT_TRUE(done.has_final_eval());
  EXPECT_EQ(done.final_eval().step, 5);
  fs::remove_all(dir);
}

TEST(TrainingRun, SameBitsForAnyThreadCount) {
  const auto config = tiny_run(gqe::AttentionType::gqe, 3);
  auto big = config;
  big.batch = 20;  // more sequences than lanes: the lanes, and the work between them, are split among threads
  big.seq_len = big.mqar.seq_len = 96;
  big.mqar.num_pairs = 8;
  big.model.max_position_embeddings = 128;
  big.model.hidden_size = 48;  // products large enough to be split among threads
  big.model.head_dim = 16;
  big.model.intermediate_size = 96;
  std::vector<std::vector<std::vector<float>>> results;
  for (int threads : {1, 2, 3}) {
    gqe::set_num_threads(threads);
    gqe::training::Run<float> run(big);
    for (int i = 0; i < 3; ++i) run.train_step();
    results.push_back(snapshot(run.model()));
  }
  gqe::set_num_threads(gqe::default_thread_count());
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

TEST(TrainingRun, LearnsATinyMqar) {
  auto config = tiny_run(gqe::AttentionType::gqa, 150);
  config.model.hidden_size = 32;
  config.model.intermediate_size = 64;
  config.model.num_heads = 4;
  config.model.head_dim = 8;
  config.batch = 16;
  config.optimizer.lr = 1e-2;
  config.optimizer.warmup_steps = 10;
  gqe::training::Run<float> run(config);
  const auto before = run.evaluate(2);
  ASSERT_TRUE(run.train(std::filesystem::temp_directory_path() / "gqe_test_training_learn", [] { return false; }, [](const auto&) {}));
  EXPECT_LT(run.final_eval().loss, before.loss - 0.3);
  std::filesystem::remove_all(std::filesystem::temp_directory_path() / "gqe_test_training_learn");
}

TEST(TrainingRun, RefusesBadConfigurationsByName) {
  auto c = tiny_run(gqe::AttentionType::gqa, 5);
  c.batch = 0;
  EXPECT_THROW(gqe::training::Run<float>{c}, gqe::ConfigError);
  c = tiny_run(gqe::AttentionType::gqa, 5);
  c.mqar.vocab_size = 30;
  EXPECT_THROW(gqe::training::Run<float>{c}, gqe::ConfigError);
  c = tiny_run(gqe::AttentionType::gqa, 5);
  c.task = gqe::training::Task::text;
  EXPECT_THROW(gqe::training::Run<float>{c}, gqe::ConfigError);
  c = tiny_run(gqe::AttentionType::gqa, 5);
  c.aux_coef = -1;
  EXPECT_THROW(gqe::training::Run<float>{c}, gqe::ConfigError);
  c = tiny_run(gqe::AttentionType::gqa, 5);
  c.task = gqe::training::Task::text;
  c.model.vocab_size = 256;
  c.text_path = "never-read.txt";
  c.heldout_fraction = std::nan("");
  try {
    c.validate();
    ADD_FAILURE() << "a NaN held-out fraction was accepted";
  } catch (const gqe::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("held-out fraction is nan"), std::string::npos) << e.what();
  }
  try {
    c = tiny_run(gqe::AttentionType::gqa, 5);
    c.optimizer.lr = -1;
    gqe::training::Run<float> run(c);
    FAIL() << "a negative learning rate was accepted";
  } catch (const gqe::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("learning rate is -1"), std::string::npos) << e.what();
  }
  // Batches that disagree with the model.
  const auto mc = tiny_config(gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1, false);
  auto p = random_model(mc, 1);
  gqe::training::LossAndGrad<double> graph;
  auto batch = random_batch(mc, 1, 5, 1);
  batch.tokens[2] = 11;
  EXPECT_THROW(graph.forward(p, batch, 0.0), gqe::InputError);
  batch = random_batch(mc, 1, 5, 1);
  batch.weights.assign(5, 0.0f);
  EXPECT_THROW(graph.forward(p, batch, 0.0), gqe::InputError);
  batch = random_batch(mc, 1, 5, 1);
  batch.targets.pop_back();
  EXPECT_THROW(graph.forward(p, batch, 0.0), gqe::ShapeError);
  EXPECT_THROW(graph.backward(p), gqe::InputError);
}
