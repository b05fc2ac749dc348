// gqe-run: runs a checkpoint folder on a prompt, as docs/gqe-run.md describes: logits and expert
// choices to a safetensors file, routing statistics and timings, and sampled continuations streamed
// to stdout (stopping at the model's eos_token_id). With --perplexity FILE instead of a prompt, it
// reports a byte-level model's nats per byte and perplexity on a text file. Exit status 2, with one
// line on stderr, on any input the user can fix.
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cli_common.hpp"
#include "gqe/gqe.hpp"

namespace {

// Tokens generated when a prompt comes with no output flag at all (no --generate, --logits-out or
// --stats), so that a first call shows something; fewer when the context is shorter.
constexpr gqe::Index kDefaultContinuation = 32;

struct Options {
  std::string model;
  std::optional<std::string> prompt;
  std::optional<std::string> prompt_ids;
  std::optional<gqe::Index> generate;  // absent: kDefaultContinuation or nothing, as above
  gqe::SamplerConfig sampler;
  int threads = gqe::default_thread_count();
  std::string mode = "prefill";
  std::optional<gqe::Index> chunk;  // --chunk N: prompt tokens per forward pass (default: all)
  std::optional<std::string> logits_out;
  bool stats = false;
  bool print_ids = false;
  bool ignore_eos = false;
  std::optional<std::string> perplexity;
  gqe::LoadOptions load;  // --no-mmap, --dtype f32
  // Sampling flags given on the command line, for the warnings of those that have no effect.
  bool top_k_given = false, top_p_given = false, seed_given = false, temperature_given = false;
  std::optional<gqe::Index> window;  // --window T: whole, non-overlapping windows of T inputs
  std::optional<std::string> range;  // --range START:END: the byte range they tile
};

// "1 token", "5 tokens".
std::string tokens(gqe::Index n) { return std::to_string(n) + (n == 1 ? " token" : " tokens"); }

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// One line per sampling flag that the run ignores: greedy decoding ignores --top-k, --top-p and
// --seed; without generation every sampling flag is ignored.
std::vector<std::string> ignored_flags(const Options& opt, gqe::Index generate, gqe::Index vocab) {
  std::vector<std::string> lines;
  if (generate == 0) {
    for (const auto& [given, flag] : {std::pair{opt.temperature_given, "--temperature"}, std::pair{opt.top_k_given, "--top-k"},
                                      std::pair{opt.top_p_given, "--top-p"}, std::pair{opt.seed_given, "--seed"},
                                      std::pair{opt.print_ids, "--print-ids"}, std::pair{opt.ignore_eos, "--ignore-eos"}})
      if (given) lines.push_back(std::string(flag) + " has no effect: no tokens are generated (add --generate N)");
    return lines;
  }
  if (opt.sampler.temperature == 0) {
    for (const auto& [given, flag] : {std::pair{opt.top_k_given, "--top-k"}, std::pair{opt.top_p_given, "--top-p"},
                                      std::pair{opt.seed_given, "--seed"}})
      if (given)
        lines.push_back(std::string(flag) +
                        " has no effect with temperature 0 (greedy decoding: always the most likely token); "
                        "add --temperature T > 0 to sample");
  } else if (opt.sampler.top_k >= vocab) {
    lines.push_back("--top-k " + std::to_string(opt.sampler.top_k) + " has no effect: the vocabulary has only " +
                    std::to_string(vocab) + " tokens");
  }
  return lines;
}

// Per-layer routing statistics, one block per layer, to stderr.
void print_stats(const std::vector<gqe::RoutingStats>& layers) {
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& s = layers[l];
    const auto load = s.load();
    std::fprintf(stderr, "layer %zu: tokens %td, aux_loss %.4f (uniform %td), entropy %.4f nats (max %.4f)\n", l,
                 s.tokens, s.aux_loss(), s.top_k, s.mean_entropy(), std::log(static_cast<double>(s.experts_per_group)));
    for (gqe::Index g = 0; g < s.groups; ++g) {
      std::fprintf(stderr, "  group %td load:", g);
      for (gqe::Index m = 0; m < s.experts_per_group; ++m) std::fprintf(stderr, " %.3f", load(g, m));
      std::fprintf(stderr, "\n");
    }
  }
}

