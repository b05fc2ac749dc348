// The layers (Router, RoutingStats, Attention as GQA and GQE in its three variants, FeedForward)
// against a slow reference of docs/model.md's formulas, written in this file: per token,
// per head, in plain loops over double, recomputing the whole sequence from position 0. The layers
// run in float and double on weights and inputs drawn in that type, which the reference reads
// exactly; each tolerance is derived from the length of the products involved.
//
// Attention layers are driven as the transformer drives them: an AttentionCache per sequence,
// Segments of rows, and a RopeTable of the rows' positions. Prefill, two sequences in one call,
// a chunk after a filled cache, and token-by-token decode must all agree with the reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "gqe/layers/attention.hpp"
#include "gqe/layers/attention_cache.hpp"
#include "gqe/layers/feed_forward.hpp"
#include "gqe/layers/router.hpp"
#include "gqe/ops/gemm_backend.hpp"
#include "support.hpp"

namespace {

using gqe::AttentionConfig;
using gqe::AttentionType;
using gqe::GqeVariant;
using gqe::Index;
using gqe::testing::matrix_of;
template <class S>
using Matrix = gqe::Matrix<S>;
using gqe::testing::eps;
using gqe::testing::MatrixD;
using gqe::testing::random_matrix;
using gqe::testing::relative_error;
using gqe::testing::to_double;
using Vec = std::vector<double>;
using Weights = std::map<std::string, MatrixD>;  // parameter name under self_attn. -> [out, in]

template <class S>
class LayersTest : public ::testing::Test {};
using ScalarTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(LayersTest, ScalarTypes);

// ---- the reference --------------------------------------------------------------------------------

// w[first .. first + n) rows times x row t: one head's projection of one token.
Vec project(const MatrixD& w, Index first, Index n, const MatrixD& x, Index t) {
  Vec out(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    double s = 0;
    for (Index c = 0; c < x.cols(); ++c) s += w(first + i, c) * x(t, c);
    out[static_cast<std::size_t>(i)] = s;
  }
  return out;
}

// Rotate-half RoPE of one head at `position`: element i pairs with i + d_h/2.
void rope(Vec& v, Index position, double theta) {
  const Index dh = static_cast<Index>(v.size()), half = dh / 2;
  for (Index i = 0; i < half; ++i) {
    const double angle = static_cast<double>(position) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
    const double x1 = v[static_cast<std::size_t>(i)], x2 = v[static_cast<std::size_t>(i + half)];
    v[static_cast<std::size_t>(i)] = x1 * std::cos(angle) - x2 * std::sin(angle);
    v[static_cast<std::size_t>(i + half)] = x2 * std::cos(angle) + x1 * std::sin(angle);
  }
}

// softmax(q . K[0..t] / sqrt(d_h)) V[0..t]: token t attends causally.
Vec attend(const Vec& q, const std::vector<Vec>& keys, const std::vector<Vec>& values, Index t) {
  const std::size_t dh = q.size();
  Vec scores(static_cast<std::size_t>(t + 1));
  for (std::size_t j = 0; j < scores.size(); ++j) {
    double dot = 0;
    for (std::size_t c = 0; c < dh; ++c) dot += q[c] * keys[j][c];
    scores[j] = dot / std::sqrt(static_cast<double>(dh));
  }
  const double max = *std::max_element(scores.begin(), scores.end());
  double sum = 0;
  for (auto& s : scores) sum += (s = std::exp(s - max));
  Vec out(dh, 0.0);
  for (std::size_t j = 0; j < scores.size(); ++j)
    for (std::size_t c = 0; c < dh; ++c) out[c] += scores[j] / sum * values[j][c];
  return out;
}

struct Reference {
  MatrixD concat;  // [T, S*d_h]: o_proj's input, slots in docs/model.md's order
  MatrixD y;       // [T, d]
  MatrixD probs;   // [T, G*M], GQE only
  std::vector<std::vector<Index>> kept;  // [T][G*k]: m of slot (g, j), GQE only
  MatrixD weights;                       // [T, G*k]: renormalised slot weights, GQE only
};

// The attention layer of docs/model.md over a whole sequence x [T, d] starting at position 0.
Reference reference_attention(const AttentionConfig& c, const Weights& w, const MatrixD& x) {
  const Index T = x.rows(), N = c.num_heads, G = c.num_kv_heads, M = N / G, dh = c.head_dim, k = c.top_k;
  const bool gqe = c.type == AttentionType::gqe;
  const Index slots = !gqe ? N : (c.variant == GqeVariant::gqe ? k * G + 2 : k * G);
  // K and V of every KV head and token, RoPE on K.
  std::vector<std::vector<Vec>> K(static_cast<std::size_t>(G)), V(static_cast<std::size_t>(G));
  for (Index g = 0; g < G; ++g)
    for (Index t = 0; t < T; ++t) {
      Vec key = project(w.at("k_proj.weight"), g * dh, dh, x, t);
      rope(key, t, c.rope_theta);
      K[static_cast<std::size_t>(g)].push_back(key);
      V[static_cast<std::size_t>(g)].push_back(project(w.at("v_proj.weight"), g * dh, dh, x, t));
    }
  // Query of head / expert e for token t, RoPE applied.
  const auto query = [&](const std::string& name, Index e, Index t) {
    Vec q = project(w.at(name), e * dh, dh, x, t);
    rope(q, t, c.rope_theta);
    return q;
  };
  Reference r;
  r.concat = MatrixD::Zero(T, slots * dh);
  const auto put = [&](Index t, Index slot, const Vec& v) {
    for (Index i = 0; i < dh; ++i) r.concat(t, slot * dh + i) = v[static_cast<std::size_t>(i)];
  };
  if (!gqe) {
    for (Index t = 0; t < T; ++t)
      for (Index e = 0; e < N; ++e)  // head e reads KV head e / M
        put(t, e, attend(query("q_proj.weight", e, t), K[static_cast<std::size_t>(e / M)], V[static_cast<std::size_t>(e / M)], t));
  } else {
    r.probs.resize(T, G * M);
    r.weights.resize(T, G * k);
    r.kept.assign(static_cast<std::size_t>(T), std::vector<Index>());
    // Mean over groups of K (after RoPE) and V, for the shared head.
    std::vector<Vec> mean_k(static_cast<std::size_t>(T), Vec(static_cast<std::size_t>(dh), 0.0)), mean_v = mean_k;
    for (Index t = 0; t < T; ++t)
      for (Index g = 0; g < G; ++g)
        for (Index i = 0; i < dh; ++i) {
          mean_k[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] += K[static_cast<std::size_t>(g)][static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] / static_cast<double>(G);
          mean_v[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] += V[static_cast<std::size_t>(g)][static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] / static_cast<double>(G);
        }
    for (Index t = 0; t < T; ++t) {
      const Vec logits = project(w.at("router.weight"), 0, G * M, x, t);  // [G*M]
      auto& kept = r.kept[static_cast<std::size_t>(t)];
      std::vector<Vec> slot_out;
      double kept_sum = 0;
      for (Index g = 0; g < G; ++g) {
        // p = softmax over the group's M experts.
        double max = -std::numeric_limits<double>::infinity(), sum = 0;
        for (Index m = 0; m < M; ++m) max = std::max(max, logits[static_cast<std::size_t>(g * M + m)]);
        for (Index m = 0; m < M; ++m) sum += std::exp(logits[static_cast<std::size_t>(g * M + m)] - max);
        for (Index m = 0; m < M; ++m) r.probs(t, g * M + m) = std::exp(logits[static_cast<std::size_t>(g * M + m)] - max) / sum;
        // Keep the k largest by logit, descending; a stable sort leaves equal logits in index order.
        std::vector<Index> order(static_cast<std::size_t>(M));
        for (Index m = 0; m < M; ++m) order[static_cast<std::size_t>(m)] = m;
        std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
          return logits[static_cast<std::size_t>(g * M + a)] > logits[static_cast<std::size_t>(g * M + b)];
        });
        for (Index j = 0; j < k; ++j) {
          const Index m = order[static_cast<std::size_t>(j)];
          kept.push_back(m);
          kept_sum += r.probs(t, g * M + m);
          // Slot (g, j): the kept expert's query against KV head g.
          slot_out.push_back(attend(query("q_proj.weight", g * M + m, t), K[static_cast<std::size_t>(g)], V[static_cast<std::size_t>(g)], t));
        }
      }
      for (Index s = 0; s < G * k; ++s) {
        const double p = r.probs(t, (s / k) * M + kept[static_cast<std::size_t>(s)]);
        r.weights(t, s) = p / std::max(1e-9, kept_sum);  // renormalised across all groups
        Vec o = slot_out[static_cast<std::size_t>(s)];
        if (c.variant == GqeVariant::weighted_concat)
          for (auto& v : o) v *= p;
        put(t, s, o);
      }
      if (c.variant == GqeVariant::gqe) {
        Vec weighted(static_cast<std::size_t>(dh), 0.0);
        for (Index s = 0; s < G * k; ++s)
          for (Index i = 0; i < dh; ++i)
            weighted[static_cast<std::size_t>(i)] += r.weights(t, s) * slot_out[static_cast<std::size_t>(s)][static_cast<std::size_t>(i)];
        put(t, G * k, weighted);
        put(t, G * k + 1, attend(query("q_shared.weight", 0, t), mean_k, mean_v, t));
      }
    }
  }
  const MatrixD& wo = w.at("o_proj.weight");  // [d, S*d_h]
  r.y = r.concat * wo.transpose();
  return r;
}

