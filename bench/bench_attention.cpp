// One attention layer of the paper's shape (d=1024, d_h=64, N=16, G=8; GQE keeps k=1 of M=2: 9 of
// 16 query heads per token), dense GQA against GQE:
//   prefill_{gqa,gqe}/T      one forward over T tokens from an empty cache, useful GFLOP/s of the
//                            the FLOP model's, active heads per token, the FLOP ceiling at T;
//   decode_{gqa,gqe}/L       one token against a cache of L positions, GB/s of weights and cache read;
//   attention_{gqa,gqe}/T    the causal attention kernel alone, with the layer's head layout;
//   attention_gqa_dh128/T    the dense kernel at d_h=128 (N=8, G=4: the same width);
//   decode_one_kv_head/L/N   the kernel's decode step for one KV head read by 8 query heads (d_h=128,
//                            a multi-query model) over L cached positions, on N threads (0: the
//                            pool's): one group, so its key chunks are what spreads over threads;
//   register_tile/kc         the register tile of every product alone on one thread, over a depth
//                            of 64 (the score product's; B in L1) or 256 (a key tile's);
//   gemm_*/4096              a plain [4096 x 1024] x [1024 x 1024] product measured in the same run,
//                            the machine's GEMM rate that the layer's GFLOP/s is compared with
//                            (Eigen's own product on one thread, gqe::linear, and the GEMM
//                            backend's own sgemm when gqe is built with one).
// Every rate also appears as a share of the machine's measured FMA peak or read bandwidth.
#include "gqe/tensor/eigen.hpp"

#include "bench_common.hpp"
#include "gqe/layers/attention.hpp"
#include "gqe/ops/attention.hpp"
#include "gqe/ops/gemm.hpp"
#include "gqe/ops/linear.hpp"
#include "gqe/ops/rope.hpp"
#include "gqe/util/thread_pool.hpp"

#include "gqe/ops/gemm_backend.hpp"  // the backend's own headers, when one is built in

