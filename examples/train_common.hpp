#pragma once
// What gqe-train and gqe-demo share: the comparison's options, the run of one model and seed under
// them, and the training progress bar.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "gqe/training.hpp"

namespace gqe::cli {

using training::RunConfig;
using TrainRun = training::Run<float>;

// Everything the command line sets; saved as comparison.json so that --resume OUT needs no flags.
struct Options {
  std::string task = "mqar";
  std::string text;
  std::string models = "gqa,gqe";  // which of the two models gqe-train trains (model_types)
  Index steps = 1200;
  Index batch = 32;
  Index seeds = 3;
  Index seq_len = 64;
  std::string out = "gqe-train-out";
  int threads = 0;
  std::string resume;
  double lr = 3e-3;
  Index warmup = 0;  // 0: 5% of the steps
  std::string schedule = "cosine";
  double aux_coef = 0.01;
  double weight_decay = 0.1;
  Index eval_every = 0;
  Index save_every = 200;
  Index hidden = 64;
  Index layers = 2;
  Index heads = 8;
  Index kv_heads = 4;
  Index head_dim = 16;
  Index intermediate = 128;
  Index top_k = 1;
  std::string variant = "gqe";
  Index mqar_pairs = 16;
  Index mqar_vocab = 128;
  bool throughput = false;

  nlohmann::ordered_json to_json() const {
    return {{"task", task},       {"text", text},         {"steps", steps},     {"batch", batch},
            {"seeds", seeds},     {"seq_len", seq_len},   {"lr", lr},           {"warmup", warmup},
            {"schedule", schedule}, {"aux_coef", aux_coef}, {"weight_decay", weight_decay},
            {"eval_every", eval_every}, {"save_every", save_every}, {"hidden", hidden}, {"layers", layers},
            {"heads", heads},     {"kv_heads", kv_heads}, {"head_dim", head_dim}, {"intermediate", intermediate},
            {"top_k", top_k},     {"variant", variant},   {"mqar_pairs", mqar_pairs}, {"mqar_vocab", mqar_vocab},
            {"models", models}};
  }
  void from_json(const nlohmann::json& j, const std::string& source) {
    try {
      task = j.at("task").get<std::string>();
      text = j.at("text").get<std::string>();
      steps = j.at("steps").get<Index>();
      batch = j.at("batch").get<Index>();
      seeds = j.at("seeds").get<Index>();
      seq_len = j.at("seq_len").get<Index>();
      lr = j.at("lr").get<double>();
      warmup = j.at("warmup").get<Index>();
      schedule = j.at("schedule").get<std::string>();
      aux_coef = j.at("aux_coef").get<double>();
      weight_decay = j.at("weight_decay").get<double>();
      eval_every = j.at("eval_every").get<Index>();
      save_every = j.at("save_every").get<Index>();
      hidden = j.at("hidden").get<Index>();
      layers = j.at("layers").get<Index>();
      heads = j.at("heads").get<Index>();
      kv_heads = j.at("kv_heads").get<Index>();
      head_dim = j.at("head_dim").get<Index>();
      intermediate = j.at("intermediate").get<Index>();
      top_k = j.at("top_k").get<Index>();
      variant = j.at("variant").get<std::string>();
      mqar_pairs = j.at("mqar_pairs").get<Index>();
      mqar_vocab = j.at("mqar_vocab").get<Index>();
      models = j.value("models", std::string("gqa,gqe"));  // comparisons saved before --models trained both
    } catch (const nlohmann::json::exception& e) {
      fail<FormatError>(source, " is not a gqe-train comparison (", e.what(), ")");
    }
  }
};

// --models: "gqa,gqe", "gqa" or "gqe" (either order; each at most once), in the order gqa, gqe.
inline std::vector<AttentionType> model_types(const std::string& models) {
  bool gqa = false, gqe = false;
  std::size_t pos = 0;
  while (pos <= models.size()) {
    const std::size_t comma = std::min(models.find(',', pos), models.size());
    const std::string item = models.substr(pos, comma - pos);
    bool& seen = item == "gqa" ? gqa : gqe;
    if ((item != "gqa" && item != "gqe") || seen)
      fail<ConfigError>("--models is \"", models, "\"; expected gqa,gqe, gqa or gqe (each model at most once)");
    seen = true;
    pos = comma + 1;
  }
  std::vector<AttentionType> types;
  if (gqa) types.push_back(AttentionType::gqa);
  if (gqe) types.push_back(AttentionType::gqe);
  return types;
}

// The run of one model and seed under the options.
inline RunConfig make_run(const Options& o, AttentionType type, std::uint64_t seed) {
  RunConfig r;
  r.task = training::task_from_string(o.task);
  ModelConfig& m = r.model;
  m.attention_type = type;
  m.gqe_variant = gqe_variant_from_string(o.variant);
  m.vocab_size = r.task == training::Task::mqar ? o.mqar_vocab : 256;
  m.hidden_size = o.hidden;
  m.intermediate_size = o.intermediate;
  m.num_layers = o.layers;
  m.num_heads = o.heads;
  m.num_kv_heads = o.kv_heads;
  m.head_dim = o.head_dim;
  m.top_k = o.top_k;
  m.rms_norm_eps = 1e-5;
  m.max_position_embeddings = std::max<Index>(4096, o.seq_len);
  r.optimizer.lr = o.lr;
  r.optimizer.weight_decay = o.weight_decay;
  r.optimizer.total_steps = o.steps;
  r.optimizer.warmup_steps = o.warmup > 0 ? o.warmup : std::max<Index>(1, o.steps / 20);
  r.optimizer.schedule = training::schedule_from_string(o.schedule);
  r.mqar.vocab_size = o.mqar_vocab;
  r.mqar.seq_len = o.seq_len;
  r.mqar.num_pairs = o.mqar_pairs;
  r.text_path = o.text.empty() ? std::string() : std::filesystem::absolute(o.text).string();
  r.batch = o.batch;
  r.seq_len = o.seq_len;
  r.aux_coef = o.aux_coef;
  r.seed = seed;
  r.eval_every = o.eval_every;
  r.save_every = o.save_every;
  r.validate();
  return r;
}

inline std::string run_name(AttentionType type, Index seed) {
  return std::string(type == AttentionType::gqa ? "gqa" : "gqe") + "-seed" + std::to_string(seed);
}

inline std::string duration(double seconds) {
  char buf[32];
  const long s = static_cast<long>(std::max(0.0, seconds) + 0.5);
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s / 60) % 60);
  else
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  return buf;
}

