// Whole-model properties of gqe::Transformer, for both attention types and all GQE variants, in
// float and double: batch invariance bit for bit (a position's logits depend only on the tokens up
// to it: not on later tokens, not on what other tokens route to, not on the other sequences of a
// batch, and prefill, chunks and token-by-token decode agree exactly), bit-identical results across
// thread counts and concurrent user threads, caches untouched by a failed call, sampling rules.
// Golden comparisons against the NumPy reference live in test_golden.cpp.
#include <gtest/gtest.h>

#include <sys/resource.h>
#include <unistd.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <random>
#include <set>
#include <string_view>
#include <thread>
#include <type_traits>

#include "gqe/model/sampler.hpp"
#include "gqe/model/transformer.hpp"

// Counts heap allocations (malloc is what operator new and Eigen both end in) while `counting` is
// set, to show that a warm decode step makes none. Sanitizers interpose malloc themselves: there
// the count is not taken.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define GQE_COUNT_MALLOC 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define GQE_COUNT_MALLOC 0
#endif
#endif
#ifndef GQE_COUNT_MALLOC
#define GQE_COUNT_MALLOC 1
#endif
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
}  // namespace
#if GQE_COUNT_MALLOC
extern "C" void* __libc_malloc(std::size_t);
extern "C" void* __libc_calloc(std::size_t, std::size_t);
extern "C" void* __libc_realloc(void*, std::size_t);
extern "C" void* malloc(std::size_t size) {
  if (counting) ++allocations;
  return __libc_malloc(size);
}
extern "C" void* calloc(std::size_t n, std::size_t size) {
  if (counting) ++allocations;
  return __libc_calloc(n, size);
}
extern "C" void* realloc(void* p, std::size_t size) {
  if (counting) ++allocations;
  return __libc_realloc(p, size);
}
#endif