// ---- driving the layers -----------------------------------------------------------------------------

template <class S>
using Segments = std::vector<gqe::Segment<S>>;

// Runs one forward call over x [R, d] whose rows are split into segments; the RopeTable holds each
// row's position, continuing its segment's cache. Returns y [R, d].
template <class S, class Layer>
Matrix<S> run(const Layer& layer, const Matrix<S>& x, const Segments<S>& segments, gqe::Routing<S>* routing = nullptr) {
  const AttentionConfig& c = layer.config();
  std::vector<Index> positions(static_cast<std::size_t>(x.rows()));
  for (const auto& s : segments)
    for (Index i = 0; i < s.count; ++i) positions[static_cast<std::size_t>(s.row_begin + i)] = s.cache->length() + i;
  gqe::RopeTable<S> table;
  table.compute(positions, c.head_dim, c.rope_theta);
  Matrix<S> y(x.rows(), c.hidden_size);
  layer.forward(x, segments, table, y, nullptr, routing);
  return y;
}

// Projections Xavier-like, scaled so that scores have a standard deviation near 2 (peaked softmax);
// router logits of standard deviation 2 so that the router's choices differ between tokens.
// Returns the same values in double for the reference.
template <class S, class Layer>
Weights randomise(Layer& layer, std::mt19937& rng) {
  Weights w;
  Layer::visit(layer, [&](const char* name, gqe::Weight& weight) {
    auto m = matrix_of<S>(weight);
    m = random_matrix<S>(m.rows(), m.cols(), rng, 1.4 / std::sqrt(static_cast<double>(m.cols())));
    if (std::string(name) == "router.weight") m *= S(2 / 1.4);
    w[name] = to_double(m);
  });
  return w;
}

struct LayerCase {
  const char* name;
  AttentionType type;
  GqeVariant variant;
  Index hidden, heads, kv_heads, head_dim, top_k;

  AttentionConfig config() const {
    AttentionConfig c;
    c.type = type;
    c.variant = variant;
    c.hidden_size = hidden;
    c.num_heads = heads;
    c.num_kv_heads = kv_heads;
    c.head_dim = head_dim;
    c.top_k = top_k;
    return c;
  }
};