template <class Scalar>
int run(const Options& opt) {
  const auto load_start = Clock::now();
  const gqe::Transformer<Scalar> model = gqe::load_checkpoint<Scalar>(opt.model, opt.load);
  const double load_seconds = seconds_since(load_start);
  const gqe::ModelConfig& config = model.config();
  const std::vector<std::int32_t> prompt =
      opt.prompt ? gqe::cli::bytes_to_ids(*opt.prompt) : gqe::cli::parse_ids(*opt.prompt_ids);
  const gqe::Index T = static_cast<gqe::Index>(prompt.size()), V = config.vocab_size;
  if (T == 0) gqe::fail<gqe::InputError>("the prompt is empty; expected at least one token");
  for (gqe::Index t = 0; t < T; ++t)
    if (prompt[static_cast<std::size_t>(t)] >= V)
      gqe::fail<gqe::InputError>("prompt token ", t, " is ", prompt[static_cast<std::size_t>(t)],
                                 "; expected an id below vocab_size = ", V);
  if (T > config.max_position_embeddings || (opt.generate && T + *opt.generate > config.max_position_embeddings))
    gqe::fail<gqe::InputError>("a prompt of ", tokens(T), " plus ", tokens(opt.generate.value_or(0)),
                               " to generate exceeds max_position_embeddings = ", config.max_position_embeddings);
  const bool continuation_by_default = !opt.generate && !opt.logits_out && !opt.stats;
  const gqe::Index generate =
      opt.generate ? *opt.generate
                   : (continuation_by_default ? std::min(kDefaultContinuation, config.max_position_embeddings - T) : 0);
  gqe::Sampler sampler(opt.sampler);

  std::vector<gqe::KVCache<Scalar>> caches{model.new_cache()};
  caches[0].reserve(T + generate);
  // Every prompt position's logits only when they are written out; else the last one's (the head
  // of a large vocabulary would cost more than the whole prompt's layers).
  const bool every_position = static_cast<bool>(opt.logits_out);
  const gqe::Index rows = every_position ? T : 1;
  gqe::Tensor<Scalar> logits(gqe::Shape{1, rows, V});  // [1, rows, V]
  const bool routed = config.attention_type == gqe::AttentionType::gqe;
  // The routing is traced only for what was asked of it: expert choices go into --logits-out's
  // file, statistics to --stats.
  const bool keep_experts = routed && opt.logits_out, keep_stats = routed && opt.stats;
  const gqe::Index L = config.num_layers, G = config.num_kv_heads, k = config.top_k;
  gqe::Tensor<std::int32_t> experts(keep_experts ? gqe::Shape{L, T, G, k} : gqe::Shape{0, 0, 0, 0});  // [L, T, G, k]
  std::vector<gqe::RoutingStats> stats(static_cast<std::size_t>(keep_stats ? L : 0));
  gqe::ForwardTrace<Scalar> trace;
  gqe::ForwardTrace<Scalar>* const traced = keep_experts || keep_stats ? &trace : nullptr;
  // Records the routing of prompt rows [first, first + count) from the last call.
  const auto record = [&](gqe::Index first, gqe::Index count) {
    for (gqe::Index l = 0; l < (traced ? L : 0); ++l) {
      const auto& r = trace.routing[static_cast<std::size_t>(l)];  // experts [count, G*k], row-major
      if (keep_stats) stats[static_cast<std::size_t>(l)].add(r);
      if (keep_experts) std::copy_n(r.experts.data(), count * G * k, experts.view()[l][first].data());
    }
  };
  // The prompt goes through the model in chunks appended to the cache: all of it at once, --chunk N
  // tokens at a time (activations for N tokens, not T), or one token at a time (stepwise). The
  // logits do not depend on the cut (batch invariance), bit for bit.
  const gqe::Index chunk = opt.mode == "stepwise" ? 1 : std::min(opt.chunk.value_or(T), T);
  const gqe::TensorView<const std::int32_t> ids(prompt.data(), gqe::Shape{T});
  const auto prompt_start = Clock::now();
  for (gqe::Index first = 0; first < T; first += chunk) {
    const gqe::Index n = std::min(chunk, T - first);
    const auto part = ids.slice(first, n).reshape(gqe::Shape{1, n});  // [1, n]
    if (every_position)
      model.forward(part, caches, logits.view()[0].slice(first, n).reshape(gqe::Shape{1, n, V}), false, traced);
    else
      model.forward(part, caches, logits.view()[0], true, traced);  // [1, V]: the last chunk's last token is kept
    record(first, n);
  }
  const double prompt_seconds = seconds_since(prompt_start);

  // Generation: stream each token as it comes, as bytes when the vocabulary is byte-level and
  // --print-ids is not given, else as space-separated ids. An eos token ends it, unprinted.
  const bool as_text = V <= 256 && !opt.print_ids;
  const std::vector<std::int32_t>& eos = config.eos_token_ids;
  gqe::Tensor<Scalar> step_logits(gqe::Shape{1, V});
  const Scalar* last = logits.view()[0][rows - 1].data();
  gqe::Index printed = 0, decode_steps = 0;
  std::optional<std::int32_t> stopped_at;
  double decode_seconds = 0;
  for (gqe::Index i = 0; i < generate; ++i) {
    const std::int32_t next = sampler.sample(last, V);
    if (!opt.ignore_eos && std::find(eos.begin(), eos.end(), next) != eos.end()) {
      stopped_at = next;
      break;
    }
    if (as_text)
      std::fputc(static_cast<unsigned char>(next), stdout);
    else
      std::fprintf(stdout, printed ? " %d" : "%d", next);
    gqe::cli::check_stdout();  // a full disk or a closed pipe stops the run here
    ++printed;
    if (i + 1 == generate) break;
    const auto step_start = Clock::now();
    model.forward(gqe::TensorView<const std::int32_t>(&next, gqe::Shape{1, 1}), caches, step_logits.view(), true);
    decode_seconds += seconds_since(step_start);
    ++decode_steps;
    last = step_logits.data();
  }
  if (generate > 0 && !as_text) std::fputc('\n', stdout);  // the line ends also when eos came first
  gqe::cli::check_stdout();

  // The outputs, only now that everything else succeeded: a run that fails leaves no file.
  if (opt.logits_out) gqe::cli::write_logits(*opt.logits_out, logits, keep_experts ? &experts : nullptr);

  // Notes and warnings only for a run that succeeded: one that fails prints its error alone.
  if (continuation_by_default && generate == 0)  // this note says why nothing follows; no warnings besides
    std::fprintf(stderr, "gqe-run: the prompt fills all %td positions of the model; no room for a continuation\n",
                 config.max_position_embeddings);
  else
    for (const auto& line : ignored_flags(opt, generate, V)) std::fprintf(stderr, "gqe-run: warning: %s\n", line.c_str());

  if (opt.stats) {  // routing statistics of the prompt, then timings (wall-clock)
    if (routed)
      print_stats(stats);
    else
      std::fprintf(stderr, "attention_type is gqa: every query head is active, no routing statistics\n");
    const auto rate = [](gqe::Index tokens, double seconds) { return seconds > 0 ? static_cast<double>(tokens) / seconds : 0.0; };
    if (const std::string warning = gqe::gemm_backend_warning(); !warning.empty())
      std::fprintf(stderr, "warning: %s\n", warning.c_str());
    std::fprintf(stderr, "load: %.1f ms (%s, %td parameters, panels %s)\n", 1e3 * load_seconds, opt.model.c_str(),
                 config.parameter_count(), gqe::panel_layout_name(opt.load.panels));
    const std::string prompt_name = opt.mode == "stepwise" ? "prompt, stepwise"
                                    : chunk < T            ? "prefill in chunks of " + std::to_string(chunk)
                                                           : "prefill";
    std::fprintf(stderr, "%s: %s in %.2f ms, %.1f tokens/s\n", prompt_name.c_str(), tokens(T).c_str(), 1e3 * prompt_seconds,
                 rate(T, prompt_seconds));
    if (decode_steps > 0)
      std::fprintf(stderr, "decode: %s in %.2f ms, %.1f tokens/s\n", tokens(decode_steps).c_str(), 1e3 * decode_seconds,
                   rate(decode_steps, decode_seconds));
    else
      std::fprintf(stderr, "decode: no step (%s generated)\n", tokens(printed).c_str());
    if (stopped_at)
      std::fprintf(stderr, "generation: stopped at eos_token_id %d after %s\n", *stopped_at, tokens(printed).c_str());
  }
  return 0;
}