namespace {

using gqe::Index;

gqe::ModelConfig small_config(gqe::AttentionType type, gqe::GqeVariant variant, Index top_k) {
  gqe::ModelConfig c;
  c.vocab_size = 37;
  c.hidden_size = 24;
  c.intermediate_size = 45;
  c.num_layers = 2;
  c.attention_type = type;
  c.gqe_variant = variant;
  c.num_heads = 6;
  c.num_kv_heads = 3;
  c.head_dim = 8;
  c.top_k = top_k;
  c.max_position_embeddings = 512;
  return c;
}

// Random weights of a scale that keeps activations O(1); norms around 1.
template <class Scalar>
void randomise(gqe::Transformer<Scalar>& model, unsigned seed) {
  std::mt19937 rng(seed);
  model.for_each_parameter([&](const std::string&, gqe::Weight& w) {
    const bool norm = w.shape().rank() == 1;
    const double fan_in = norm ? 1.0 : static_cast<double>(w.cols());
    std::normal_distribution<double> dist(norm ? 1.0 : 0.0, norm ? 0.1 : 1.0 / std::sqrt(fan_in));
    Scalar* data = w.allocate<Scalar>();
    for (Index i = 0; i < w.numel(); ++i) data[i] = static_cast<Scalar>(dist(rng));
  });
}

std::vector<std::int32_t> random_tokens(Index n, Index vocab, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(0, static_cast<int>(vocab) - 1);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}

gqe::TensorView<const std::int32_t> as_batch(const std::vector<std::int32_t>& t, Index batch = 1) {
  return {t.data(), gqe::Shape{batch, static_cast<Index>(t.size()) / batch}};
}

struct ModelCase {
  const char* name;
  gqe::AttentionType type;
  gqe::GqeVariant variant;
  Index top_k;
};

class ModelTest : public ::testing::TestWithParam<ModelCase> {
 protected:
  template <class Scalar = double>
  gqe::Transformer<Scalar> model() const {
    const auto& p = GetParam();
    gqe::Transformer<Scalar> m(small_config(p.type, p.variant, p.top_k));
    randomise(m, 7);
    return m;
  }
};

// Logits [T, V] of a 1-sequence prefill.
template <class Scalar>
gqe::Tensor<Scalar> prefill(const gqe::Transformer<Scalar>& m, const std::vector<std::int32_t>& tokens) {
  auto caches = std::vector<gqe::KVCache<Scalar>>{m.new_cache()};
  return m.prefill(as_batch(tokens), caches);
}

// The library's own kernels are batch invariant; a GEMM backend's (GQE_GEMM=openblas or onednn,
// float products only) are not, and are held to float tolerance instead.
template <class Scalar>
constexpr bool kBitExact = !std::is_same_v<Scalar, float> || std::string_view(gqe::backend::kName) == "eigen";

// a's sequence s, position t and b's sequence s2, position t2: the same bits (or, see kBitExact,
// within 1e-5 of each other, norm-wise).
template <class Scalar>
bool same_bits(const gqe::Tensor<Scalar>& a, Index s, Index t, const gqe::Tensor<Scalar>& b, Index s2, Index t2) {
  const auto x = a.view()[s][t].flat(), y = b.view()[s2][t2].flat();
  if (x.size() != y.size()) return false;
  if (!kBitExact<Scalar>) return (x - y).norm() <= 1e-5 * y.norm();
  return std::memcmp(x.data(), y.data(), sizeof(Scalar) * static_cast<std::size_t>(x.size())) == 0;
}

template <class Scalar>
void check_later_tokens_change_nothing(const gqe::Transformer<Scalar>& m) {
  const auto tokens = random_tokens(21, 37, 1);
  const auto base = prefill(m, tokens);
  for (Index changed : {20, 11, 3}) {
    auto other = tokens;
    other[static_cast<std::size_t>(changed)] = (other[static_cast<std::size_t>(changed)] + 5) % 37;
    const auto logits = prefill(m, other);
    for (Index t = 0; t < changed; ++t)
      EXPECT_TRUE(same_bits(logits, 0, t, base, 0, t)) << "position " << t << " changed when token " << changed << " changed";
    EXPECT_FALSE(same_bits(logits, 0, changed, base, 0, changed)) << "the changed token's own logits did not change";
  }
  // A prompt cut short: its positions are those of the longer prompt, bit for bit.
  const auto shorter = prefill(m, std::vector<std::int32_t>(tokens.begin(), tokens.begin() + 7));
  for (Index t = 0; t < 7; ++t) EXPECT_TRUE(same_bits(shorter, 0, t, base, 0, t)) << "position " << t << " of a 7-token prompt";
}

TEST_P(ModelTest, ChangingALaterTokenNeverChangesEarlierLogits) {
  check_later_tokens_change_nothing(model<float>());
  check_later_tokens_change_nothing(model<double>());
}

template <class Scalar>
void check_stepwise_and_chunks(const gqe::Transformer<Scalar>& m) {
  const auto tokens = random_tokens(19, 37, 2);
  const auto full = prefill(m, tokens);

  gqe::Tensor<Scalar> stepwise(gqe::Shape{1, 19, 37});
  auto step_caches = std::vector<gqe::KVCache<Scalar>>{m.new_cache()};
  for (Index t = 0; t < 19; ++t) {
    const auto l = m.decode(gqe::TensorView<const std::int32_t>(&tokens[static_cast<std::size_t>(t)], gqe::Shape{1}), step_caches);
    stepwise.view()[0][t].flat() = l.view()[0].flat();
  }
  for (Index t = 0; t < 19; ++t) EXPECT_TRUE(same_bits(stepwise, 0, t, full, 0, t)) << "stepwise, position " << t;

  // Chunks of 5, 1, 13 tokens appended to the cache: the mask is aligned bottom-right.
  gqe::Tensor<Scalar> chunked(gqe::Shape{1, 19, 37});
  auto chunk_caches = std::vector<gqe::KVCache<Scalar>>{m.new_cache()};
  Index begin = 0;
  for (Index len : {5, 1, 13}) {
    std::vector<std::int32_t> chunk(tokens.begin() + begin, tokens.begin() + begin + len);
    const auto l = m.prefill(as_batch(chunk), chunk_caches);
    chunked.view()[0].slice(begin, len).flat() = l.view()[0].flat();
    begin += len;
  }
  for (Index t = 0; t < 19; ++t) EXPECT_TRUE(same_bits(chunked, 0, t, full, 0, t)) << "chunked, position " << t;
  EXPECT_EQ(chunk_caches[0].length(), 19);
}

TEST_P(ModelTest, StepwiseDecodeAndChunksEqualPrefill) {
  check_stepwise_and_chunks(model<float>());
  check_stepwise_and_chunks(model<double>());
}

template <class Scalar>
void check_batches(const gqe::Transformer<Scalar>& m) {
  const auto a = random_tokens(9, 37, 3), b = random_tokens(9, 37, 4), c = random_tokens(9, 37, 13);
  // Sequence a beside b, and beside c (other companions route elsewhere): a's logits, bit for bit,
  // are those of a alone.
  const auto alone = prefill(m, a);
  for (const auto* companion : {&b, &c}) {
    std::vector<std::int32_t> both(*companion);
    both.insert(both.end(), a.begin(), a.end());
    auto caches = std::vector<gqe::KVCache<Scalar>>{m.new_cache(), m.new_cache()};
    const auto batch = m.prefill(as_batch(both, 2), caches);
    for (Index t = 0; t < 9; ++t) EXPECT_TRUE(same_bits(batch, 1, t, alone, 0, t)) << "position " << t;
  }
  // One decode step advancing two sequences of different lengths: each equals its own prefill.
  std::vector<std::int32_t> both(a);
  both.insert(both.end(), b.begin(), b.end());
  auto batch_caches = std::vector<gqe::KVCache<Scalar>>{m.new_cache(), m.new_cache()};
  m.prefill(as_batch(both, 2), batch_caches);
  std::vector<std::int32_t> extra = {5, 6, 7};
  std::vector<gqe::KVCache<Scalar>> one{std::move(batch_caches[0])};
  m.prefill(as_batch(extra), one);
  std::vector<gqe::KVCache<Scalar>> mixed{std::move(one[0]), std::move(batch_caches[1])};
  const std::vector<std::int32_t> next = {11, 12};
  const auto step = m.decode(gqe::TensorView<const std::int32_t>(next.data(), gqe::Shape{2}), mixed);
  EXPECT_EQ(mixed[0].length(), 13);
  EXPECT_EQ(mixed[1].length(), 10);
  gqe::Tensor<Scalar> step3 = step;
  step3.resize(gqe::Shape{2, 1, 37});
  for (Index s = 0; s < 2; ++s) {
    std::vector<std::int32_t> full(s ? b : a);
    if (s == 0) full.insert(full.end(), extra.begin(), extra.end());
    full.push_back(next[static_cast<std::size_t>(s)]);
    const auto ref = prefill(m, full);
    EXPECT_TRUE(same_bits(step3, s, 0, ref, 0, static_cast<Index>(full.size()) - 1)) << "sequence " << s;
  }
}

TEST_P(ModelTest, BatchEqualsSingleSequencesInPrefillAndDecode) {
  check_batches(model<float>());
  check_batches(model<double>());
}

// A forward that fails part-way (here: layer 1's weights missing) leaves every cache as it was;
// the caches keep working once the model is whole again.
TEST_P(ModelTest, AFailedForwardLeavesTheCachesAsTheyWere) {
  auto m = model<float>();
  const auto tokens = random_tokens(12, 37, 14);
  auto caches = std::vector<gqe::KVCache<float>>{m.new_cache(), m.new_cache()};
  const std::vector<std::int32_t> first(tokens.begin(), tokens.begin() + 10);
  m.prefill(as_batch(first, 2), caches);
  gqe::Weight saved;
  m.for_each_parameter([&](const std::string& name, gqe::Weight& w) {
    if (name == "model.layers.1.self_attn.v_proj.weight") {
      saved = w;
      w = gqe::Weight(w.shape());  // no storage: layer 1 refuses to run, after layer 0 ran
    }
  });
  const std::vector<std::int32_t> more(tokens.begin() + 10, tokens.end());
  EXPECT_THROW(m.prefill(as_batch(more, 2), caches), gqe::InputError);
  for (const auto& c : caches) {
    EXPECT_EQ(c.length(), 5);
    for (Index l = 0; l < c.num_layers(); ++l) EXPECT_EQ(c.layer(l).length(), 5) << "layer " << l;
  }
  m.for_each_parameter([&](const std::string& name, gqe::Weight& w) {
    if (name == "model.layers.1.self_attn.v_proj.weight") w = saved;
  });
  const auto continued = m.prefill(as_batch(more, 2), caches);
  std::vector<std::int32_t> whole(tokens.begin(), tokens.begin() + 5);
  whole.insert(whole.end(), tokens.begin() + 10, tokens.begin() + 11);
  const auto ref = prefill(m, whole);
  EXPECT_TRUE(same_bits(continued, 0, 0, ref, 0, 5));
}

TEST_P(ModelTest, BitIdenticalAcrossThreadCountsAndConcurrentCallers) {
  gqe::Transformer<float> m(small_config(GetParam().type, GetParam().variant, GetParam().top_k));
  randomise(m, 9);
  const auto tokens = random_tokens(150, 37, 5);  // more than two query tiles
  const auto run = [&] {
    auto caches = std::vector<gqe::KVCache<float>>{m.new_cache()};
    auto logits = m.prefill(as_batch(tokens), caches);
    std::vector<std::int32_t> next = {3};
    auto step = m.decode(gqe::TensorView<const std::int32_t>(next.data(), gqe::Shape{1}), caches);
    std::vector<float> all(logits.data(), logits.data() + logits.numel());
    all.insert(all.end(), step.data(), step.data() + step.numel());
    return all;
  };
  gqe::set_num_threads(1);
  const auto serial = run();
  for (int threads : {2, 3, 4}) {
    gqe::set_num_threads(threads);
    EXPECT_EQ(run(), serial) << "with " << threads << " threads";
  }
  // Four user threads sharing the read-only model, each with its own caches.
  std::atomic<int> mismatches{0};
  std::vector<std::thread> users;
  for (int u = 0; u < 4; ++u)
    users.emplace_back([&] {
      for (int rep = 0; rep < 3; ++rep)
        if (run() != serial) ++mismatches;
    });
  for (auto& t : users) t.join();
  EXPECT_EQ(mismatches.load(), 0);
  gqe::set_num_threads(gqe::default_thread_count());
}

// On one thread: each pool worker allocates its own scratch the first time it runs a unit, which a
// warm-up cannot be sure to reach. The pool's own hand-out is checked without allocation below.
TEST_P(ModelTest, WarmDecodeStepAllocatesNothing) {
  gqe::set_num_threads(1);
  gqe::Transformer<float> m(small_config(GetParam().type, GetParam().variant, GetParam().top_k));
  randomise(m, 11);
  const auto prompt = random_tokens(40, 37, 8);
  std::vector<gqe::KVCache<float>> caches{m.new_cache(), m.new_cache()};
  for (auto& c : caches) c.reserve(100);
  std::vector<std::int32_t> both(prompt);
  both.insert(both.end(), prompt.rbegin(), prompt.rend());
  m.prefill(as_batch(both, 2), caches);
  gqe::Tensor<float> logits(gqe::Shape{2, 37});
  std::vector<std::int32_t> next = {1, 2};
  const gqe::TensorView<const std::int32_t> step(next.data(), gqe::Shape{2, 1});
  for (int i = 0; i < 3; ++i) m.forward(step, caches, logits, true);  // warm-up: every thread's scratch
  allocations = 0;
  counting = true;
  for (int i = 0; i < 20; ++i) m.forward(step, caches, logits, true);
  counting = false;
  if (!GQE_COUNT_MALLOC) GTEST_SKIP() << "allocations are not counted under a sanitizer";
  gqe::set_num_threads(gqe::default_thread_count());
  EXPECT_EQ(allocations.load(), 0);
  EXPECT_EQ(caches[0].length(), 63);
}

TEST(ThreadPool, ParallelForAllocatesNothingOnceWarm) {
  gqe::ThreadPool pool(3);
  std::vector<double> out(64);
  const auto body = [&](Index i) { out[static_cast<std::size_t>(i)] = std::sqrt(static_cast<double>(i)); };
  pool.parallel_for(64, body);
  allocations = 0;
  counting = true;
  for (int i = 0; i < 200; ++i) pool.parallel_for(64, body);
  counting = false;
  if (!GQE_COUNT_MALLOC) GTEST_SKIP() << "allocations are not counted under a sanitizer";
  EXPECT_EQ(allocations.load(), 0);
  EXPECT_EQ(out[63], std::sqrt(63.0));
}

TEST(ThreadPool, RethrowsTheExceptionOfAUnitAfterAllUnitsFinish) {
  gqe::ThreadPool pool(2);
  std::atomic<int> ran{0};
  EXPECT_THROW(pool.parallel_for(50,
                                 [&](Index i) {
                                   ++ran;
                                   if (i == 7) throw gqe::InputError("unit 7");
                                 }),
               gqe::InputError);
  EXPECT_EQ(ran.load(), 50);
  EXPECT_THROW(gqe::ThreadPool(0), gqe::ConfigError);
}

// Every row exactly once, for row counts around the run length, large work (run on the pool's
// threads) and small (on the caller's alone).
TEST(ThreadPool, ParallelRowsVisitsEveryRowOnce) {
  gqe::set_num_threads(3);
  for (const Index rows : {0, 1, 63, 64, 65, 200}) {
    for (const double work : {1.0, 1e9}) {
      std::vector<std::atomic<int>> visits(static_cast<std::size_t>(rows));
      gqe::parallel_rows(rows, work, [&](Index r) { ++visits[static_cast<std::size_t>(r)]; });
      for (Index r = 0; r < rows; ++r) EXPECT_EQ(visits[static_cast<std::size_t>(r)].load(), 1) << "row " << r << " of " << rows;
    }
  }
  gqe::set_num_threads(gqe::default_thread_count());
}

// A unit may call parallel_for: its job's units go to threads that are free. Two outer units on a
// pool of four leave two threads free, which must take part in the inner jobs (units sleep, so that
// they do before the posting threads finish alone); every inner unit runs exactly once.
TEST(ThreadPool, NestedParallelForRunsOnFreeThreads) {
  gqe::ThreadPool pool(4);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the workers have started and wait
  constexpr Index kInner = 40;
  std::vector<std::atomic<int>> runs(2 * kInner);
  std::mutex mutex;
  std::set<std::thread::id> inner_threads;
  pool.parallel_for(2, [&](Index outer) {
    pool.parallel_for(kInner, [&](Index i) {
      ++runs[static_cast<std::size_t>(outer * kInner + i)];
      {
        std::lock_guard<std::mutex> lock(mutex);
        inner_threads.insert(std::this_thread::get_id());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    });
  });
  for (const auto& r : runs) EXPECT_EQ(r.load(), 1);
  EXPECT_GT(inner_threads.size(), 2u);
}

// Nesting deeper than the pool keeps jobs for runs serially; an exception deep inside reaches the
// outermost caller after every unit has run.
TEST(ThreadPool, DeepNestingFinishesAndRethrows) {
  gqe::ThreadPool pool(3);
  std::atomic<int> leaves{0};
  std::function<void(int)> nest = [&](int depth) {
    if (depth == 7) {
      ++leaves;
      return;
    }
    pool.parallel_for(2, [&](Index) { nest(depth + 1); });
  };
  nest(0);
  EXPECT_EQ(leaves.load(), 128);
  leaves = 0;
  std::function<void(int)> failing = [&](int depth) {
    if (depth == 6) {
      if (++leaves == 10) throw gqe::InputError("leaf 10");
      return;
    }
    pool.parallel_for(2, [&](Index) { failing(depth + 1); });
  };
  EXPECT_THROW(failing(0), gqe::InputError);
  EXPECT_EQ(leaves.load(), 64);
}

// A pool the system cannot fully start (here: an address-space limit too small for 512 thread
// stacks) stops the threads it started and says so, instead of hanging; the library's pool stays
// as it was. Sanitizers reserve terabytes of address space, so no such limit can be set there.
TEST(ThreadPool, FailsCleanlyWhenTheSystemRefusesThreads) {
  if (!GQE_COUNT_MALLOC) GTEST_SKIP() << "an address-space limit cannot be set under a sanitizer";
  gqe::set_num_threads(2);
  long pages = 0;
  std::ifstream("/proc/self/statm") >> pages;
  ASSERT_GT(pages, 0);
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_AS, &old), 0);
  rlimit low = old;
  low.rlim_cur = static_cast<rlim_t>(pages) * static_cast<rlim_t>(sysconf(_SC_PAGESIZE)) + (rlim_t(256) << 20);
  ASSERT_EQ(setrlimit(RLIMIT_AS, &low), 0);
  std::string message;
  try {
    gqe::ThreadPool pool(512);
  } catch (const gqe::ConfigError& e) {
    message = e.what();
  }
  bool kept = false;
  try {
    gqe::set_num_threads(512);
  } catch (const gqe::ConfigError&) {
    kept = gqe::num_threads() == 2;
  }
  ASSERT_EQ(setrlimit(RLIMIT_AS, &old), 0);
  EXPECT_NE(message.find("the system refused to start thread"), std::string::npos) << message;
  EXPECT_TRUE(kept) << "set_num_threads must keep the old pool when the new one cannot start";
  gqe::ThreadPool after(8);  // the stopped threads released everything
  EXPECT_EQ(after.threads(), 8);
  gqe::set_num_threads(gqe::default_thread_count());
}

