// Whole models against the float64 NumPy reference (tools/gqe_reference.py): every fixture folder
// of tests/data holds a checkpoint and expected.safetensors (prompt_ids, logits, and for GQE the
// expert indices, router probabilities and load-balancing loss). Checked in-process in float and
// double, prefill and stepwise, and through gqe-run --logits-out as users run it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <limits>
#include <set>
#include <filesystem>
#include <string>
#include <vector>

#include "gqe/gqe.hpp"

namespace {

namespace fs = std::filesystem;
using gqe::Index;

std::vector<std::string> fixtures() {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(GQE_TEST_DATA_DIR))
    if (fs::exists(entry.path() / "expected.safetensors")) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

struct Expected {
  std::vector<std::int32_t> prompt;
  Eigen::MatrixXd logits;  // [T, V]
  std::vector<std::int32_t> experts;   // [L, T, G, k], empty for GQA
  std::vector<double> router_probs;    // [L, T, G, M]
  std::vector<double> aux_loss;        // [L]
};

Expected read_expected(const fs::path& dir) {
  const auto file = gqe::SafetensorsFile::read(dir / "expected.safetensors");
  Expected e;
  e.prompt = file.read_as<std::int32_t>("prompt_ids");
  const auto& rec = file.at("logits");
  e.logits.resize(rec.shape[0], rec.shape[1]);
  const auto values = file.read_as<double>("logits");
  for (Index t = 0; t < e.logits.rows(); ++t)
    for (Index v = 0; v < e.logits.cols(); ++v) e.logits(t, v) = values[static_cast<std::size_t>(t * e.logits.cols() + v)];
  if (file.find("expert_indices")) {
    e.experts = file.read_as<std::int32_t>("expert_indices");
    e.router_probs = file.read_as<double>("router_probs");
    e.aux_loss = file.read_as<double>("aux_loss");
  }
  return e;
}

// Norm-wise relative error of logits [T, V] (any layout with T*V values, row-major).
template <class Scalar>
double relative_error(const Scalar* got, const Eigen::MatrixXd& want) {
  double diff = 0;
  for (Index t = 0; t < want.rows(); ++t)
    for (Index v = 0; v < want.cols(); ++v) {
      const double d = static_cast<double>(got[t * want.cols() + v]) - want(t, v);
      diff += d * d;
    }
  return std::sqrt(diff) / want.norm();
}

// The fixtures' logits are O(1) after a few layers of width <= 40: float keeps about 1e-6 relative
// (measured 1e-7 to 4e-7), double about 1e-14; the bounds below leave a margin of 10 and more.
template <class Scalar>
constexpr double tolerance() {
  return std::is_same_v<Scalar, float> ? 5e-6 : 1e-12;
}

class Golden : public ::testing::TestWithParam<std::string> {
 protected:
  fs::path dir() const { return fs::path(GQE_TEST_DATA_DIR) / GetParam(); }