// Nats per byte of a text file, the bytes read as token ids 0..255: every byte after the first is
// predicted once, from the bytes before it in its window. Windows of up to max_position_embeddings
// bytes (at most kPerplexityWindow) overlap by one byte, each starting from an empty cache.
//
// With --window T and/or --range START:END (byte offsets, END exclusive; default the whole file):
// non-overlapping windows of T inputs tile the range from START, and only whole ones count. Window
// i feeds bytes START + iT .. START + iT + T - 1 from an empty cache and predicts each next byte,
// for every i whose last target byte START + iT + T lies before END; bytes left over at the end of
// the range are not scored. T defaults to min(max_position_embeddings, kPerplexityWindow).
constexpr gqe::Index kPerplexityWindow = 1024;

// "START:END" -> {START, END}: decimal byte offsets with START < END <= size.
std::pair<gqe::Index, gqe::Index> parse_range(const std::string& text, gqe::Index size) {
  const std::size_t colon = text.find(':');
  const auto number = [](const std::string& item, gqe::Index& out) {
    if (item.empty() || item.size() > 18 || item.find_first_not_of("0123456789") != std::string::npos) return false;
    out = static_cast<gqe::Index>(std::stoll(item));
    return true;
  };
  gqe::Index start = 0, end = 0;
  if (colon == std::string::npos || !number(text.substr(0, colon), start) || !number(text.substr(colon + 1), end) ||
      start >= end)
    gqe::fail<gqe::InputError>("--range is \"", text, "\"; expected START:END, byte offsets with START < END");
  if (end > size)
    gqe::fail<gqe::InputError>("--range ", text, " ends past the text's ", size, " bytes; expected END <= ", size);
  return {start, end};
}