const std::vector<LayerCase>& layer_cases() {
  static const std::vector<LayerCase> cases = {
      {"gqa N=6 G=3", AttentionType::gqa, GqeVariant::gqe, 37, 6, 3, 10, 1},
      {"gqa N=12 G=4 d_h=64", AttentionType::gqa, GqeVariant::gqe, 70, 12, 4, 64, 1},
      {"gqe N=6 G=3 k=1", AttentionType::gqe, GqeVariant::gqe, 37, 6, 3, 10, 1},
      {"gqe N=12 G=4 k=2", AttentionType::gqe, GqeVariant::gqe, 29, 12, 4, 6, 2},
      {"gqe N=6 G=2 k=3=M", AttentionType::gqe, GqeVariant::gqe, 37, 6, 2, 10, 3},
      {"gqe N=6 G=3 k=2=M d_h=64", AttentionType::gqe, GqeVariant::gqe, 70, 6, 3, 64, 2},
      {"hard_concat N=12 G=4 k=1", AttentionType::gqe, GqeVariant::hard_concat, 29, 12, 4, 6, 1},
      {"hard_concat N=6 G=2 k=3=M", AttentionType::gqe, GqeVariant::hard_concat, 37, 6, 2, 10, 3},
      {"weighted_concat N=12 G=4 k=2", AttentionType::gqe, GqeVariant::weighted_concat, 37, 12, 4, 10, 2},
      {"weighted_concat N=6 G=3 k=1", AttentionType::gqe, GqeVariant::weighted_concat, 29, 6, 3, 6, 1},
      {"weighted_concat N=6 G=3 k=2=M", AttentionType::gqe, GqeVariant::weighted_concat, 29, 6, 3, 6, 2},
  };
  return cases;
}

// Relative errors add up along the chain: projections of length d (sqrt(d) u), attention over T keys
// with scores of length d_h (sqrt(d_h) + sqrt(T)), the weighted slot over G*k slots, o_proj of length
// S*d_h. Allowed: 4 (sqrt(d) + sqrt(d_h) + sqrt(T) + sqrt(S*d_h) + 8) eps, norm-wise.
template <class S>
double layer_tolerance(const AttentionConfig& c, Index T) {
  const auto root = [](Index n) { return std::sqrt(static_cast<double>(n)); };
  return 4 * (root(c.hidden_size) + root(c.head_dim) + root(T) + root(c.output_slots() * c.head_dim) + 8) * eps<S>();
}

// The layer's routing of rows [first, first + n) of `got` against reference tokens [ref_first, ...).
template <class S>
void expect_routing(const gqe::Routing<S>& got, Index first, const Reference& ref, Index ref_first, Index n,
                    const AttentionConfig& c) {
  const Index G = c.num_kv_heads, M = c.experts_per_group(), k = c.top_k;
  // p = softmax of logits of length-d dot products: 4 sqrt(d) eps absolute, plus the exp.
  const double tol = (4 * std::sqrt(static_cast<double>(c.hidden_size)) + 8) * eps<S>();
  for (Index i = 0; i < n; ++i) {
    const Index t = ref_first + i, r = first + i;
    for (Index s = 0; s < G * k; ++s) {
      ASSERT_EQ(got.experts(r, s), ref.kept[static_cast<std::size_t>(t)][static_cast<std::size_t>(s)])
          << "token " << t << " slot " << s;
      ASSERT_NEAR(static_cast<double>(got.weights(r, s)), ref.weights(t, s), tol) << "token " << t << " slot " << s;
    }
    for (Index e = 0; e < G * M; ++e)
      ASSERT_NEAR(static_cast<double>(got.probs(r, e)), ref.probs(t, e), tol) << "token " << t << " expert " << e;
  }
}

template <class S, class Layer>
void check_attention_layer(const LayerCase& lc, unsigned seed) {
  SCOPED_TRACE(lc.name);
  const AttentionConfig c = lc.config();
  const bool kGqe = c.is_gqe();
  std::mt19937 rng(seed);
  Layer layer(c);
  const Weights w = randomise<S>(layer, rng);
  const Index T = 275, d = c.hidden_size;
  const Matrix<S> x = random_matrix<S>(T, d, rng);  // [T, d]
  const Reference ref = reference_attention(c, w, to_double(x));
  const double tol = layer_tolerance<S>(c, T);
  gqe::Routing<S> routing;

  // Prefill of 270 tokens in one segment: three query tiles of attention, two key tiles.
  gqe::AttentionCache<S> cache(c);
  const Matrix<S> prefill = run<S>(layer, x.topRows(270), Segments<S>{{&cache, 0, 270}}, &routing);  // [270, d]
  EXPECT_LT(relative_error(prefill, ref.y.topRows(270)), tol) << "prefill";
  EXPECT_EQ(cache.length(), 270);
  if (kGqe) expect_routing(routing, 0, ref, 0, 270, c);

  // A chunk of 140 after 130 cached tokens, then 5 decode steps continuing it.
  gqe::AttentionCache<S> chunked(c);
  run<S>(layer, x.topRows(130), Segments<S>{{&chunked, 0, 130}});
  const Matrix<S> chunk = run<S>(layer, x.middleRows(130, 140), Segments<S>{{&chunked, 0, 140}}, &routing);  // [140, d]
  EXPECT_LT(relative_error(chunk, ref.y.middleRows(130, 140)), tol) << "chunk after 130 cached";
  if (kGqe) expect_routing(routing, 0, ref, 130, 140, c);
  for (Index t = 270; t < T; ++t) {
    const Matrix<S> step = run<S>(layer, x.middleRows(t, 1), Segments<S>{{&chunked, 0, 1}});  // [1, d]
    EXPECT_LT(relative_error(step, ref.y.middleRows(t, 1)), tol) << "decode at position " << t;
  }
  EXPECT_EQ(chunked.length(), T);

  // Token-by-token decode from an empty cache equals the reference and the layer's own prefill.
  gqe::AttentionCache<S> stepwise(c);
  Matrix<S> steps(40, d);  // [40, d]
  for (Index t = 0; t < 40; ++t) steps.row(t) = run<S>(layer, x.middleRows(t, 1), Segments<S>{{&stepwise, 0, 1}});
  EXPECT_LT(relative_error(steps, ref.y.topRows(40)), tol) << "stepwise decode";
  EXPECT_LT(relative_error(steps, to_double(prefill.topRows(40))), tol) << "stepwise decode vs prefill";

  // Two sequences in one call: a new one of 65 tokens, and one with 11 cached tokens continued by 20.
  const Matrix<S> xa = random_matrix<S>(65, d, rng);  // [65, d]
  const Reference ref_a = reference_attention(c, w, to_double(xa));
  gqe::AttentionCache<S> cache_a(c), cache_b(c);
  run<S>(layer, x.topRows(11), Segments<S>{{&cache_b, 0, 11}});
  Matrix<S> batch(85, d);  // [65 + 20, d]
  batch.topRows(65) = xa;
  batch.bottomRows(20) = x.middleRows(11, 20);
  const Matrix<S> both = run<S>(layer, batch, Segments<S>{{&cache_a, 0, 65}, {&cache_b, 65, 20}}, &routing);
  EXPECT_LT(relative_error(both.topRows(65), ref_a.y), layer_tolerance<S>(c, 65)) << "batch, new sequence";
  EXPECT_LT(relative_error(both.bottomRows(20), ref.y.middleRows(11, 20)), tol) << "batch, continued sequence";
  EXPECT_EQ(cache_a.length(), 65);
  EXPECT_EQ(cache_b.length(), 31);
  if (kGqe) {
    expect_routing(routing, 0, ref_a, 0, 65, c);
    expect_routing(routing, 65, ref, 11, 20, c);
  }
}

