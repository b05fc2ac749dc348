#pragma once
// gqe-bench --model DIR: times a user's own checkpoint folder as gqe-run uses it. Loading (with the
// time to read every weight file's pages through a fresh mapping beside it), the first prefill of T
// tokens and a warm one, decode tokens/s with the bytes a step reads (weights and KV cache) against
// the machine's read bandwidth measured in turn with it, and the process's peak resident memory.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "gqe/gqe.hpp"
#include "probes.hpp"

namespace gqe::bench {

struct CheckpointOptions {
  std::string dir;
  Index prompt_tokens = 128;
  Index decode_tokens = 64;
  LoadOptions load;
};

namespace detail {

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The weight files of a checkpoint folder: its shards, or model.safetensors.
inline std::vector<std::filesystem::path> weight_files(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("model-", 0) == 0 && entry.path().extension() == ".safetensors") files.push_back(entry.path());
  }
  if (files.empty()) files.push_back(dir / "model.safetensors");
  return files;
}

// Seconds to read one byte of every page of the files through fresh mappings, and their bytes.
inline std::pair<double, double> touch_files(const std::vector<std::filesystem::path>& files) {
  const auto start = std::chrono::steady_clock::now();
  double bytes = 0;
  unsigned sum = 0;
  for (const auto& f : files) {
    const auto mapped = FileBytes::open(f, true);
    for (std::size_t i = 0; i < mapped->size(); i += 4096) sum += mapped->data()[i];
    bytes += static_cast<double>(mapped->size());
  }
  volatile unsigned sink = sum;
  (void)sink;
  return {seconds_since(start), bytes};
}

// Bytes one decode step at cache length L reads: every weight matrix it multiplies by (GQE: only
// the kept experts' rows of q_proj), one embedding row, and the whole KV cache.
inline double decode_bytes(const Transformer<float>& model, Index L) {
  const ModelConfig& c = model.config();
  const AttentionConfig a = c.attention();
  double bytes = 0;
  model.for_each_parameter([&](const std::string& name, const Weight& w) {
    double b = static_cast<double>(w.numel()) * static_cast<double>(dtype_size(w.dtype()));
    if (name == "model.embed_tokens.weight" && !c.tie_word_embeddings) b /= static_cast<double>(c.vocab_size);
    if (a.is_gqe() && name.find("q_proj") != std::string::npos) b *= static_cast<double>(a.hard_slots()) / static_cast<double>(a.num_heads);
    bytes += b;
  });
  const double cached_heads = static_cast<double>(a.num_kv_heads + (a.has_shared_head() ? 1 : 0));
  return bytes + 2.0 * cached_heads * static_cast<double>(c.head_dim) * static_cast<double>(L) * sizeof(float) *
                     static_cast<double>(c.num_layers);
}

}  // namespace detail