// set_num_threads replaces the library's pool while other threads run parallel_for on it: each
// call keeps the pool it started on alive until it returns (the old design destroyed it under them).
TEST(ThreadPool, SetNumThreadsWhileOtherThreadsRunParallelFor) {
  std::atomic<bool> done{false};
  std::atomic<int> wrong{0};
  std::vector<std::thread> users;
  for (int u = 0; u < 2; ++u)
    users.emplace_back([&, u] {
      std::vector<double> out(97);
      for (int rep = 0; rep < 300 || !done; ++rep) {
        gqe::thread_pool().parallel_for(
            97, [&](Index i) { out[static_cast<std::size_t>(i)] = static_cast<double>(i * (u + 2)); }, 1e9);
        for (Index i = 0; i < 97; ++i) wrong += out[static_cast<std::size_t>(i)] != static_cast<double>(i * (u + 2));
        if (rep > 100000) break;
      }
    });
  for (int i = 0; i < 60; ++i) gqe::set_num_threads(1 + i % 4);
  done = true;
  for (auto& t : users) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(gqe::num_threads(), 4);
  gqe::set_num_threads(gqe::default_thread_count());
}

// The default follows the CPUs this thread may run on, not the machine's count.
TEST(ThreadPool, DefaultThreadCountFollowsTheAffinityMask) {
  cpu_set_t saved;
  ASSERT_EQ(sched_getaffinity(0, sizeof saved, &saved), 0);
  EXPECT_LE(gqe::default_thread_count(), std::max(1, CPU_COUNT(&saved)));
  int first = 0;
  while (!CPU_ISSET(first, &saved)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
  const int count = gqe::default_thread_count();
  ASSERT_EQ(sched_setaffinity(0, sizeof saved, &saved), 0);
  EXPECT_EQ(count, 1);
}

// A container's CPU quota, as cgroup v2 and v1 file systems write it (laid out in a temporary folder).
TEST(ThreadPool, CgroupQuotaLimitsTheDefaultThreadCount) {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / ("gqe_cgroup_" + std::to_string(getpid()));
  fs::remove_all(root);
  const auto put = [&](const fs::path& file, const std::string& text) {
    fs::create_directories((root / file).parent_path());
    std::ofstream(root / file) << text << "\n";
  };
  // v2: the tightest quota of the cgroup and its ancestors, rounded up.
  put("a/b/cpu.max", "max 100000");
  EXPECT_EQ(gqe::detail::cgroup_cpu_limit("0::/a/b\n", root), 0);
  put("a/cpu.max", "150000 100000");
  EXPECT_EQ(gqe::detail::cgroup_cpu_limit("0::/a/b\n", root), 2);
  put("a/b/cpu.max", "50000 100000");
  EXPECT_EQ(gqe::detail::cgroup_cpu_limit("0::/a/b\n", root), 1);
  put("cpu.max", "garbage");
  EXPECT_EQ(gqe::detail::cgroup_cpu_limit("0::/\n", root), 0);
  // v1: the cpu controller's own hierarchy, mounted under its controller list.
  put("cpu,cpuacct/x/cpu.cfs_quota_us", "-1");
  put("cpu,cpuacct/x/cpu.cfs_period_us", "100000");
  const std::string v1 = "5:memory:/x\n4:cpu,cpuacct:/x\n0::/\n";
  EXPECT_EQ(gqe::detail::cgroup_cpu_limit(v1, root), 0);
  put("cpu,cpuacct/x/cpu.cfs_quota_us", "300000");
  EXPECT_EQ(gqe::detail::cgroup_cpu_limit(v1, root), 3);
  EXPECT_EQ(gqe::detail::cgroup_cpu_limit("4:memory:/x\n", root), 0);  // no cpu controller
  EXPECT_EQ(gqe::detail::cgroup_cpu_limit("", root), 0);
  fs::remove_all(root);
  const int count = gqe::default_thread_count();
  EXPECT_GE(count, 1);
  EXPECT_LE(count, 1024);
}

TEST_P(ModelTest, RejectsBadInputsWithClearErrors) {
  const auto m = model();
  auto caches = std::vector<gqe::KVCache<double>>{m.new_cache()};
  const std::vector<std::int32_t> bad = {1, 37};
  EXPECT_THROW(m.prefill(as_batch(bad), caches), gqe::InputError);
  const std::vector<std::int32_t> negative = {-1};
  EXPECT_THROW(m.prefill(as_batch(negative), caches), gqe::InputError);
  auto two = std::vector<gqe::KVCache<double>>{m.new_cache(), m.new_cache()};
  const std::vector<std::int32_t> ok = {1, 2};
  EXPECT_THROW(m.prefill(as_batch(ok), two), gqe::ShapeError);  // B = 1 with 2 caches
  const auto long_prompt = random_tokens(513, 37, 6);
  EXPECT_THROW(m.prefill(as_batch(long_prompt), caches), gqe::InputError);
  EXPECT_EQ(caches[0].length(), 0) << "a refused call must not touch the cache";
}

// Non-finite weights never cause undefined behaviour: the NaN reaches the logits (it is never
// hidden), the router's choices stay inside their groups, and sampling refuses it with an error.
TEST_P(ModelTest, NaNWeightsPropagateToLogitsAndKeepRoutingInRange) {
  auto m = model();
  bool poisoned = false;
  m.for_each_parameter([&](const std::string& name, gqe::Weight& weight) {
    double* w = weight.mutable_data<double>();
    const bool target = m.config().attention_type == gqe::AttentionType::gqe ? name == "model.layers.0.self_attn.router.weight"
                                                                              : name == "model.layers.0.self_attn.q_proj.weight";
    if (target) {
      w[3] = std::numeric_limits<double>::quiet_NaN();
      w[5] = std::numeric_limits<double>::infinity();
      poisoned = true;
    }
  });
  ASSERT_TRUE(poisoned);
  const auto tokens = random_tokens(11, 37, 12);
  auto caches = std::vector<gqe::KVCache<double>>{m.new_cache()};
  gqe::ForwardTrace<double> trace;
  const auto logits = m.prefill(as_batch(tokens), caches, &trace);
  EXPECT_TRUE(logits.view().flat().array().isNaN().any());
  for (const auto& routing : trace.routing) {
    EXPECT_GE(routing.experts.minCoeff(), 0);
    EXPECT_LT(routing.experts.maxCoeff(), m.config().num_heads / m.config().num_kv_heads);
  }
  gqe::Sampler sampler({});
  EXPECT_THROW(sampler.sample(logits.view()[0][10].data(), 37), gqe::InputError);
}

INSTANTIATE_TEST_SUITE_P(
    AllTypes, ModelTest,
    ::testing::Values(ModelCase{"gqa", gqe::AttentionType::gqa, gqe::GqeVariant::gqe, 1},
                      ModelCase{"gqe_k1", gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 1},
                      ModelCase{"gqe_kM", gqe::AttentionType::gqe, gqe::GqeVariant::gqe, 2},
                      ModelCase{"hard_concat", gqe::AttentionType::gqe, gqe::GqeVariant::hard_concat, 1},
                      ModelCase{"weighted_concat", gqe::AttentionType::gqe, gqe::GqeVariant::weighted_concat, 2}),
    [](const auto& info) { return std::string(info.param.name); });

// ---- sampling ---------------------------------------------------------------------------------

TEST(Sampler, GreedyTakesTheFirstMaximum) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  gqe::Sampler s({});
  EXPECT_EQ(s.sample(logits.data(), 4), 1);
}

