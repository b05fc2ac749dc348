// Training: every backward pass against central finite differences in double (the ops one by one,
// then whole GQA and GQE models in all three variants with k = 1 and k = M, tied and untied), the
// training forward against the inference Transformer, hard_concat's router getting gradient from
// the load-balancing loss alone, the optimiser and schedule, the data generators, determinism
// across thread counts, and resume: N steps straight equal k steps, save, load, N - k steps.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "gqe/training/attention_grad.hpp"
#include "gqe/training/grad_ops.hpp"
#include "gqe/training/model_grad.hpp"
#include "gqe/training/params.hpp"
#include "gqe/training/rng.hpp"

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
  gqe::training::linear_backward<double>(x, w, probe, dx, false, dw);
  expect_close("dx", dx.data(), numeric_gradient(x.data(), x.size(), loss));
  expect_close("dw", dw.data(), numeric_gradient(w.data(), w.size(), loss));
  // Accumulation: a second call adds the same again.
  MatD dx2 = dx;
  MatD dw2 = dw;
  gqe::training::linear_backward<double>(x, w, probe, dx2, true, dw2);
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
    gqe::rms_norm<double>(x, w, eps, y);
    return (y.array() * probe.array()).sum();
  };
  VecD inv;
  gqe::training::rms_inverse<double>(x, eps, inv);
  MatD dx(5, 9);
  VecD dw = VecD::Zero(9);
  gqe::training::rms_norm_backward<double>(x, w, inv, probe, dx, false, dw);
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
  gqe::apply_rope<double>(dx, dh, gqe::training::inverse_rope(table));
  expect_close("dx", dx.data(), numeric_gradient(x.data(), x.size(), loss));
}

TEST(TrainingOps, CrossEntropyGradientAndMask) {
  Rng rng(4);
  MatD logits = random_matrix(6, 5, rng);
  const std::vector<std::int32_t> targets = {0, 4, 2, 3, 1, 1};
  const std::vector<float> weights = {1, 0, 1, 1, 0, 1};
  const auto loss = [&] {
    MatD copy = logits;
    return gqe::training::cross_entropy<double>(copy, targets, weights, 0).loss / 4.0;
  };
  MatD grad = logits;
  const auto sums = gqe::training::cross_entropy<double>(grad, targets, weights, 0.25);
  EXPECT_EQ(sums.weight, 4.0);
  // The reference: -log softmax of the target, summed over counted rows.
  double want = 0;
  for (Index r = 0; r < 6; ++r)
    if (weights[static_cast<std::size_t>(r)] > 0)
      want += std::log(logits.row(r).array().exp().sum()) - logits(r, targets[static_cast<std::size_t>(r)]);
  EXPECT_NEAR(sums.loss, want, 1e-12);
  expect_close("dlogits", grad.data(), numeric_gradient(logits.data(), logits.size(), loss));
  EXPECT_EQ(grad.row(1).norm(), 0.0);
}

// Attention over several query and key tiles, with GQA-like heads sharing K/V, against finite
// differences of sum(probe * out); the forward against a plain softmax reference.
TEST(TrainingOps, AttentionBackwardMatchesFiniteDifferences) {
  Rng rng(5);
  const Index T = 150, dh = 4, heads = 2;  // 150 > the 64-query and 128-key tiles
  MatD q = random_matrix(T, heads * dh, rng), k = random_matrix(T, dh, rng), v = random_matrix(T, dh, rng);
  const MatD probe = random_matrix(T, heads * dh, rng);
  const double scale = 1.0 / std::sqrt(double(dh));
  MatD out(T, heads * dh), lse(T, heads), d_q(T, heads * dh), d_k(T, dh), d_v(T, dh);
  const auto make = [&] {
    gqe::training::TrainHead<double> e;
    e.query = q.data();
    e.query_stride = q.cols();
    e.key = k.data();
    e.value = v.data();
    e.kv_stride = dh;
    e.out = out.data();
    e.out_stride = out.cols();
    e.lse = lse.data();
    e.lse_stride = heads;
    e.d_out = probe.data();
    e.d_query = d_q.data();
    e.d_key = d_k.data();
    e.d_value = d_v.data();
    e.d_kv_stride = dh;
    e.count = T;
    e.heads = heads;
    return std::vector<gqe::training::TrainHead<double>>{e};
  };
  const auto loss = [&] {
    gqe::training::attention_forward(make(), dh, scale);
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
  gqe::training::attention_backward(make(), dh, scale);
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

// Random parameters of every tensor (a random router too, so that routing varies and no two
// logits of a group are close enough for a finite difference to swap them).
gqe::training::Params<double> random_params(const gqe::ModelConfig& c, std::uint64_t seed) {
  gqe::training::Params<double> p(c);
  Rng rng(seed);
  p.for_each([&](const std::string& name, gqe::TensorView<double> w) {
    const bool norm = w.rank() == 1;
    const double sigma = norm ? 0.2 : (name.find("router") != std::string::npos ? 1.0 : 0.5);
    for (Index i = 0; i < w.numel(); ++i) w.data()[i] = (norm ? 1.0 : 0.0) + sigma * rng.normal();
  });
  return p;
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
void check_model_gradient(const gqe::ModelConfig& c, double aux_coef, std::uint64_t seed) {
  auto params = random_params(c, seed);
  const auto batch = random_batch(c, 2, 7, seed + 100);
  gqe::training::LossAndGrad<double> graph(c);
  gqe::training::Params<double> grads(c);
  graph.forward(params, batch, aux_coef);
  graph.backward(params, grads);
  const auto loss = [&] { return graph.forward(params, batch, aux_coef).loss; };
  auto pv = params.views();
  auto gv = grads.views();
  const auto names = params.names();
  for (std::size_t i = 0; i < pv.size(); ++i)
    expect_close(names[i], gv[i].data(), numeric_gradient(pv[i].data(), pv[i].numel(), loss, 1e-5), 1e-6);
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

// hard_concat: the hard slots give the router nothing, so its gradient is the load-balancing
// loss's alone: zero with coefficient 0, and with coefficient c exactly c times that of c = 1.
TEST(TrainingModel, HardConcatRouterLearnsFromTheAuxLossOnly) {
  const auto c = tiny_config(gqe::AttentionType::gqe, gqe::GqeVariant::hard_concat, 1, false);
  const auto params = random_params(c, 9);
  const auto batch = random_batch(c, 2, 7, 10);
  gqe::training::LossAndGrad<double> graph(c);
  const auto router_grads = [&](double coef) {
    gqe::training::Params<double> grads(c);
    graph.forward(params, batch, coef);
    graph.backward(params, grads);
    std::vector<MatD> out;
    for (const auto& l : grads.layers) out.push_back(l.router.weight());
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
  const auto pg = random_params(cg, 9);
  gqe::training::LossAndGrad<double> gg(cg);
  gqe::training::Params<double> grads(cg);
  gg.forward(pg, batch, 0.0);
  gg.backward(pg, grads);
  EXPECT_GT(grads.layers[0].router.weight().norm(), 0.0);
}

}  // namespace