inline int run_checkpoint_benchmark(const CheckpointOptions& o) {
  // Nothing is printed before the checkpoint has loaded: a refused one leaves stdout empty.
  gqe::detail::require_folder(o.dir);
  const auto [touch_s, file_bytes] = detail::touch_files(detail::weight_files(o.dir));
  auto start = std::chrono::steady_clock::now();
  const Transformer<float> model = load_checkpoint<float>(o.dir, o.load);
  const double load_s = detail::seconds_since(start);
  const ModelConfig& c = model.config();
  if (o.decode_tokens >= c.max_position_embeddings)
    fail<InputError>("--decode-tokens is ", o.decode_tokens, "; expected at most max_position_embeddings - 1 = ",
                     c.max_position_embeddings - 1, " (the prompt needs a position)");
  const Index T = std::min(o.prompt_tokens, c.max_position_embeddings - o.decode_tokens);  // shown below
  std::printf("gqe %s, %s, SIMD %s, GEMM backend %s, %d threads\n", GQE_VERSION_STRING, compiler_name().c_str(),
              simd_level().c_str(), gemm_backend_description().c_str(), num_threads());
  std::printf("weight files %.3f GB, every page touched through a mapping in %.3f s\n", file_bytes * 1e-9, touch_s);
  std::printf("load %.3f s (%s, panels %s, %.1f MB owned by the model)\n", load_s, o.load.map ? "mapped" : "read",
              panel_layout_name(o.load.panels), static_cast<double>(model.owned_bytes()) * 1e-6);

  std::vector<std::int32_t> prompt(static_cast<std::size_t>(T));
  std::mt19937 rng(1);
  for (auto& id : prompt) id = static_cast<std::int32_t>(rng() % static_cast<unsigned>(c.vocab_size));
  const TensorView<const std::int32_t> ids(prompt.data(), Shape{1, T});
  double prefill_s[2];
  std::vector<KVCache<float>> caches;
  // The last position's logits: all the first token needs, and all gqe-run computes without
  // --logits-out. Decode steps write them too.
  Tensor<float> step(Shape{1, c.vocab_size});
  for (double& seconds : prefill_s) {  // the first (cold) and a second (warm) prefill
    caches = {model.new_cache()};
    start = std::chrono::steady_clock::now();
    model.forward(ids, caches, step.view(), true);
    seconds = detail::seconds_since(start);
  }
  caches[0].reserve(T + o.decode_tokens);
  std::int32_t next = prompt.back();
  const auto decode = [&](Index steps) {  // greedy steps from `next`
    for (Index i = 0; i < steps; ++i) {
      model.forward(TensorView<const std::int32_t>(&next, Shape{1, 1}), caches, step.view(), true);
      next = static_cast<std::int32_t>(std::max_element(step.data(), step.data() + c.vocab_size) - step.data());
    }
  };
  start = std::chrono::steady_clock::now();
  decode(o.decode_tokens);
  const double decode_s = detail::seconds_since(start);
  const double per_token = decode_s / static_cast<double>(o.decode_tokens);
  const double step_bytes = detail::decode_bytes(model, T + o.decode_tokens / 2);
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);  // before the bandwidth probe's own buffer

  // The same steps again from the prompt's cache, in blocks with a pass of the read probe after each,
  // so that decode and probe meet the same neighbours on a shared machine; medians of each.
  const ReadProbe probe(num_threads());
  const Index blocks = std::min<Index>(8, o.decode_tokens), block_steps = o.decode_tokens / blocks;
  std::vector<double> decode_gbps, probe_gbps;
  caches[0].truncate(T);
  next = prompt.back();
  for (Index b = 0; b < blocks; ++b) {
    start = std::chrono::steady_clock::now();
    decode(block_steps);
    const double block_bytes = static_cast<double>(block_steps) * detail::decode_bytes(model, T + b * block_steps + block_steps / 2);
    decode_gbps.push_back(block_bytes / detail::seconds_since(start) * 1e-9);
    probe_gbps.push_back(probe.pass());
  }
  const double decode_rate = detail::median(decode_gbps), probe_rate = detail::median(probe_gbps);
  const double best_pass = *std::max_element(probe_gbps.begin(), probe_gbps.end());
  std::printf("prefill of %td tokens: first %.3f s (%.0f tokens/s), warm %.3f s (%.0f tokens/s)\n", T, prefill_s[0],
              static_cast<double>(T) / prefill_s[0], prefill_s[1], static_cast<double>(T) / prefill_s[1]);
  std::printf("decode: %.1f tokens/s, %.1f MB read per token, %.1f GB/s\n", 1.0 / per_token, step_bytes * 1e-6,
              step_bytes / per_token * 1e-9);
  std::printf("decode against the read bandwidth, in turn (%td blocks of %td steps, a probe pass after each; medians): "
              "%.1f GB/s against %.1f GB/s = %.0f%% (best pass %.1f GB/s: %.0f%%)\n",
              blocks, block_steps, decode_rate, probe_rate, 100.0 * decode_rate / probe_rate, best_pass,
              100.0 * decode_rate / best_pass);
  std::printf("time to first token (load + prefill): %.3f s; peak resident memory %.1f MB (%.2f x the weight files)\n",
              load_s + prefill_s[0], static_cast<double>(usage.ru_maxrss) / 1024.0,
              static_cast<double>(usage.ru_maxrss) * 1024.0 / file_bytes);
  return 0;
}

}  // namespace gqe::bench