template <class S>
void check_case(const LayerCase& lc, unsigned seed) {
  if (lc.type == AttentionType::gqa)
    check_attention_layer<S, gqe::Attention<S>>(lc, seed);
  else
    check_attention_layer<S, gqe::Attention<S>>(lc, seed);
}

TYPED_TEST(LayersTest, AttentionLayersMatchTheReferenceInPrefillChunksDecodeAndBatches) {
  unsigned seed = 10;
  for (const auto& lc : layer_cases()) check_case<TypeParam>(lc, seed++);
}

// A long call over two sequences, 1300 rows (more than linear's largest unit of rows, 1024): a
// new sequence of 600 rows and one with 11 cached rows continued by 700. Against the reference,
// and against the same sequences in calls of their own: the same cache lengths and, with the
// library's kernels, the same bits, and the caches continue alike.
TYPED_TEST(LayersTest, AttentionLongCallsOverTwoSequencesMatchTheReference) {
  using S = TypeParam;
  unsigned seed = 90;
  for (const std::size_t i : {std::size_t(0), std::size_t(2)}) {  // GQA, and GQE with its shared head's mean K/V
    const LayerCase& lc = layer_cases()[i];
    SCOPED_TRACE(lc.name);
    const AttentionConfig c = lc.config();
    std::mt19937 rng(seed++);
    gqe::Attention<S> layer(c);
    const Weights w = randomise<S>(layer, rng);
    const Index d = c.hidden_size;
    const Matrix<S> xa = random_matrix<S>(600, d, rng);  // [600, d]
    const Matrix<S> xb = random_matrix<S>(711, d, rng);  // [11 + 700, d]
    const Reference ref_a = reference_attention(c, w, to_double(xa)), ref_b = reference_attention(c, w, to_double(xb));
    gqe::AttentionCache<S> cache_a(c), cache_b(c), alone_a(c), alone_b(c);
    run<S>(layer, xb.topRows(11), Segments<S>{{&cache_b, 0, 11}});
    run<S>(layer, xb.topRows(11), Segments<S>{{&alone_b, 0, 11}});
    Matrix<S> batch(1300, d);  // [600 + 700, d]
    batch.topRows(600) = xa;
    batch.bottomRows(700) = xb.bottomRows(700);
    const Matrix<S> both = run<S>(layer, batch, Segments<S>{{&cache_a, 0, 600}, {&cache_b, 600, 700}});  // [1300, d]
    EXPECT_LT(relative_error(both.topRows(600), ref_a.y), layer_tolerance<S>(c, 600)) << "new sequence";
    EXPECT_LT(relative_error(both.bottomRows(700), ref_b.y.bottomRows(700)), layer_tolerance<S>(c, 711)) << "continued sequence";
    EXPECT_EQ(cache_a.length(), 600);
    EXPECT_EQ(cache_b.length(), 711);
    const Matrix<S> a = run<S>(layer, xa, Segments<S>{{&alone_a, 0, 600}});                 // [600, d]
    const Matrix<S> b = run<S>(layer, xb.bottomRows(700), Segments<S>{{&alone_b, 0, 700}});  // [700, d]
    if (std::string(gqe::backend::kName) == "eigen") {
      EXPECT_TRUE((both.topRows(600).array() == a.array()).all());
      EXPECT_TRUE((both.bottomRows(700).array() == b.array()).all());
    }
    // Both caches continue alike: one more step on each gives the same bits.
    const Matrix<S> next = random_matrix<S>(1, d, rng);  // [1, d]
    const Matrix<S> after_batch = run<S>(layer, next, Segments<S>{{&cache_b, 0, 1}});
    const Matrix<S> after_alone = run<S>(layer, next, Segments<S>{{&alone_b, 0, 1}});
    if (std::string(gqe::backend::kName) == "eigen") {
      EXPECT_TRUE((after_batch.array() == after_alone.array()).all());
    }
  }
}

