// gqe-bench: Google Benchmark's main, plus the thread count of the library's pool and the run's
// context (CPU, compiler, flags) in the JSON beside the figures.
//
//   gqe-bench [--threads N] [Google Benchmark flags]     (or GQE_THREADS=N; default: the machine's cores)
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "gqe/util/thread_pool.hpp"

namespace {

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  return "unknown";
}

// A thread count from the command line or the environment: 1 to 1024, or -1 when malformed.
int parse_threads(const char* text) {
  char* end = nullptr;
  const long n = std::strtol(text, &end, 10);
  return (end == text || *end != '\0' || n < 1 || n > 1024) ? -1 : static_cast<int>(n);
}

}  // namespace

int main(int argc, char** argv) {
  // --threads N / --threads=N is ours; every other argument goes to Google Benchmark.
  int threads = gqe::default_thread_count();
  const char* source = nullptr;
  if (const char* env = std::getenv("GQE_THREADS")) threads = parse_threads(source = env);
  std::vector<char*> args{argv[0]};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
      threads = parse_threads(source = argv[++i]);
    else if (std::strncmp(argv[i], "--threads=", 10) == 0)
      threads = parse_threads(source = argv[i] + 10);
    else
      args.push_back(argv[i]);
  }
  if (threads < 0) {
    std::cerr << "gqe-bench: thread count \"" << source << "\" is not a number from 1 to 1024\n";
    return 2;
  }
  gqe::set_num_threads(threads);

  benchmark::AddCustomContext("cpu", cpu_name());
#if defined(__clang__)
  benchmark::AddCustomContext("compiler", std::string("clang ") + __VERSION__);
#elif defined(__GNUC__)
  benchmark::AddCustomContext("compiler", std::string("GCC ") + __VERSION__);
#else
  benchmark::AddCustomContext("compiler", "unknown");
#endif
  benchmark::AddCustomContext("build_type", GQE_BENCH_BUILD_TYPE);
  benchmark::AddCustomContext("flags", GQE_BENCH_FLAGS);
  benchmark::AddCustomContext("gqe_threads", std::to_string(gqe::num_threads()));
#ifdef GQE_USE_BLAS
  benchmark::AddCustomContext("projections", "OpenBLAS (GQE_USE_BLAS)");
#else
  benchmark::AddCustomContext("projections", "Eigen");
#endif

  int count = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 2;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
