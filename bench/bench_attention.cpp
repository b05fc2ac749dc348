// One attention layer of the paper's shape: prefill at T = 512 .. 8192 and decode at cache lengths
// 1024 .. 16384, dense GQA against GQE (k = 1 of M = 2: 9 of 16 query heads per token), with the
// useful GFLOP/s of the spec's FLOP model; and a plain GEMM of the projections' size in the same
// run, so the report can say what fraction of the machine's GEMM rate the layer reaches.
#include "bench_common.hpp"

namespace {

using namespace gqe;
const bench::Context context;

std::vector<Index> iota(Index first, Index count) {
  std::vector<Index> v(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) v[static_cast<std::size_t>(i)] = first + i;
  return v;
}

template <class Layer>
Layer make_layer(AttentionType type) {
  Layer layer(bench::paper_layer(type));
  bench::random_weights([&](auto&& fn) { Layer::visit(layer, fn); }, 1);
  return layer;
}

template <class Layer>
void prefill(benchmark::State& state, AttentionType type) {
  const Index T = state.range(0);
  const AttentionConfig config = bench::paper_layer(type);
  const Layer layer = make_layer<Layer>(type);
  Matrix<float> x = Matrix<float>::Random(T, config.hidden_size), y(T, config.hidden_size);  // [T, d]
  RopeTable<float> rope;
  rope.compute(iota(0, T), config.head_dim, config.rope_theta);
  AttentionCache<float> cache(config);
  cache.reserve(T);
  for (auto _ : state) {
    cache.clear();
    layer.forward(x, {{&cache, 0, T}}, rope, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const AttentionConfig dense = bench::paper_layer(AttentionType::gqa);
  state.counters["GFLOPS"] = benchmark::Counter(config.prefill_flops(T) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["active_heads"] = static_cast<double>(config.active_heads());
  state.counters["flop_ceiling"] = dense.prefill_flops(T) / bench::paper_layer(AttentionType::gqe).prefill_flops(T);
  state.counters["tokens"] = static_cast<double>(T);
}

template <class Layer>
void decode(benchmark::State& state, AttentionType type) {
  const Index L = state.range(0);
  const AttentionConfig config = bench::paper_layer(type);
  const Layer layer = make_layer<Layer>(type);
  // A cache of L positions filled with random keys and values (what attention reads is all that
  // matters for its speed); each step appends one token, then the cache is rolled back to L.
  AttentionCache<float> cache(config);
  cache.reserve(L + 1);
  for (Index g = 0; g < config.num_kv_heads; ++g) {
    MatrixMap<float>(cache.key(g), L, config.head_dim).setRandom();
    MatrixMap<float>(cache.value(g), L, config.head_dim).setRandom();
  }
  if (cache.has_mean()) {
    MatrixMap<float>(cache.mean_key(), L, config.head_dim).setRandom();
    MatrixMap<float>(cache.mean_value(), L, config.head_dim).setRandom();
  }
  Matrix<float> x = Matrix<float>::Random(1, config.hidden_size), y(1, config.hidden_size);
  RopeTable<float> rope;
  rope.compute(iota(L, 1), config.head_dim, config.rope_theta);
  const std::vector<Segment<float>> segments{{&cache, 0, 1}};
  for (auto _ : state) {
    cache.clear();
    cache.advance(L);
    layer.forward(x, segments, rope, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["cache"] = static_cast<double>(L);
  state.counters["active_heads"] = static_cast<double>(config.active_heads());
}

// Y [T, 1024] = X [T, 1024] W^T, the size of one projection at T tokens: Eigen single-threaded,
// the library's tiled gqe::linear on its pool, and OpenBLAS (one thread per tile) when built with it.
void gemm_eigen(benchmark::State& state) {
  const Index T = state.range(0);
  Matrix<float> x = Matrix<float>::Random(T, 1024), w = Matrix<float>::Random(1024, 1024), y(T, 1024);
  for (auto _ : state) {
    y.noalias() = x * w.transpose();
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOPS"] = benchmark::Counter(2.0 * T * 1024 * 1024 * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void gemm_gqe_linear(benchmark::State& state) {
  const Index T = state.range(0);
  Matrix<float> x = Matrix<float>::Random(T, 1024), w = Matrix<float>::Random(1024, 1024), y(T, 1024);
  for (auto _ : state) {
    linear<float>(x, w, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOPS"] = benchmark::Counter(2.0 * T * 1024 * 1024 * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = num_threads();
}

void prefill_gqa(benchmark::State& s) { prefill<GQAAttention<float>>(s, AttentionType::gqa); }
void prefill_gqe(benchmark::State& s) { prefill<GQEAttention<float>>(s, AttentionType::gqe); }
void decode_gqa(benchmark::State& s) { decode<GQAAttention<float>>(s, AttentionType::gqa); }
void decode_gqe(benchmark::State& s) { decode<GQEAttention<float>>(s, AttentionType::gqe); }

}  // namespace

BENCHMARK(prefill_gqa)->Arg(512)->Arg(1024)->Arg(2048)->Arg(4096)->Arg(8192)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
BENCHMARK(prefill_gqe)->Arg(512)->Arg(1024)->Arg(2048)->Arg(4096)->Arg(8192)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
BENCHMARK(gemm_eigen)->Arg(4096)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
BENCHMARK(gemm_gqe_linear)->Arg(4096)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
BENCHMARK(decode_gqa)->Arg(1024)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond)->MeasureProcessCPUTime()->UseRealTime();
BENCHMARK(decode_gqe)->Arg(1024)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond)->MeasureProcessCPUTime()->UseRealTime();