// o_proj's input order: with o_proj set to copy slot s into the first d_h outputs, the output is
// exactly the reference's slot s ([slot(0,0), ..., slot(G-1,k-1), weighted, shared] for GQE, heads in
// order for GQA), and every other output is 0.
template <class S, class Layer>
void check_slot_order(const LayerCase& lc, unsigned seed) {
  SCOPED_TRACE(lc.name);
  const AttentionConfig c = lc.config();
  std::mt19937 rng(seed);
  Layer layer(c);
  const Weights w = randomise<S>(layer, rng);
  const Index T = 65, d = c.hidden_size, dh = c.head_dim;
  ASSERT_GE(d, dh);
  const Matrix<S> x = random_matrix<S>(T, d, rng);  // [T, d]
  const Reference ref = reference_attention(c, w, to_double(x));  // ref.concat does not depend on o_proj
  for (Index slot = 0; slot < c.output_slots(); ++slot) {
    Layer::visit(layer, [&](const char* name, gqe::Weight& weight) {
      if (std::string(name) != "o_proj.weight") return;
      auto m = matrix_of<S>(weight);
      m.setZero();  // [d, S*d_h]
      for (Index i = 0; i < dh; ++i) m(i, slot * dh + i) = S(1);
    });
    gqe::AttentionCache<S> cache(c);
    const Matrix<S> y = run<S>(layer, x, Segments<S>{{&cache, 0, T}});  // [T, d]
    EXPECT_LT(relative_error(y.leftCols(dh), ref.concat.middleCols(slot * dh, dh)), layer_tolerance<S>(c, T))
        << "o_proj input slot " << slot;
    EXPECT_TRUE((y.rightCols(d - dh).array() == S(0)).all()) << "slot " << slot;
  }
}

TYPED_TEST(LayersTest, OProjReadsTheSlotsInTheDocumentedOrder) {
  unsigned seed = 40;
  for (const auto& lc : layer_cases()) {
    if (lc.type == AttentionType::gqa)
      check_slot_order<TypeParam, gqe::Attention<TypeParam>>(lc, seed++);
    else
      check_slot_order<TypeParam, gqe::Attention<TypeParam>>(lc, seed++);
  }
}

// ---- Router ---------------------------------------------------------------------------------------

AttentionConfig gqe_config(Index hidden, Index heads, Index kv_heads, Index top_k) {
  return LayerCase{"", AttentionType::gqe, GqeVariant::gqe, hidden, heads, kv_heads, 10, top_k}.config();
}

TYPED_TEST(LayersTest, RouterKeepsTheTopKPerGroupWithRenormalisedWeights) {
  using S = TypeParam;
  std::mt19937 rng(60);
  for (const auto& c : {gqe_config(37, 6, 3, 1), gqe_config(37, 12, 4, 2), gqe_config(29, 6, 2, 3)}) {
    const Index G = c.num_kv_heads, M = c.experts_per_group(), k = c.top_k, d = c.hidden_size, T = 130;
    SCOPED_TRACE("N = " + std::to_string(c.num_heads) + ", G = " + std::to_string(G) + ", k = " + std::to_string(k));
    gqe::Router<S> router(c);
    ASSERT_EQ(matrix_of<S>(router.weight()).rows(), G * M);
    matrix_of<S>(router.weight()) = random_matrix<S>(G * M, d, rng, 2 / std::sqrt(static_cast<double>(d)));  // [G*M, d]
    const Matrix<S> x = random_matrix<S>(T, d, rng);  // [T, d]
    gqe::Routing<S> r;
    router.route(x, r);
    ASSERT_EQ(r.rows(), T);
    ASSERT_EQ(r.experts.cols(), G * k);
    ASSERT_EQ(r.groups, G);
    ASSERT_EQ(r.experts_per_group, M);
    ASSERT_EQ(r.top_k, k);

    const MatrixD logits = to_double(x) * to_double(matrix_of<S>(router.weight())).transpose();  // [T, G*M]
    const double prob_tol = (4 * std::sqrt(static_cast<double>(d)) + 8) * eps<S>();
    for (Index t = 0; t < T; ++t) {
      double kept_sum = 0;
      for (Index g = 0; g < G; ++g) {
        // Probabilities: softmax inside the group, summing to 1 (M terms, each off by a few u).
        double sum = 0, ref_sum = 0;
        for (Index m = 0; m < M; ++m) {
          sum += static_cast<double>(r.probs(t, g * M + m));
          ref_sum += std::exp(logits(t, g * M + m));
        }
        EXPECT_NEAR(sum, 1.0, 2 * static_cast<double>(M) * eps<S>()) << "token " << t << " group " << g;
        for (Index m = 0; m < M; ++m)
          EXPECT_NEAR(static_cast<double>(r.probs(t, g * M + m)), std::exp(logits(t, g * M + m)) / ref_sum, prob_tol);
        // k distinct experts inside the group, by descending p, and no dropped expert above a kept one.
        std::set<std::int32_t> distinct;
        double lowest_kept = 2;
        for (Index j = 0; j < k; ++j) {
          const std::int32_t m = r.experts(t, g * k + j);
          ASSERT_GE(m, 0);
          ASSERT_LT(m, M);
          distinct.insert(m);
          const double p = static_cast<double>(r.probs(t, g * M + m));
          EXPECT_LE(p, lowest_kept) << "slot " << j << " of group " << g << " is not in descending order";
          lowest_kept = p;
          kept_sum += p;
          // The kept expert is the one of largest double-precision logit among those not yet kept.
          Index best = -1;
          for (Index e = 0; e < M; ++e)
            if (!std::count(r.experts.row(t).data() + g * k, r.experts.row(t).data() + g * k + j, e) &&
                (best < 0 || logits(t, g * M + e) > logits(t, g * M + best)))
              best = e;
          EXPECT_EQ(m, best) << "token " << t << " group " << g << " slot " << j;
        }
        EXPECT_EQ(static_cast<Index>(distinct.size()), k);
        for (Index m = 0; m < M; ++m) {
          if (!distinct.count(static_cast<std::int32_t>(m))) {
            EXPECT_LE(static_cast<double>(r.probs(t, g * M + m)), lowest_kept) << "a dropped expert ranks above a kept one";
          }
        }
      }
      // Weights: p of each slot over the sum of the token's kept p, across all groups: they sum to 1.
      double weight_sum = 0;
      for (Index s = 0; s < G * k; ++s) {
        const double p = static_cast<double>(r.probs(t, (s / k) * M + r.experts(t, s)));
        EXPECT_NEAR(static_cast<double>(r.weights(t, s)), p / kept_sum, 4 * eps<S>());
        weight_sum += static_cast<double>(r.weights(t, s));
      }
      EXPECT_NEAR(weight_sum, 1.0, 2 * static_cast<double>(G * k + 1) * eps<S>()) << "token " << t;
    }
  }
}