TEST(Sampler, TopKAndTopPRestrictTheCandidates) {
  const std::vector<double> logits = {3.0, 2.9, 0.0, -1.0, 2.95};
  // top-k 2 keeps ids 0 and 4 only.
  gqe::Sampler topk({1.0, 2, 1.0, 123});
  for (int i = 0; i < 200; ++i) {
    const int id = topk.sample(logits.data(), 5);
    EXPECT_TRUE(id == 0 || id == 4) << id;
  }
  // top-p 0.3: the single most likely token already reaches 0.3 of the mass.
  gqe::Sampler topp({1.0, 0, 0.3, 5});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(topp.sample(logits.data(), 5), 0);
}

TEST(Sampler, FollowsTheDistributionAndIsSeeded) {
  const std::vector<double> logits = {std::log(0.6), std::log(0.3), std::log(0.1)};
  gqe::Sampler a({1.0, 0, 1.0, 42}), b({1.0, 0, 1.0, 42});
  std::vector<int> counts(3);
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const int x = a.sample(logits.data(), 3);
    EXPECT_EQ(x, b.sample(logits.data(), 3));
    ++counts[static_cast<std::size_t>(x)];
  }
  // Binomial standard deviation at p = 0.3 over 20000 draws is 0.0032; allow 5 sigma.
  EXPECT_NEAR(counts[0] / double(n), 0.6, 0.017);
  EXPECT_NEAR(counts[1] / double(n), 0.3, 0.016);
  EXPECT_NEAR(counts[2] / double(n), 0.1, 0.011);
}