  template <class Scalar>
  void check_in_process() {
    const Expected e = read_expected(dir());
    const auto model = gqe::load_checkpoint<Scalar>(dir());
    const auto& c = model.config();
    const Index T = static_cast<Index>(e.prompt.size()), V = c.vocab_size, L = c.num_layers;
    ASSERT_EQ(e.logits.rows(), T);
    ASSERT_EQ(e.logits.cols(), V);
    const gqe::TensorView<const std::int32_t> ids(e.prompt.data(), gqe::Shape{1, T});

    // Prefill.
    std::vector<gqe::KVCache<Scalar>> caches{model.new_cache()};
    gqe::ForwardTrace<Scalar> trace;
    const auto logits = model.prefill(ids, caches, &trace);
    EXPECT_LT(relative_error(logits.data(), e.logits), tolerance<Scalar>()) << "prefill";

    if (c.attention_type == gqe::AttentionType::gqe) {
      const Index G = c.num_kv_heads, k = c.top_k, M = c.num_heads / G;
      ASSERT_EQ(trace.routing.size(), static_cast<std::size_t>(L));
      for (Index l = 0; l < L; ++l) {
        const auto& r = trace.routing[static_cast<std::size_t>(l)];
        gqe::RoutingStats stats;
        stats.add(r);
        EXPECT_NEAR(stats.aux_loss(), e.aux_loss[static_cast<std::size_t>(l)], 50 * std::numeric_limits<Scalar>::epsilon())
            << "aux loss of layer " << l;
        for (Index t = 0; t < T; ++t)
          for (Index g = 0; g < G; ++g) {
            for (Index j = 0; j < k; ++j)
              EXPECT_EQ(r.experts(t, g * k + j), e.experts[static_cast<std::size_t>(((l * T + t) * G + g) * k + j)])
                  << "layer " << l << " token " << t << " group " << g << " slot " << j;
            for (Index m = 0; m < M; ++m)
              EXPECT_NEAR(static_cast<double>(r.probs(t, g * M + m)),
                          e.router_probs[static_cast<std::size_t>(((l * T + t) * G + g) * M + m)],
                          100 * std::numeric_limits<Scalar>::epsilon());
          }
      }
    }

    // Stepwise: one token at a time through the cache.
    std::vector<gqe::KVCache<Scalar>> step_caches{model.new_cache()};
    gqe::Tensor<Scalar> stepwise(gqe::Shape{T, V});
    for (Index t = 0; t < T; ++t)
      model.forward(ids.reshape(gqe::Shape{T, 1}).slice(t, 1), step_caches, stepwise.view().slice(t, 1), true);
    EXPECT_LT(relative_error(stepwise.data(), e.logits), tolerance<Scalar>()) << "stepwise";
  }
};

TEST_P(Golden, FloatMatchesReference) { check_in_process<float>(); }
TEST_P(Golden, DoubleMatchesReference) { check_in_process<double>(); }

// Save and load again: the same logits, bit for bit, in the checkpoint's own precision.
TEST_P(Golden, SaveLoadRoundTripKeepsLogits) {
  const auto model = gqe::load_checkpoint<double>(dir());
  const fs::path copy = fs::temp_directory_path() / ("gqe-golden-" + GetParam());
  fs::remove_all(copy);
  gqe::save_checkpoint(model, copy, gqe::DType::F64);
  const auto again = gqe::load_checkpoint<double>(copy);
  const Expected e = read_expected(dir());
  const gqe::TensorView<const std::int32_t> ids(e.prompt.data(), gqe::Shape{1, static_cast<Index>(e.prompt.size())});
  std::vector<gqe::KVCache<double>> a{model.new_cache()}, b{again.new_cache()};
  const auto la = model.prefill(ids, a), lb = again.prefill(ids, b);
  EXPECT_TRUE(la.view().flat() == lb.view().flat());
  EXPECT_EQ(again.config().parameter_count(), model.config().parameter_count());
  fs::remove_all(copy);
}

#ifdef GQE_RUN_PATH
// gqe-run --logits-out in both modes, read back as a user's checker would.
TEST_P(Golden, GqeRunLogitsOutMatchesReference) {
  const Expected e = read_expected(dir());
  std::string ids;
  for (auto id : e.prompt) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  for (const char* mode : {"prefill", "stepwise"}) {
    const fs::path out = fs::temp_directory_path() / ("gqe-golden-" + GetParam() + "-" + mode + ".safetensors");
    const std::string command = std::string("\"") + GQE_RUN_PATH + "\" --model \"" + dir().string() + "\" --prompt-ids " +
                                ids + " --mode " + mode + " --logits-out \"" + out.string() + "\"";
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
    const auto file = gqe::SafetensorsFile::read(out);
    EXPECT_EQ(file.at("logits").dtype, gqe::DType::F32);
    EXPECT_EQ(file.at("logits").shape, (std::vector<std::int64_t>{e.logits.rows(), e.logits.cols()}));
    const auto logits = file.read_as<double>("logits");
    EXPECT_LT(relative_error(logits.data(), e.logits), 1e-5) << mode;  // float's own rounding is about 1e-6
    if (!e.experts.empty()) {
      EXPECT_EQ(file.at("expert_indices").dtype, gqe::DType::I32);
      EXPECT_EQ(file.read_as<std::int32_t>("expert_indices"), e.experts) << mode;
    } else {
      EXPECT_EQ(file.find("expert_indices"), nullptr);
    }
    EXPECT_EQ(file.metadata().at("format"), "pt");
    fs::remove(out);
  }
}

// How the weights are held changes nothing: mapped or read, 16-bit kept or widened at load, in
// panels or as stored, the logits file is the same, byte for byte.
TEST_P(Golden, GqeRunGivesTheSameBitsWhateverTheLoadOptions) {
  if (std::string(gqe::backend::kName) != "eigen")
    GTEST_SKIP() << "with the " << gqe::backend::kName << " backend, F32 weights and widened 16-bit ones take other kernels";
  const Expected e = read_expected(dir());
  std::string ids;
  for (auto id : e.prompt) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  std::vector<std::string> files;
  for (const char* options : {"", "--no-mmap", "--dtype f32", "--no-mmap --dtype f32", "--panels all", "--panels none",
                              "--no-mmap --panels all"}) {
    const fs::path out = fs::temp_directory_path() / ("gqe-golden-load-" + GetParam() + std::to_string(files.size()) + ".st");
    const std::string command = std::string("\"") + GQE_RUN_PATH + "\" --model \"" + dir().string() + "\" --prompt-ids " +
                                ids + " " + options + " --logits-out \"" + out.string() + "\"";
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
    std::ifstream in(out, std::ios::binary);
    files.emplace_back((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    fs::remove(out);
    EXPECT_EQ(files.back(), files.front()) << options;
  }
}

// gqe-run --perplexity on the prompt's bytes against the nats per byte that the reference logits
// give: the mean over t of logsumexp(logits[t]) - logits[t][prompt[t + 1]]. Byte-level fixtures only.
void check_perplexity(const std::string& name) {
  const fs::path folder = fs::path(GQE_TEST_DATA_DIR) / name;
  const Expected e = read_expected(folder);
  const Index T = static_cast<Index>(e.prompt.size());
  std::string bytes;
  for (auto id : e.prompt) bytes += static_cast<char>(id);
  const fs::path text = fs::temp_directory_path() / ("gqe-golden-" + name + ".txt");
  const fs::path out = fs::temp_directory_path() / ("gqe-golden-" + name + ".out");
  std::ofstream(text, std::ios::binary) << bytes;
  const std::string command = std::string("\"") + GQE_RUN_PATH + "\" --model \"" + folder.string() + "\" --perplexity \"" +
                              text.string() + "\" > \"" + out.string() + "\"";
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  std::ifstream in(out);
  const std::string printed((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  long predicted = 0;
  double nats = 0, bits = 0, ppl = 0;
  const auto at = printed.find(": ");
  ASSERT_NE(at, std::string::npos) << printed;
  ASSERT_EQ(std::sscanf(printed.c_str() + at + 2, "%ld bytes predicted, %lf nats per byte (%lf bits per byte), perplexity %lf",
                        &predicted, &nats, &bits, &ppl), 4)
      << printed;
  double want = 0;
  for (Index t = 0; t + 1 < T; ++t) {
    const double top = e.logits.row(t).maxCoeff();
    want += top + std::log((e.logits.row(t).array() - top).exp().sum()) - e.logits(t, e.prompt[static_cast<std::size_t>(t + 1)]);
  }
  want /= static_cast<double>(T - 1);
  EXPECT_EQ(predicted, T - 1);
  EXPECT_NEAR(nats, want, 1e-5 * want) << printed;
  EXPECT_NEAR(bits, want / std::log(2.0), 1e-5 * want) << printed;
  EXPECT_NEAR(ppl, std::exp(want), 1e-4 * std::exp(want)) << printed;
  fs::remove(text);
  fs::remove(out);
}

TEST(GoldenRun, PerplexityMatchesReference) {
  int checked = 0;
  for (const auto& name : fixtures())
    if (gqe::load_model_config(fs::path(GQE_TEST_DATA_DIR) / name / "config.json").vocab_size >= 256) {
      SCOPED_TRACE(name);
      check_perplexity(name);
      ++checked;
    }
  EXPECT_GE(checked, 2) << "expected byte-level fixtures (vocab_size >= 256) in tests/data";
}
#endif

INSTANTIATE_TEST_SUITE_P(Fixtures, Golden, ::testing::ValuesIn(fixtures()), [](const auto& info) { return info.param; });

TEST(GoldenFixtures, CoverEveryVariantAndDtype) {
  std::set<std::string> seen;
  for (const auto& name : fixtures()) {
    const auto c = gqe::load_model_config(fs::path(GQE_TEST_DATA_DIR) / name / "config.json");
    seen.insert(c.attention_type == gqe::AttentionType::gqa ? "gqa" : to_string(c.gqe_variant));
    if (c.attention_type == gqe::AttentionType::gqe) seen.insert(c.top_k == c.num_heads / c.num_kv_heads ? "k=M" : "k<M");
  }
  for (const char* want : {"gqa", "gqe", "hard_concat", "weighted_concat", "k=M", "k<M"}) EXPECT_TRUE(seen.count(want)) << want;
}

}  // namespace