// Exact ties from one-hot tokens: x_t = e_t makes logit (t, e) = W(e, t) exactly, whatever the GEMM.
TYPED_TEST(LayersTest, RouterBreaksTiesByLowerIndexAndRanksOnLogits) {
  using S = TypeParam;
  // N = 6, G = 2 (M = 3); rows of W are experts g*M + m, column t is token t's logits.
  const S tiny = S(1e-9);  // exp(-1e-9) rounds to 1 in float: equal p, different logits
  const std::vector<std::vector<S>> logits = {
      // token:   0      1     2     3
      /* e0 */ {1, 2, 7, 0},
      /* e1 */ {3, 2, 7, tiny},
      /* e2 */ {3, 1, 7, 0},
      /* e3 */ {5, 0, -1, 3},
      /* e4 */ {5, 4, -1, 3},
      /* e5 */ {5, 4, 2, -2},
  };
  // Expected kept experts (m within the group), slot order, for k = 2 and k = 3.
  const std::vector<std::vector<std::int32_t>> want_k2 = {{1, 2, 0, 1}, {0, 1, 1, 2}, {0, 1, 2, 0}, {1, 0, 0, 1}};
  const std::vector<std::vector<std::int32_t>> want_k3 = {
      {1, 2, 0, 0, 1, 2}, {0, 1, 2, 1, 2, 0}, {0, 1, 2, 2, 0, 1}, {1, 0, 2, 0, 1, 2}};
  for (Index k : {2, 3}) {
    SCOPED_TRACE("k = " + std::to_string(k));
    gqe::Router<S> router(gqe_config(4, 6, 2, k));
    for (Index e = 0; e < 6; ++e)
      for (Index t = 0; t < 4; ++t) matrix_of<S>(router.weight())(e, t) = logits[static_cast<std::size_t>(e)][static_cast<std::size_t>(t)];
    const Matrix<S> x = Matrix<S>::Identity(4, 4);  // [4, 4], one-hot tokens
    gqe::Routing<S> r;
    router.route(x, r);
    const auto& want = k == 2 ? want_k2 : want_k3;
    for (Index t = 0; t < 4; ++t) {
      for (Index s = 0; s < 2 * k; ++s)
        EXPECT_EQ(r.experts(t, s), want[static_cast<std::size_t>(t)][static_cast<std::size_t>(s)]) << "token " << t << " slot " << s;
      EXPECT_NEAR(static_cast<double>(r.weights.row(t).sum()), 1.0, 8 * eps<S>());
    }
  }
}

TYPED_TEST(LayersTest, RouterKeepsChoicesInRangeWhenLogitsAreNaN) {
  using S = TypeParam;
  const S nan = std::numeric_limits<S>::quiet_NaN();
  std::mt19937 rng(61);
  for (Index k : {1, 2, 3}) {
    SCOPED_TRACE("k = " + std::to_string(k));
    const AttentionConfig c = gqe_config(7, 12, 4, k);  // M = 3
    gqe::Router<S> router(c);
    matrix_of<S>(router.weight()) = random_matrix<S>(12, 7, rng);  // [G*M, d]
    matrix_of<S>(router.weight())(1, 2) = nan;                     // group 0: one NaN logit
    matrix_of<S>(router.weight()).middleRows(3, 3).setConstant(nan);  // group 1: all NaN
    matrix_of<S>(router.weight())(8, 0) = nan;                     // group 2: expert 2 NaN
    const Matrix<S> x = random_matrix<S>(9, 7, rng);  // [9, d]
    gqe::Routing<S> r;
    router.route(x, r);
    for (Index t = 0; t < 9; ++t)
      for (Index g = 0; g < 4; ++g) {
        std::set<std::int32_t> distinct;
        for (Index j = 0; j < k; ++j) {
          const std::int32_t m = r.experts(t, g * k + j);
          EXPECT_GE(m, 0) << "token " << t << " group " << g;
          EXPECT_LT(m, 3) << "token " << t << " group " << g;
          distinct.insert(m);
        }
        EXPECT_EQ(static_cast<Index>(distinct.size()), k) << "token " << t << " group " << g;
      }
    // Group 3 has no NaN: it routes as it would without the others.
    gqe::Router<S> clean(c);
    matrix_of<S>(clean.weight()) = matrix_of<S>(router.weight());
    matrix_of<S>(clean.weight()).topRows(9).setZero();
    gqe::Routing<S> rc;
    clean.route(x, rc);
    EXPECT_TRUE((r.experts.rightCols(k).array() == rc.experts.rightCols(k).array()).all());
  }
}

// ---- RoutingStats -----------------------------------------------------------------------------------