// Sums the cross-entropy of windows of `len` inputs at the given byte offsets of ids, all from
// empty caches, several windows per forward call.
template <class Scalar>
double window_nats(const gqe::Transformer<Scalar>& model, const std::vector<std::int32_t>& ids,
                   const std::vector<gqe::Index>& offsets, gqe::Index len, bool tty) {
  const gqe::Index V = model.config().vocab_size;
  const gqe::Index per_call = std::max<gqe::Index>(1, std::min<gqe::Index>(64, 8192 / len));
  double nats = 0;
  for (std::size_t first = 0; first < offsets.size(); first += static_cast<std::size_t>(per_call)) {
    const gqe::Index B = std::min<gqe::Index>(per_call, static_cast<gqe::Index>(offsets.size() - first));
    std::vector<std::int32_t> inputs, targets;
    for (gqe::Index b = 0; b < B; ++b) {
      const auto at = ids.begin() + offsets[first + static_cast<std::size_t>(b)];
      inputs.insert(inputs.end(), at, at + len);
      targets.insert(targets.end(), at + 1, at + len + 1);
    }
    std::vector<gqe::KVCache<Scalar>> caches;
    for (gqe::Index b = 0; b < B; ++b) caches.push_back(model.new_cache());
    gqe::Tensor<Scalar> logits(gqe::Shape{B, len, V});  // [B, len, V]
    model.forward(gqe::TensorView<const std::int32_t>(inputs.data(), gqe::Shape{B, len}), caches, logits.view(), false);
    const std::vector<float> weights(static_cast<std::size_t>(B * len), 1.0f);
    nats += gqe::cross_entropy<Scalar>(gqe::MatrixMap<Scalar>(logits.data(), B * len, V), targets, weights, 0.0).loss;
    if (tty)
      std::fprintf(stderr, "\rperplexity: %3.0f%%",
                   100.0 * static_cast<double>(first + static_cast<std::size_t>(B)) / static_cast<double>(offsets.size()));
  }
  return nats;
}

