// A whole small transformer, dense GQA against GQE of the same shape (L=4, d=512, N=16, G=8,
// d_h=32, I=1376, V=256; GQE keeps k=1 of M=2):
//   model_prefill_{gqa,gqe}/T   tokens/s of a T-token prompt from empty caches (all logits);
//   model_decode_{gqa,gqe}/T    tokens/s of one decode step after a T-token prompt.
#include <cstdint>

#include "bench_common.hpp"
#include "gqe/model/transformer.hpp"

namespace {

using namespace gqe;

ModelConfig small_model(AttentionType type) {
  ModelConfig c;
  c.attention_type = type;
  c.gqe_variant = GqeVariant::gqe;
  c.vocab_size = 256;
  c.hidden_size = 512;
  c.intermediate_size = 1376;
  c.num_layers = 4;
  c.num_heads = 16;
  c.num_kv_heads = 8;
  c.head_dim = 32;
  c.top_k = 1;
  c.max_position_embeddings = 4096;
  return c;
}

// Matrices from N(0, 1/in) (the router's too, so that routing is mixed); norm weights stay 1.
Transformer<float> random_model(AttentionType type) {
  Transformer<float> model(small_model(type));
  std::mt19937 rng(2);
  model.for_each_parameter([&](const std::string&, Weight& w) {
    float* data = w.allocate<float>();
    if (w.shape().rank() == 2)
      bench::fill_random(data, w.numel(), w.cols(), rng);
    else
      std::fill(data, data + w.numel(), 1.0f);
  });
  return model;
}

std::vector<std::int32_t> prompt(Index T) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(T));
  std::mt19937 rng(4);
  for (auto& id : ids) id = static_cast<std::int32_t>(rng() % 256);
  return ids;
}

void model_prefill(benchmark::State& state, AttentionType type) {
  const Index T = state.range(0);
  const Transformer<float> model = random_model(type);
  const std::vector<std::int32_t> ids = prompt(T);
  const TensorView<const std::int32_t> tokens(ids.data(), Shape{1, T});
  Tensor<float> logits(Shape{1, T, model.config().vocab_size});  // [1, T, V]
  std::vector<KVCache<float>> caches{model.new_cache()};
  caches[0].reserve(T);  // clear() keeps the capacity
  model.forward(tokens, caches, logits.view());  // untimed: workspaces sized for T
  for (auto _ : state) {
    caches[0].clear();
    model.forward(tokens, caches, logits.view());
    benchmark::DoNotOptimize(logits.data());
    benchmark::ClobberMemory();
  }
  state.counters["tokens"] = bench::rate(static_cast<double>(T));
}

void model_decode(benchmark::State& state, AttentionType type) {
  const Index T = state.range(0);
  const Transformer<float> model = random_model(type);
  const std::vector<std::int32_t> ids = prompt(T);
  std::vector<KVCache<float>> caches{model.new_cache()};
  caches[0].reserve(T + 1);
  Tensor<float> prompt_logits(Shape{1, model.config().vocab_size}), logits(Shape{1, model.config().vocab_size});
  model.forward(TensorView<const std::int32_t>(ids.data(), Shape{1, T}), caches, prompt_logits.view(), true);
  // Every step starts from the same T cached positions: a step writes position T of each layer and
  // advances, so clearing and advancing every layer back to T restores the prompt's cache exactly.
  const auto rewind = [&] {
    for (Index l = 0; l < caches[0].num_layers(); ++l) {
      caches[0].layer(l).clear();
      caches[0].layer(l).advance(T);
    }
  };
  const std::int32_t next = 42;
  const TensorView<const std::int32_t> step(&next, Shape{1, 1});
  model.forward(step, caches, logits.view(), true);  // untimed: workspaces sized for one row
  for (auto _ : state) {
    rewind();
    model.forward(step, caches, logits.view(), true);
    benchmark::DoNotOptimize(logits.data());
    benchmark::ClobberMemory();
  }
  state.counters["tokens"] = bench::rate(1.0);
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