TYPED_TEST(LayersTest, RoutingStatsLoadAndAuxLossFollowTheDocumentedFormula) {
  using S = TypeParam;
  std::mt19937 rng(62);
  const AttentionConfig c = gqe_config(37, 12, 4, 2);  // G = 4, M = 3, k = 2
  const Index G = 4, M = 3, k = 2, d = 37;
  gqe::Router<S> router(c);
  matrix_of<S>(router.weight()) = random_matrix<S>(G * M, d, rng, 2 / std::sqrt(static_cast<double>(d)));
  const Matrix<S> x1 = random_matrix<S>(130, d, rng), x2 = random_matrix<S>(7, d, rng);  // [130, d], [7, d]
  gqe::Routing<S> r1, r2;
  router.route(x1, r1);
  router.route(x2, r2);
  gqe::RoutingStats stats;
  stats.add(r1);
  stats.add(r2);  // accumulates over calls
  ASSERT_EQ(stats.tokens, 137);

  // By hand from the double-precision softmax and the reference's top-k of the double logits.
  MatrixD x(137, d);
  x.topRows(130) = to_double(x1);
  x.bottomRows(7) = to_double(x2);
  const MatrixD logits = x * to_double(matrix_of<S>(router.weight())).transpose();  // [137, G*M]
  Eigen::ArrayXXd f = Eigen::ArrayXXd::Zero(G, M), P = Eigen::ArrayXXd::Zero(G, M);
  for (Index t = 0; t < 137; ++t)
    for (Index g = 0; g < G; ++g) {
      double sum = 0;
      for (Index m = 0; m < M; ++m) sum += std::exp(logits(t, g * M + m));
      for (Index m = 0; m < M; ++m) P(g, m) += std::exp(logits(t, g * M + m)) / sum / 137;
      // The expert not kept (k = M - 1) is the one of smallest logit.
      Index worst = 0;
      for (Index m = 1; m < M; ++m)
        if (logits(t, g * M + m) < logits(t, g * M + worst)) worst = m;
      for (Index m = 0; m < M; ++m)
        if (m != worst) f(g, m) += 1.0 / 137;
    }
  double aux = 0;  // mean over groups of M * sum_m f[g, m] * P[g, m]
  for (Index g = 0; g < G; ++g) {
    double s = 0;
    for (Index m = 0; m < M; ++m) s += f(g, m) * P(g, m);
    aux += static_cast<double>(M) * s / static_cast<double>(G);
  }
  const Eigen::ArrayXXd load = stats.load();
  for (Index g = 0; g < G; ++g) {
    EXPECT_NEAR(load.row(g).sum(), static_cast<double>(k), 1e-12) << "group " << g;
    for (Index m = 0; m < M; ++m) {
      EXPECT_NEAR(load(g, m), f(g, m), 1e-12) << "group " << g << " expert " << m;
      EXPECT_NEAR(stats.mean_prob()(g, m), P(g, m), (4 * std::sqrt(static_cast<double>(d)) + 8) * eps<S>());
    }
  }
  // aux = (M/G) sum f P with sum f = G k: an error of delta in every P moves it by at most M k delta.
  EXPECT_NEAR(stats.aux_loss(), aux, static_cast<double>(M * k) * (4 * std::sqrt(static_cast<double>(d)) + 8) * eps<S>());
}

TYPED_TEST(LayersTest, UniformRoutingGivesAuxLossK) {
  using S = TypeParam;
  std::mt19937 rng(63);
  for (const auto& c : {gqe_config(37, 6, 3, 1), gqe_config(37, 12, 4, 2), gqe_config(29, 6, 2, 3)}) {
    const Index G = c.num_kv_heads, M = c.experts_per_group(), k = c.top_k;
    SCOPED_TRACE("M = " + std::to_string(M) + ", k = " + std::to_string(k));
    gqe::Router<S> router(c);
    matrix_of<S>(router.weight()).setZero();  // the authors' initialisation: p = 1/M everywhere
    const Matrix<S> x = random_matrix<S>(65, c.hidden_size, rng);
    gqe::Routing<S> r;
    router.route(x, r);
    gqe::RoutingStats stats;
    stats.add(r);
    // p = 1/M rounded to S (u relative), then summed over the 65 tokens in double ((65 - 1) u of
    // double): aux = M * sum_m f P / G = k (1 + both).
    EXPECT_NEAR(stats.aux_loss(), static_cast<double>(k),
                static_cast<double>(k) * (eps<S>() + 65 * std::numeric_limits<double>::epsilon()));
    // All logits tie, so every token keeps experts 0 .. k-1 (lower index first).
    for (Index g = 0; g < G; ++g)
      for (Index m = 0; m < M; ++m) EXPECT_EQ(stats.load()(g, m), m < k ? 1.0 : 0.0);
    EXPECT_NEAR(stats.mean_entropy(), std::log(static_cast<double>(M)), 4 * static_cast<double>(M) * eps<S>());
  }
}

// A call whose segments do not tile the rows, continue a cache of another layer's shape, or share a
// cache is refused with ShapeError before any cache is written.
TYPED_TEST(LayersTest, AttentionRefusesSegmentsThatDoNotTileTheRowsOrShareACache) {
  using S = TypeParam;
  std::mt19937 rng(71);
  for (const auto& c : {LayerCase{"", AttentionType::gqa, GqeVariant::gqe, 24, 4, 2, 10, 1}.config(), gqe_config(24, 4, 2, 1)}) {
    SCOPED_TRACE(c.is_gqe() ? "gqe" : "gqa");
    gqe::Attention<S> layer(c);
    randomise<S>(layer, rng);
    const Matrix<S> x = random_matrix<S>(6, c.hidden_size, rng);  // [6, d]
    AttentionConfig other = c;
    other.num_kv_heads = 1;
    other.num_heads = c.num_heads / c.num_kv_heads;
    gqe::AttentionCache<S> a(c), b(c), foreign(other);
    EXPECT_THROW(run<S>(layer, x, Segments<S>{{&a, 0, 3}, {&b, 4, 2}}), gqe::ShapeError);   // a gap at row 3
    EXPECT_THROW(run<S>(layer, x, Segments<S>{{&a, 0, 3}, {&b, 3, 2}}), gqe::ShapeError);   // row 5 left out
    EXPECT_THROW(run<S>(layer, x, Segments<S>{{&a, 0, 3}, {&foreign, 3, 3}}), gqe::ShapeError);
    EXPECT_THROW(run<S>(layer, x, Segments<S>{{&a, 0, 3}, {&b, 3, 1}, {&a, 4, 2}}), gqe::ShapeError);
    EXPECT_EQ(a.length(), 0);
    EXPECT_EQ(b.length(), 0);
    EXPECT_EQ(foreign.length(), 0);
    run<S>(layer, x, Segments<S>{{&a, 0, 3}, {&b, 3, 3}});  // the same call, well formed
    EXPECT_EQ(a.length(), 3);
    EXPECT_EQ(b.length(), 3);
  }
}

// ---- config validation ------------------------------------------------------------------------------

// Constructing `Layer` from c throws ConfigError whose message names `field`.
template <class Layer>
void expect_config_error(const AttentionConfig& c, const std::string& field) {
  try {
    Layer layer(c);
    ADD_FAILURE() << "accepted a config with a bad " << field;
  } catch (const gqe::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << "message: " << e.what();
  }
}

