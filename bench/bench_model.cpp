// A whole small transformer, dense GQA against GQE of the same shape: prefill tokens/s at
// T = 1024 and decode tokens/s (one token after a 1024-token prompt).
#include "bench_common.hpp"

namespace {

using namespace gqe;

ModelConfig small_model(AttentionType type) {
  ModelConfig c;
  c.attention_type = type;
  c.vocab_size = 256;
  c.hidden_size = 512;
  c.intermediate_size = 1376;
  c.num_layers = 4;
  c.num_heads = 16;
  c.num_kv_heads = 8;
  c.head_dim = 32;
  c.top_k = 1;
  return c;
}

Transformer<float> make_model(AttentionType type) {
  Transformer<float> model(small_model(type));
  std::mt19937 rng(2);
  model.for_each_parameter([&](const std::string&, TensorView<float> w) {
    const float scale = w.rank() == 1 ? 0.0f : 1.0f / std::sqrt(static_cast<float>(w.dim(1)));
    std::normal_distribution<float> dist(w.rank() == 1 ? 1.0f : 0.0f, w.rank() == 1 ? 0.0f : scale);
    for (Index i = 0; i < w.numel(); ++i) w.data()[i] = w.rank() == 1 ? 1.0f : dist(rng);
  });
  return model;
}

std::vector<std::int32_t> prompt(Index T) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>((t * 37 + 11) % 256);
  return ids;
}

void model_prefill(benchmark::State& state, AttentionType type) {
  const Index T = state.range(0);
  const auto model = make_model(type);
  const auto ids = prompt(T);
  Tensor<float> logits(Shape{1, T, 256});
  std::vector<KVCache<float>> caches{model.new_cache()};
  caches[0].reserve(T);
  for (auto _ : state) {
    caches[0].clear();
    model.forward({ids.data(), Shape{1, T}}, caches, logits.view());
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(T), benchmark::Counter::kIsIterationInvariantRate);
}

void model_decode(benchmark::State& state, AttentionType type) {
  const Index T = state.range(0);
  const auto model = make_model(type);
  const auto ids = prompt(T);
  std::vector<KVCache<float>> caches{model.new_cache()};
  caches[0].reserve(T + 1);
  Tensor<float> logits(Shape{1, 256});
  const std::int32_t next = 42;
  for (auto _ : state) {
    state.PauseTiming();
    caches[0].clear();
    model.forward({ids.data(), Shape{1, T}}, caches, Tensor<float>(Shape{1, 256}).view(), true);
    state.ResumeTiming();
    model.forward({&next, Shape{1, 1}}, caches, logits.view(), true);
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate);
}

void model_prefill_gqa(benchmark::State& s) { model_prefill(s, AttentionType::gqa); }
void model_prefill_gqe(benchmark::State& s) { model_prefill(s, AttentionType::gqe); }
void model_decode_gqa(benchmark::State& s) { model_decode(s, AttentionType::gqa); }
void model_decode_gqe(benchmark::State& s) { model_decode(s, AttentionType::gqe); }

}  // namespace

BENCHMARK(model_prefill_gqa)->Arg(1024)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
BENCHMARK(model_prefill_gqe)->Arg(1024)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
BENCHMARK(model_decode_gqa)->Arg(1024)->Unit(benchmark::kMicrosecond)->MeasureProcessCPUTime()->UseRealTime();
BENCHMARK(model_decode_gqe)->Arg(1024)->Unit(benchmark::kMicrosecond)->MeasureProcessCPUTime()->UseRealTime();