namespace {

using namespace gqe;
using bench::paper_layer;

template <class Layer>
Layer random_layer(AttentionType type) {
  Layer layer(paper_layer(type));
  bench::randomize_layer(layer, 1);
  return layer;
}

// x [T, d] from N(0, 1), like the RMS-normed hidden states a layer receives.
Matrix<float> random_input(Index rows, Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  Matrix<float> x(rows, cols);
  bench::fill_random(x.data(), x.size(), 1, rng);
  return x;
}

template <class Layer>
void prefill(benchmark::State& state, AttentionType type) {
  const Index T = state.range(0);
  const AttentionConfig config = paper_layer(type);
  const Layer layer = random_layer<Layer>(type);
  const Matrix<float> x = random_input(T, config.hidden_size, 7);  // [T, d]
  Matrix<float> y(T, config.hidden_size);                          // [T, d]
  RopeTable<float> rope;
  rope.compute(bench::positions(0, T), config.head_dim, config.rope_theta);
  AttentionCache<float> cache(config);
  cache.reserve(T);  // clear() keeps the capacity: no allocation inside the timed loop
  const std::vector<Segment<float>> segments{{&cache, 0, T}};

  // One untimed call sizes the library's thread-local workspaces for T (they are shared by every
  // benchmark, so the previous one may have left them at another size). For GQE it also reports
  // how mixed the routing is: the share of (token, group) choices that went to expert 0 of 2.
  if (config.is_gqe()) {
    Routing<float> routing;
    layer.forward(x, segments, rope, y, nullptr, &routing);
    state.counters["expert0_share"] =
        static_cast<double>((routing.experts.array() == 0).count()) / static_cast<double>(routing.experts.size());
  } else {
    layer.forward(x, segments, rope, y);
  }

  for (auto _ : state) {
    cache.clear();
    layer.forward(x, segments, rope, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double dense = paper_layer(AttentionType::gqa).prefill_flops(T), routed = paper_layer(AttentionType::gqe).prefill_flops(T);
  bench::report_flops(state, config.prefill_flops(T));  // useful work, the FLOP model's
  state.counters["active_heads"] = static_cast<double>(config.active_heads());
  state.counters["flop_ceiling"] = dense / routed;
}

// Bytes one decode step must read: every weight it multiplies by (GQE: only the kept experts'
// rows of Wq) and the whole KV cache of L + 1 positions (GQE: with the mean K/V of the shared head).
double decode_bytes(const AttentionConfig& c, Index L) {
  const double d = static_cast<double>(c.hidden_size), dh = static_cast<double>(c.head_dim);
  const double query_heads = static_cast<double>(c.active_heads()), kv = static_cast<double>(c.num_kv_heads);
  double weights = (query_heads + 2 * kv + static_cast<double>(c.output_slots())) * dh * d;
  if (c.is_gqe()) weights += static_cast<double>(c.num_heads) * d;  // router
  const double cache = 2 * (kv + (c.has_shared_head() ? 1 : 0)) * static_cast<double>(L + 1) * dh;
  return sizeof(float) * (weights + cache);
}

template <class Layer>
void decode(benchmark::State& state, AttentionType type) {
  const Index L = state.range(0);
  const AttentionConfig config = paper_layer(type);
  const Layer layer = random_layer<Layer>(type);
  // A cache of L positions filled with random keys and values: the cost of attention does not
  // depend on the values, and a real prefill of 16384 tokens would take most of the suite's time.
  AttentionCache<float> cache(config);
  cache.reserve(L + 1);
  const Index dh = config.head_dim;
  {
    const Matrix<float> keys = random_input(L, config.num_kv_heads * dh, 3), values = random_input(L, config.num_kv_heads * dh, 4);
    for (Index t = 0; t < L; ++t) cache.write(t, keys.row(t).data(), values.row(t).data());
  }
  const Matrix<float> x = random_input(1, config.hidden_size, 5);  // [1, d]
  Matrix<float> y(1, config.hidden_size);                          // [1, d]
  RopeTable<float> rope;
  rope.compute(bench::positions(L, 1), dh, config.rope_theta);
  const std::vector<Segment<float>> segments{{&cache, 0, 1}};

  // Roll back to L before every step: positions 0 .. L-1 are never written by a step (it writes
  // position L, then advances), so clear() + advance(L) restores the same cache at no cost.
  const auto rewind = [&] {
    cache.clear();
    cache.advance(L);
  };
  rewind();
  layer.forward(x, segments, rope, y);  // untimed: workspaces sized for one row
  for (auto _ : state) {
    rewind();
    layer.forward(x, segments, rope, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  bench::report_bytes(state, decode_bytes(config, L));
  state.counters["active_heads"] = static_cast<double>(config.active_heads());
}

// The attention kernel alone over T tokens with the layer's layout: GQA's 8 KV heads each read by
// M = 2 query heads; GQE's 8 KV heads each read by k = 1 slot, plus the shared head on the mean K/V.
// With head_dim 128, the same width in half as many heads (N = 8, G = 4).
void attention_kernel(benchmark::State& state, AttentionType type, Index head_dim = 64) {
  const Index T = state.range(0);
  AttentionConfig c = paper_layer(type);
  c.num_heads = c.num_heads * c.head_dim / head_dim;
  c.num_kv_heads = c.num_kv_heads * c.head_dim / head_dim;
  c.head_dim = head_dim;
  const Index dh = c.head_dim, G = c.num_kv_heads, per_kv = c.is_gqe() ? c.top_k : c.experts_per_group();
  const Index active = c.active_heads(), kv_heads = G + (c.has_shared_head() ? 1 : 0);
  const Matrix<float> query = random_input(T, active * dh, 11);   // [T, active*d_h]
  AttentionCache<float> cache(c);  // [T] positions of G KV heads (and their mean)
  cache.reserve(T);
  {
    const Matrix<float> keys = random_input(T, G * dh, 12), values = random_input(T, G * dh, 13);
    for (Index t = 0; t < T; ++t) cache.write(t, keys.row(t).data(), values.row(t).data());
  }
  Matrix<float> out(T, active * dh);  // [T, active*d_h]
  std::vector<QueryGroup<float>> heads;
  for (Index h = 0, col = 0; h < kv_heads; ++h) {
    QueryGroup<float> head;
    head.heads = h < G ? per_kv : 1;
    head.query = query.data() + col;
    head.query_stride = query.cols();
    head.kv = cache.head(h);
    head.out = out.data() + col;
    head.out_stride = out.cols();
    head.count = T;
    heads.push_back(head);
    col += head.heads * dh;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  causal_attention(heads, dh, scale);  // untimed: scratch buffers sized
  for (auto _ : state) {
    causal_attention(heads, dh, scale);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double Td = static_cast<double>(T);
  bench::report_flops(state, 4.0 * static_cast<double>(active * dh) * Td * (Td + 1) / 2);
  state.counters["active_heads"] = static_cast<double>(active);
}

void decode_one_kv_head(benchmark::State& state) {
  const Index L = state.range(0), dh = 128, heads = 8;
  const int threads = state.range(1) > 0 ? static_cast<int>(state.range(1)) : num_threads(), pool = num_threads();
  AttentionConfig c;
  c.num_heads = heads;
  c.num_kv_heads = 1;
  c.head_dim = dh;
  AttentionCache<float> cache(c);  // [L + 1] positions of one KV head
  cache.reserve(L + 1);
  {
    const Matrix<float> keys = random_input(L + 1, dh, 14), values = random_input(L + 1, dh, 15);
    for (Index t = 0; t <= L; ++t) cache.write(t, keys.row(t).data(), values.row(t).data());
  }
  const Matrix<float> query = random_input(1, heads * dh, 16);  // [1, heads*d_h]
  Matrix<float> out(1, heads * dh);                              // [1, heads*d_h]
  QueryGroup<float> group;
  group.query = query.data();
  group.query_stride = query.cols();
  group.kv = cache.head(0);
  group.out = out.data();
  group.out_stride = out.cols();
  group.past = L;
  group.count = 1;
  group.heads = heads;
  const std::vector<QueryGroup<float>> groups{group};
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  set_num_threads(threads);
  causal_attention(groups, dh, scale);  // untimed: scratch buffers sized
  for (auto _ : state) {
    causal_attention(groups, dh, scale);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_num_threads(pool);
  bench::report_bytes(state, 2.0 * static_cast<double>((L + 1) * dh) * sizeof(float));  // K and V read once
  state.counters["threads"] = threads;
}

// Y [T, 1024] = X [T, 1024] W^T, W [1024, 1024]: the size of the layer's projections at T tokens.
struct GemmOperands {
  explicit GemmOperands(Index rows) : x(random_input(rows, 1024, 21)), w(random_input(1024, 1024, 22)), y(rows, 1024) {}
  double flops() const { return 2.0 * static_cast<double>(x.rows()) * static_cast<double>(w.rows() * w.cols()); }
  Matrix<float> x, w, y;
};

// Eigen's own GEMM on one thread: the per-core rate. (The oneDNN build compiles with OpenMP, which
// Eigen's product would otherwise use on every core.)
void gemm_eigen_1thread(benchmark::State& state) {
  GemmOperands g(state.range(0));
  const int eigen_threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);
  for (auto _ : state) {
    g.y.noalias() = g.x * g.w.transpose();
    benchmark::DoNotOptimize(g.y.data());
    benchmark::ClobberMemory();
  }
  Eigen::setNbThreads(eigen_threads);
  state.counters["GFLOP"] = bench::rate(g.flops() * 1e-9);
  if (bench::machine_peaks().fma_gflops_one > 0)
    state.counters["of_peak"] = bench::rate(g.flops() * 1e-9 / bench::machine_peaks().fma_gflops_one);
  state.counters["threads"] = 1;
}

// gqe::linear: the library's projection (its kernels, or the GEMM backend's), tiles spread over its pool.
void gemm_gqe_linear(benchmark::State& state) {
  GemmOperands g(state.range(0));
  for (auto _ : state) {
    linear<float>(g.x, g.w, g.y);
    benchmark::DoNotOptimize(g.y.data());
    benchmark::ClobberMemory();
  }
  bench::report_flops(state, g.flops());
  state.counters["threads"] = num_threads();
}

// The register tile that carries the whole row blocks of every product above (6 rows x 4 packets
// with 32 vector registers, MR x 2 packets otherwise), on one thread, over a depth of kc: A
// [rows][kc] read in place, B two packed panels [kc][NR] (one without 32 registers), C continued
// from itself, the same operands call after call. With AVX-512, at kc = 64 (the score product's
// depth) B is 16 KB and stays in L1; at 256 (a key tile's) it is 64 KB, the size of a V tile. Its
// share of one thread's FMA peak is the ceiling of the layer's products, whose operands come from
// further away.
void register_tile(benchmark::State& state) {
  using Shape = detail::GemmShape<float>;
  const Index kc = state.range(0);
  detail::WidePlan<float> plan = detail::wide_plan<float>(Shape::kRows, false, 2 * Shape::kCols);
  if (!plan.tile) plan = {detail::micro_tile_for<float>(Shape::kRows, false), Shape::kVectors, Shape::kRows};
  const Index rows = plan.rows, cols = plan.packets * Shape::kLanes;
  const Matrix<float> a = random_input(rows, kc, 23);              // [rows, kc]
  const Matrix<float> b = random_input(2 * kc, Shape::kCols, 24);  // two panels [kc, NR], one after the other
  Matrix<float> c = Matrix<float>::Zero(rows, cols);               // [rows, cols]
  const LhsMatrix<float> lhs{a.data(), kc, 1};
  const detail::LhsBlock<float> block{&lhs, 0, 0};
  for (auto _ : state) {
    plan.tile(kc, block, b.data(), Shape::kCols, kc * Shape::kCols, c.data(), cols, cols, true);
    benchmark::ClobberMemory();
  }
  benchmark::DoNotOptimize(c.data());
  const double flops = 2.0 * static_cast<double>(rows * cols * kc);
  state.counters["GFLOP"] = bench::rate(flops * 1e-9);
  if (bench::machine_peaks().fma_gflops_one > 0)
    state.counters["of_peak"] = bench::rate(flops * 1e-9 / bench::machine_peaks().fma_gflops_one);
  state.counters["rows"] = static_cast<double>(rows);
  state.counters["packets"] = static_cast<double>(cols / Shape::kLanes);
}

#if defined(GQE_GEMM_OPENBLAS)
// The backend's own sgemm over the whole product with as many threads as the library's pool (the
// host's OpenBLAS thread count is put back afterwards): the rate the backend reaches on its own.
void gemm_backend(benchmark::State& state) {
  GemmOperands g(state.range(0));
  const int m = static_cast<int>(g.x.rows()), n = static_cast<int>(g.w.rows()), k = static_cast<int>(g.x.cols());
  const int saved = openblas_get_num_threads();
  openblas_set_num_threads(num_threads());
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, g.x.data(), k, g.w.data(), k, 0.0f,
                g.y.data(), n);
    benchmark::DoNotOptimize(g.y.data());
    benchmark::ClobberMemory();
  }
  openblas_set_num_threads(saved);
  bench::report_flops(state, g.flops());
  state.counters["threads"] = num_threads();
}
#elif defined(GQE_GEMM_ONEDNN)
void gemm_backend(benchmark::State& state) {
  GemmOperands g(state.range(0));
  const dnnl_dim_t m = g.x.rows(), n = g.w.rows(), k = g.x.cols();
  const int saved = omp_get_max_threads();
  omp_set_num_threads(num_threads());
  for (auto _ : state) {
    dnnl_sgemm('N', 'T', m, n, k, 1.0f, g.x.data(), k, g.w.data(), k, 0.0f, g.y.data(), n);
    benchmark::DoNotOptimize(g.y.data());
    benchmark::ClobberMemory();
  }
  omp_set_num_threads(saved);
  bench::report_flops(state, g.flops());
  state.counters["threads"] = num_threads();
}
#endif

void prefill_gqa(benchmark::State& s) { prefill<Attention<float>>(s, AttentionType::gqa); }
void prefill_gqe(benchmark::State& s) { prefill<Attention<float>>(s, AttentionType::gqe); }
void decode_gqa(benchmark::State& s) { decode<Attention<float>>(s, AttentionType::gqa); }
void decode_gqe(benchmark::State& s) { decode<Attention<float>>(s, AttentionType::gqe); }
void attention_gqa(benchmark::State& s) { attention_kernel(s, AttentionType::gqa); }
void attention_gqe(benchmark::State& s) { attention_kernel(s, AttentionType::gqe); }
void attention_gqa_dh128(benchmark::State& s) { attention_kernel(s, AttentionType::gqa, 128); }

// Wall-clock time is the figure (UseRealTime); the process's CPU time over all threads is recorded
// beside it, the steadier figure when other programs compete for the cores.
void prefill_args(benchmark::internal::Benchmark* b) {
  for (const Index T : {512, 1024, 2048, 4096, 8192}) b->Arg(T);
  b->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
}
void decode_args(benchmark::internal::Benchmark* b) {
  for (const Index L : {1024, 4096, 16384}) b->Arg(L);
  b->Unit(benchmark::kMicrosecond)->MeasureProcessCPUTime()->UseRealTime();
}
void kernel_args(benchmark::internal::Benchmark* b) {
  b->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
}
void one_kv_head_args(benchmark::internal::Benchmark* b) {
  b->Args({32768, 1})->Args({32768, 0})->Unit(benchmark::kMicrosecond)->MeasureProcessCPUTime()->UseRealTime();
}
void gemm_args(benchmark::internal::Benchmark* b) {
  b->Arg(4096)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime()->UseRealTime();
}

}  // namespace

BENCHMARK(prefill_gqa)->Apply(prefill_args);
BENCHMARK(prefill_gqe)->Apply(prefill_args);
BENCHMARK(decode_gqa)->Apply(decode_args);
BENCHMARK(decode_gqe)->Apply(decode_args);
BENCHMARK(attention_gqa)->Apply(kernel_args);
BENCHMARK(attention_gqe)->Apply(kernel_args);
BENCHMARK(attention_gqa_dh128)->Apply(kernel_args);
BENCHMARK(decode_one_kv_head)->Apply(one_kv_head_args);
BENCHMARK(gemm_eigen_1thread)->Apply(gemm_args);
BENCHMARK(gemm_gqe_linear)->Apply(gemm_args);
BENCHMARK(register_tile)->Arg(64)->Arg(256);
#if defined(GQE_GEMM_OPENBLAS) || defined(GQE_GEMM_ONEDNN)
BENCHMARK(gemm_backend)->Apply(gemm_args);
#endif