TEST(LayerConfig, InvalidConfigsThrowAConfigErrorNamingTheField) {
  using GQE = gqe::Attention<double>;
  using GQA = gqe::Attention<double>;
  const AttentionConfig good = gqe_config(37, 6, 3, 1);
  EXPECT_NO_THROW(GQE{good});
  AttentionConfig gqa_good = good;
  gqa_good.type = AttentionType::gqa;
  EXPECT_NO_THROW(GQA{gqa_good});

  struct Bad {
    const char* field;
    void (*edit)(AttentionConfig&);
    bool gqe_only;
  };
  const Bad bad[] = {
      {"num_attention_heads", [](AttentionConfig& c) { c.num_heads = 7; }, false},  // N % G != 0
      {"gqe_top_k", [](AttentionConfig& c) { c.top_k = 0; }, true},
      {"gqe_top_k", [](AttentionConfig& c) { c.top_k = 3; }, true},  // k > M = 2
      {"head_dim", [](AttentionConfig& c) { c.head_dim = 7; }, false},
      {"hidden_size", [](AttentionConfig& c) { c.hidden_size = 0; }, false},
      {"num_attention_heads", [](AttentionConfig& c) { c.num_heads = 0; }, false},
      {"num_key_value_heads", [](AttentionConfig& c) { c.num_kv_heads = 0; }, false},
      {"head_dim", [](AttentionConfig& c) { c.head_dim = 0; }, false},
      {"hidden_size", [](AttentionConfig& c) { c.hidden_size = -3; }, false},
  };
  for (const auto& b : bad) {
    SCOPED_TRACE(b.field);
    AttentionConfig c = good;
    b.edit(c);
    expect_config_error<GQE>(c, b.field);
    if (!b.gqe_only) {
      c.type = AttentionType::gqa;
      expect_config_error<GQA>(c, b.field);
    }
  }
  EXPECT_THROW(gqe::FeedForward<double>(0, 5), gqe::ConfigError);
  EXPECT_THROW(gqe::FeedForward<double>(5, 0), gqe::ConfigError);
}

// The Router validates its config on construction, like the layers. Run in a child process so that
// a crash (rather than an exception) fails this test alone.
TEST(LayerConfig, RouterRefusesZeroKvHeadsWithAConfigError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  AttentionConfig c = gqe_config(37, 6, 3, 1);
  c.num_kv_heads = 0;
  EXPECT_EXIT(
      {
        try {
          gqe::Router<double> router(c);
        } catch (const gqe::ConfigError& e) {
          std::_Exit(std::string(e.what()).find("num_key_value_heads") != std::string::npos ? 0 : 2);
        }
        std::_Exit(1);
      },
      ::testing::ExitedWithCode(0), "");
}

// ---- FeedForward --------------------------------------------------------------------------------------

TYPED_TEST(LayersTest, FeedForwardIsSwiGLU) {
  using S = TypeParam;
  std::mt19937 rng(70);
  // 2500 rows: without a tape, runs of 1024 rows and a ragged last one.
  for (Index rows : {1, 7, 130, 2500}) {
    const Index d = 37, I = 300;  // I crosses linear's 256-output tile
    SCOPED_TRACE("rows = " + std::to_string(rows));
    gqe::FeedForward<S> ffn(d, I);
    Weights w;
    gqe::FeedForward<S>::visit(ffn, [&](const char* name, gqe::Weight& weight) {
      auto m = matrix_of<S>(weight);
      m = random_matrix<S>(m.rows(), m.cols(), rng, 1.5 / std::sqrt(static_cast<double>(m.cols())));
      w[name] = to_double(m);
    });
    ASSERT_EQ(w.at("gate_proj.weight").rows(), I);
    ASSERT_EQ(w.at("down_proj.weight").rows(), d);
    const Matrix<S> x = random_matrix<S>(rows, d, rng);  // [R, d]
    Matrix<S> y(rows, d);                                // [R, d]
    ffn.forward(x, y);
    // down_proj(silu(gate_proj(x)) * up_proj(x)), silu(z) = z / (1 + exp(-z)).
    const MatrixD xd = to_double(x);
    MatrixD h(rows, I);  // [R, I]
    for (Index r = 0; r < rows; ++r)
      for (Index i = 0; i < I; ++i) {
        double gate = 0, up = 0;
        for (Index c = 0; c < d; ++c) {
          gate += w.at("gate_proj.weight")(i, c) * xd(r, c);
          up += w.at("up_proj.weight")(i, c) * xd(r, c);
        }
        h(r, i) = gate / (1 + std::exp(-gate)) * up;
      }
    MatrixD ref(rows, d);  // [R, d]
    for (Index r = 0; r < rows; ++r)
      for (Index o = 0; o < d; ++o) {
        double s = 0;
        for (Index i = 0; i < I; ++i) s += w.at("down_proj.weight")(o, i) * h(r, i);
        ref(r, o) = s;
      }
    // Two products of length d, one of length I, and silu's few u: 4 (2 sqrt(d) + sqrt(I) + 8) eps.
    const double tol = 4 * (2 * std::sqrt(static_cast<double>(d)) + std::sqrt(static_cast<double>(I)) + 8) * eps<S>();
    EXPECT_LT(relative_error(y, ref), tol);

    // With a tape (all rows at once, every activation kept) the same result; with accumulate,
    // y0 + ffn(x). The library's kernels give the tape's run and the runs of rows the same bits.
    gqe::FeedForwardTape<S> tape;
    Matrix<S> taped(rows, d);  // [R, d]
    ffn.forward(x, taped, &tape);
    EXPECT_LT(relative_error(taped, ref), tol);
    if (std::string(gqe::backend::kName) == "eigen") {
      EXPECT_TRUE((taped.array() == y.array()).all());
    }
    ASSERT_EQ(tape.hidden.rows(), rows);
    const Matrix<S> y0 = random_matrix<S>(rows, d, rng);  // [R, d]
    Matrix<S> added = y0;
    ffn.forward(x, added, nullptr, true);
    EXPECT_LT(relative_error(added, to_double(y0) + ref), tol);
  }
}

}  // namespace