template <class Scalar>
int perplexity(const Options& opt) {
  const std::filesystem::path path = *opt.perplexity;
  const std::string text = gqe::read_whole_file(path, "a text file for --perplexity");
  const bool tiled = opt.window || opt.range;
  if (!tiled && text.size() < 2)
    gqe::fail<gqe::InputError>("--perplexity ", path.string(), " holds ", text.size(),
                               " bytes; expected at least 2 (one to predict from, one to predict)");
  const gqe::Index n = static_cast<gqe::Index>(text.size());
  const auto [start, end] = opt.range ? parse_range(*opt.range, n) : std::pair<gqe::Index, gqe::Index>{0, n};
  const gqe::Transformer<Scalar> model = gqe::load_checkpoint<Scalar>(opt.model, opt.load);
  const gqe::Index V = model.config().vocab_size, max_positions = model.config().max_position_embeddings;
  if (V < 256)
    gqe::fail<gqe::InputError>("--perplexity reads bytes as token ids 0..255; the model's vocab_size is ", V,
                               ", expected at least 256");
  if (opt.window && *opt.window > max_positions)
    gqe::fail<gqe::InputError>("--window is ", *opt.window, "; expected at most the model's max_position_embeddings = ",
                               max_positions);
  const gqe::Index window = opt.window ? *opt.window : std::min(max_positions, kPerplexityWindow);
  if (!tiled && window < 2)
    gqe::fail<gqe::InputError>("the model's max_position_embeddings is ", window, "; --perplexity needs at least 2");

  const std::vector<std::int32_t> ids = gqe::cli::bytes_to_ids(text);
  const bool tty = isatty(2) != 0;
  double nats = 0;
  gqe::Index predicted = 0;
  if (tiled) {
    // Window i counts when its last target byte, start + i*window + window, lies before end.
    const gqe::Index windows = (end - start - 1) / window;
    if (windows < 1)
      gqe::fail<gqe::InputError>(opt.range ? "--range " + *opt.range : "--perplexity " + path.string(), " holds ",
                                 end - start, " bytes; a window of ", window, " needs ", window + 1,
                                 " (its inputs and the byte after them)");
    std::vector<gqe::Index> offsets;
    for (gqe::Index i = 0; i < windows; ++i) offsets.push_back(start + i * window);
    nats = window_nats(model, ids, offsets, window, tty);
    predicted = windows * window;
  } else {
    for (gqe::Index first = 0; first + 1 < n; first += window - 1) {
      const gqe::Index len = std::min(window, n - first);
      std::vector<gqe::KVCache<Scalar>> caches{model.new_cache()};
      gqe::Tensor<Scalar> logits(gqe::Shape{1, len, V});  // [1, len, V]
      model.forward(gqe::TensorView<const std::int32_t>(ids.data() + first, gqe::Shape{1, len}), caches, logits.view(), false);
      // Row t predicts byte first + t + 1; the window's last row predicts nothing here (weight 0).
      std::vector<std::int32_t> targets(ids.begin() + first + 1, ids.begin() + first + len);
      targets.push_back(0);
      std::vector<float> weights(static_cast<std::size_t>(len), 1.0f);
      weights.back() = 0.0f;
      nats += gqe::cross_entropy<Scalar>(gqe::MatrixMap<Scalar>(logits.data(), len, V), targets, weights, 0.0).loss;
      if (tty) std::fprintf(stderr, "\rperplexity: %3.0f%%", 100.0 * static_cast<double>(first + len) / static_cast<double>(n));
    }
    predicted = n - 1;
  }
  if (tty) std::fprintf(stderr, "\n");
  const double per_byte = nats / static_cast<double>(predicted);
  std::printf("%s: %td bytes predicted, %.6f nats per byte (%.6f bits per byte), perplexity %.6f", path.string().c_str(),
              predicted, per_byte, per_byte / std::log(2.0), std::exp(per_byte));
  if (tiled)
    std::printf("; %td window%s of %td bytes from byte %td, range end %td", predicted / window,
                predicted == window ? "" : "s", window, start, end);
  std::printf("\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Run a gqe checkpoint (GQA or GQE) on a prompt: logits, expert choices, routing statistics and sampled text.",
               "gqe-run"};
  app.set_version_flag("--version", GQE_VERSION_STRING);
  Options opt;
  app.add_option("-m,--model", opt.model, "Checkpoint folder (config.json + model.safetensors)")->required();
  auto* prompt = app.add_option("-p,--prompt", opt.prompt, "Prompt text, one token per byte (ids 0..255)");
  auto* ids = app.add_option("--prompt-ids", opt.prompt_ids, "Prompt as comma-separated token ids, e.g. 1,2,3");
  prompt->excludes(ids);
  ids->excludes(prompt);
  auto* generate = app.add_option("-n,--generate", opt.generate,
                                  "Tokens to sample after the prompt, streamed to stdout; fewer when an eos token comes "
                                  "(default: " + std::to_string(kDefaultContinuation) +
                                      " when neither --logits-out nor --stats is given, else 0)")
      ->transform(gqe::cli::integer_in(gqe::Index(0), gqe::Limits::max_positions));
  const double infinity = std::numeric_limits<double>::infinity();
  auto* temperature = app.add_option("--temperature", opt.sampler.temperature, "Sampling temperature; 0 is greedy")
      ->transform(gqe::cli::decimal_in(0.0, infinity))->capture_default_str();
  auto* top_k = app.add_option("--top-k", opt.sampler.top_k, "Keep the K most likely tokens; 0 is off")
      ->transform(gqe::cli::integer_in(gqe::Index(0), std::numeric_limits<gqe::Index>::max()))->capture_default_str();
  auto* top_p = app.add_option("--top-p", opt.sampler.top_p, "Keep the smallest set of tokens with probability >= P; 1 is off")
      ->transform(gqe::cli::decimal_in(0.0, 1.0, true))->capture_default_str();
  auto* seed = app.add_option("-s,--seed", opt.sampler.seed, "Seed of the sampler (a decimal integer, 0 to 2^64 - 1)")
      ->transform(gqe::cli::integer_in(std::uint64_t(0), UINT64_MAX))->capture_default_str();
  auto* ignore_eos = app.add_flag("--ignore-eos", opt.ignore_eos,
                                  "Do not stop at config.json's eos_token_id: generate all --generate tokens");
  auto* print_ids = app.add_flag("--print-ids", opt.print_ids,
                                 "Print the generated tokens as space-separated ids, not as bytes");
  app.add_option("-t,--threads", opt.threads, "Worker threads (default: the CPUs this process may use)")
      ->transform(gqe::cli::integer_in(1, 1024))->capture_default_str();
  auto* mode = app.add_option("--mode", opt.mode, "prefill: the prompt at once; stepwise: one token at a time through the KV cache")
      ->check(CLI::IsMember({"prefill", "stepwise"}))->capture_default_str();
  auto* chunk = app.add_option("--chunk", opt.chunk,
                               "With --mode prefill: feed the prompt N tokens at a time through the KV cache (default: "
                               "all at once), so that the prefill's activations take memory for N tokens, not the "
                               "whole prompt; the logits do not change")
      ->transform(gqe::cli::integer_in(gqe::Index(1), gqe::Limits::max_positions))->type_name("N");
  auto* logits_out = app.add_option("--logits-out", opt.logits_out,
                 "Write the prompt's logits (F32 [T, V]) and, for GQE, expert_indices (I32 [L, T, G, k]) as safetensors");
  auto* stats = app.add_flag("--stats", opt.stats,
                             "Print timings (load, prefill and decode tokens/s) and per-layer routing statistics to stderr");
  std::string dtype = "stored";
  app.add_option("--dtype", dtype,
                 "Weights in memory: stored (F32, BF16 and F16 used as the file stores them) or f32 (16-bit ones widened "
                 "at load)")
      ->check(CLI::IsMember({"stored", "f32"}))->capture_default_str();
  bool no_mmap = false;
  app.add_flag("--no-mmap", no_mmap, "Read the checkpoint's files into memory instead of mapping them");
  std::string panels = gqe::panel_layout_name(opt.load.panels);
  std::vector<std::string> panel_names;
  for (gqe::PanelLayout p : gqe::kPanelLayouts) panel_names.emplace_back(gqe::panel_layout_name(p));
  app.add_option("--panels", panels,
                 "Matrices re-laid into panels after loading, which decode streams in order: 16bit (BF16 and F16 ones), "
                 "all, or none (every matrix as the file stores it, F32 ones used in place from the mapping)")
      ->check(CLI::IsMember(panel_names))->capture_default_str();
  auto* perplexity_file = app.add_option("--perplexity", opt.perplexity,
                                         "Instead of a prompt: report the model's nats per byte and perplexity on "
                                         "this text file (bytes as token ids 0..255)");
  for (auto* other : {prompt, ids, generate, mode, chunk, logits_out, stats, temperature, top_k, top_p, seed, ignore_eos, print_ids})
    perplexity_file->excludes(other);
  app.add_option("--window", opt.window,
                 "With --perplexity: score whole, non-overlapping windows of T bytes, each from an empty cache "
                 "(default: overlapping windows of up to 1024)")
      ->transform(gqe::cli::integer_in(gqe::Index(1), gqe::Limits::max_positions))->needs(perplexity_file)->type_name("T");
  app.add_option("--range", opt.range,
                 "With --perplexity: only the bytes START..END-1 of the file, tiled by whole --window windows "
                 "(default: the whole file)")
      ->needs(perplexity_file)->type_name("START:END");

  return gqe::cli::run_main(app, argc, argv, [&] {
    if (!opt.prompt && !opt.prompt_ids && !opt.perplexity)
      gqe::fail<gqe::InputError>("no prompt; expected --prompt TEXT, --prompt-ids 1,2,3 or --perplexity FILE");
    opt.sampler.validate();
    if (opt.chunk && opt.mode == "stepwise")
      gqe::fail<gqe::InputError>("--chunk ", *opt.chunk, " with --mode stepwise; expected one of them (stepwise feeds "
                                 "the prompt one token at a time)");
    opt.load.keep_16bit = dtype == "stored";
    opt.load.map = !no_mmap;
    opt.load.panels = *gqe::panel_layout_from_name(panels);
    opt.temperature_given = temperature->count() > 0;
    opt.top_k_given = top_k->count() > 0;
    opt.top_p_given = top_p->count() > 0;
    opt.seed_given = seed->count() > 0;
    if (opt.logits_out) {  // checked before the run, which may take long, not only when the file is written
      gqe::cli::require_writable_output("--logits-out", *opt.logits_out);
      gqe::cli::refuse_overwriting_inputs("--logits-out", *opt.logits_out, gqe::cli::checkpoint_files(opt.model));
    }
    gqe::set_num_threads(opt.threads);
    const bool in_double = gqe::checkpoint_is_double(opt.model);
    if (opt.perplexity) return in_double ? perplexity<double>(opt) : perplexity<float>(opt);
    return in_double ? run<double>(opt) : run<float>(opt);
  });
}