// exp(inf - inf) would be NaN: every comparison with it is false, and the draw fell through to the
// last candidate. A +inf logit wins; several share equally; a tiny temperature is nearly greedy.
TEST(Sampler, InfiniteLogitsAndTinyTemperaturesDrawTheLimit) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> one_inf = {0.0f, inf, 1.0f, -inf};
  for (double t : {1.0, 1e-300}) {
    gqe::Sampler s({t, 0, 1.0, 7});
    for (int i = 0; i < 50; ++i) EXPECT_EQ(s.sample(one_inf.data(), 4), 1) << "temperature " << t;
  }
  gqe::Sampler greedy({});
  EXPECT_EQ(greedy.sample(one_inf.data(), 4), 1);
  // Two +inf logits share the draws; the finite ones (even the larger 5) get none.
  const std::vector<double> two_inf = {5.0, std::numeric_limits<double>::infinity(), 0.0,
                                       std::numeric_limits<double>::infinity()};
  gqe::Sampler shared({0.8, 0, 1.0, 3});
  int first = 0;
  for (int i = 0; i < 400; ++i) {
    const int id = shared.sample(two_inf.data(), 4);
    ASSERT_TRUE(id == 1 || id == 3) << id;
    first += id == 1;
  }
  EXPECT_GT(first, 120);
  EXPECT_LT(first, 280);
  // Finite logits whose quotients by the temperature overflow to +inf: the largest one wins.
  const std::vector<double> large = {1.0, 3.0, 2.0, -1.0};
  gqe::Sampler tiny({1e-310, 0, 1.0, 11});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(tiny.sample(large.data(), 4), 1);
  // A -inf logit is never drawn; all of them -inf is no distribution at all.
  const std::vector<float> minus = {-inf, 0.0f, -inf};
  gqe::Sampler s({2.0, 0, 1.0, 1});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(s.sample(minus.data(), 3), 1);
  const std::vector<float> none = {-inf, -inf};
  EXPECT_THROW(s.sample(none.data(), 2), gqe::InputError);
  EXPECT_THROW(greedy.sample(none.data(), 2), gqe::InputError);
}

TEST(Sampler, RejectsBadSettingsAndNaN) {
  EXPECT_THROW(gqe::Sampler({-1.0, 0, 1.0, 0}), gqe::ConfigError);
  EXPECT_THROW(gqe::Sampler({1.0, -2, 1.0, 0}), gqe::ConfigError);
  EXPECT_THROW(gqe::Sampler({1.0, 0, 0.0, 0}), gqe::ConfigError);
  EXPECT_THROW(gqe::Sampler({1.0, 0, 1.5, 0}), gqe::ConfigError);
  const std::vector<float> nan = {0.0f, std::nanf("")};
  gqe::Sampler s({});
  EXPECT_THROW(s.sample(nan.data(), 2), gqe::InputError);
}

}  // namespace