// A progress bar on stderr: redrawn in place on a terminal, a line every tenth otherwise.
class Progress {
 public:
  explicit Progress(std::string label) : label_(std::move(label)), tty_(isatty(2) != 0) {}

  void update(const training::StepInfo& s, const TrainRun& run) {
    const auto now = std::chrono::steady_clock::now();
    const bool last = s.step == s.total;
    const Index tenth = std::max<Index>(1, s.total / 10);
    if (tty_ && !last && now - drawn_ < std::chrono::milliseconds(200)) return;
    if (!tty_ && !last && s.step % tenth != 0) return;
    drawn_ = now;
    // EMA of the language-model loss, for a readable figure.
    const auto& h = run.history();
    double ema = 0, weight = 0;
    for (std::size_t i = h.size() > 50 ? h.size() - 50 : 0; i < h.size(); ++i) {
      ema = 0.9 * ema + 0.1 * h[i].lm_loss;
      weight = 0.9 * weight + 0.1;
    }
    const double loss = weight > 0 ? ema / weight : s.lm_loss;
    const int width = 24;
    const int filled = static_cast<int>(width * static_cast<double>(s.step) / static_cast<double>(s.total));
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.append(static_cast<std::size_t>(width - filled), '-');
    const double per_step = s.seconds / static_cast<double>(std::max<Index>(1, s.step));
    const double left = per_step * static_cast<double>(s.total - s.step);
    char acc[32] = "";
    if (!run.evals().empty()) std::snprintf(acc, sizeof acc, "  acc %.3f", run.evals().back().accuracy);
    std::fprintf(stderr, "%s%-12s [%s] %5ld/%ld  loss %.4f%s  %.1fk tok/s  left %s%s", tty_ ? "\r" : "", label_.c_str(),
                 bar.c_str(), static_cast<long>(s.step), static_cast<long>(s.total), loss, acc, s.tokens_per_second / 1000,
                 duration(left).c_str(), tty_ ? "\033[K" : "\n");
    if (tty_ && last) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  std::string label_;
  bool tty_;
  std::chrono::steady_clock::time_point drawn_{};
};

// Whole-model training FLOPs per sequence (forward + backward = 3 x forward), from the attention
// FLOP model of docs/flop-model.md plus the feed-forward and lm_head.
inline double train_flops(const ModelConfig& m, Index T) {
  const double t = static_cast<double>(T), d = static_cast<double>(m.hidden_size);
  const double ffn = 2 * t * 3 * d * static_cast<double>(m.intermediate_size);
  const double layer = m.attention().prefill_flops(T) + ffn;
  return 3 * (static_cast<double>(m.num_layers) * layer + 2 * t * d * static_cast<double>(m.vocab_size));
}

}  // namespace gqe::cli
