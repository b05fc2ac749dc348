// gqe-bench: the Google Benchmark suite of gqe (bench_*.cpp) with the machine's FMA peak and read
// bandwidth measured in the same run, and two modes of its own: timing a user's checkpoint folder
// (--model) and one attention layer of any shape, dense against GQE (--layer-speedup).
#include <benchmark/benchmark.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <new>
#include <set>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "checkpoint_bench.hpp"
#include "gqe/build_info.hpp"
#include "gqe/version.hpp"
#include "layer_speedup.hpp"

namespace {

constexpr const char* kUsage = R"(Usage:
  gqe-bench [--threads N] [--no-probe] [Google Benchmark flags]   the suite (see below)
  gqe-bench --model DIR [--prompt-tokens T] [--decode-tokens N] [--no-mmap] [--dtype stored|f32]
            [--panels 16bit|all|none] [--threads N]
  gqe-bench --layer-speedup [--hidden D] [--heads N] [--kv-heads G] [--head-dim DH] [--top-k K]
            [--variant gqe|hard_concat|weighted_concat] [--tokens T] [--rounds R] [--peak] [--threads N]
  gqe-bench --version | --help

The suite times one attention layer of the paper's shape (d=1024, d_h=64, N=16, G=8, k=1) dense and
GQE in prefill and decode, the attention kernel alone, the products' register tile, plain GEMMs and
a small whole model. Before it runs, the machine's float32 FMA peak and memory read bandwidth are
measured (--no-probe skips that), and every rate is also given as a share of them (of_peak,
of_bandwidth). Counters print as "GFLOP=81.7/s": 81.7 GFLOP per second.

--model DIR       time a checkpoint folder as gqe-run uses it: load, first and warm prefill of T
                  tokens (default 128, at most the positions the N decode steps leave), N decode
                  steps (default 64, fewer than the model's positions), the same steps again in
                  blocks in turn with passes of the read probe (medians compared), peak resident
                  memory. --no-mmap reads the files instead of mapping them;
                  --dtype f32 widens BF16/F16 weights at load instead of keeping them 16-bit;
                  --panels says which matrices are re-laid into panels after loading (as gqe-run).
--layer-speedup   print, as JSON, the prefill time of one dense GQA layer and one GQE layer of
                  the given shape (defaults: the paper's), the median speed-up over R interleaved
                  rounds (default 5) and its FLOP ceiling. --peak also runs a trial of the FMA
                  probe after each round and gives both layers' useful GFLOP/s as shares of the
                  median trial (dense_of_peak, gqe_of_peak): the peak measured in turn with them.
--threads N       the library's threads (default: the CPUs this process may use; or GQE_THREADS=N).
A flag's value may also follow an '=' (--threads=2), as with Google Benchmark's own flags.

Google Benchmark's own flags follow. Its "library was built as DEBUG" warning and the JSON field
library_build_type describe Debian's build of Google Benchmark itself, not gqe's code, which is
compiled as the context's build_type and flags say.
)";

// A decimal integer in [lo, hi] (no sign, no leading zero but "0"), or a message on stderr.
bool parse_integer(const char* flag, const char* text, long lo, long hi, long& out) {
  const std::string s = text;
  const bool digits = !s.empty() && s.find_first_not_of("0123456789") == std::string::npos && (s == "0" || s[0] != '0');
  errno = 0;
  const long value = digits ? std::strtol(text, nullptr, 10) : 0;
  if (!digits || errno == ERANGE || value < lo || value > hi) {
    std::fprintf(stderr, "gqe-bench: error: %s is \"%s\"; expected a whole number from %ld to %ld\n", flag, text, lo, hi);
    return false;
  }
  out = value;
  return true;
}

// The value of the first /proc/cpuinfo line that starts with `key`, or "unknown".
std::string cpuinfo(const std::string& key) {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(key, 0) == 0) {
      const auto colon = line.find(':');
      const auto value = colon == std::string::npos ? std::string::npos : line.find_first_not_of(" \t", colon + 1);
      return value == std::string::npos ? "unknown" : line.substr(value);
    }
  return "unknown";
}

// Vendor, family, model and stepping: a virtual machine's model name ("AMD EPYC") may name no
// generation, and these tell them apart (AMD family 25 is Zen 3 and Zen 4, 26 is Zen 5).
std::string cpu_model() {
  return cpuinfo("vendor_id") + " family " + cpuinfo("cpu family") + " model " + cpuinfo("model\t") + " stepping " +
         cpuinfo("stepping");
}

void add_context(const gqe::bench::MachinePeaks& peaks, bool probed) {
  benchmark::AddCustomContext("gqe_version", GQE_VERSION_STRING);
  benchmark::AddCustomContext("cpu", cpuinfo("model name"));
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("simd_level", gqe::simd_level());
  benchmark::AddCustomContext("gemm_backend", gqe::gemm_backend());
  if (const std::string kernels = gqe::gemm_backend_kernels(); !kernels.empty())
    benchmark::AddCustomContext("gemm_backend_kernels", kernels);
  if (const std::string warning = gqe::gemm_backend_warning(); !warning.empty())
    benchmark::AddCustomContext("gemm_backend_warning", warning);
  benchmark::AddCustomContext("compiler", gqe::compiler_name());
  benchmark::AddCustomContext("build_type", GQE_BENCH_BUILD_TYPE);
  benchmark::AddCustomContext("flags", GQE_BENCH_FLAGS);
  benchmark::AddCustomContext("gqe_threads", std::to_string(gqe::num_threads()));
  benchmark::AddCustomContext("library_build_type_note",
                              "library_build_type is Google Benchmark's own build; gqe's code is build_type with flags");
  if (!probed) return;
  benchmark::AddCustomContext("fma_peak_gflops_1_thread", std::to_string(peaks.fma_gflops_one));
  benchmark::AddCustomContext("fma_peak_gflops", std::to_string(peaks.fma_gflops_all));
  benchmark::AddCustomContext("read_bandwidth_gbps", std::to_string(peaks.read_gbps));
}

}  // namespace

int main(int argc, char** argv) {
  long threads = gqe::default_thread_count(), value = 0;
  if (const char* env = std::getenv("GQE_THREADS"))
    if (!parse_integer("GQE_THREADS", env, 1, 1024, threads)) return 2;
  bool probe = true, checkpoint = false, layer = false, help = false;
  gqe::bench::CheckpointOptions model;
  gqe::bench::LayerShape shape;
  // A value may follow its flag after '=' (--threads=2), the form Google Benchmark's flags use:
  // theirs (--benchmark_..., --v) pass on whole, any other "--flag=value" is read as "--flag value",
  // so that the parsing below sees one form.
  std::vector<std::string> given;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const std::size_t eq = a.find('=');
    const bool theirs = a.rfind("--benchmark_", 0) == 0 || a.rfind("--v=", 0) == 0;
    const bool split = a.rfind("--", 0) == 0 && eq != std::string::npos && !theirs;
    given.push_back(split ? a.substr(0, eq) : a);
    if (split) given.push_back(a.substr(eq + 1));
  }
  std::vector<char*> one_form{argv[0]};
  for (std::string& a : given) one_form.push_back(a.data());
  argc = static_cast<int>(one_form.size());
  argv = one_form.data();
  std::vector<char*> args{argv[0]};
  const auto integer_flag = [&](int& i, const char* flag, long lo, long hi, auto& out) {
    if (i + 1 >= argc) {
      std::fprintf(stderr, "gqe-bench: error: %s needs a value\n", flag);
      return false;
    }
    if (!parse_integer(flag, argv[++i], lo, hi, value)) return false;
    out = static_cast<std::remove_reference_t<decltype(out)>>(value);
    return true;
  };
  // gqe-bench's own flags: each at most once, and those of one mode only with that mode.
  const std::set<std::string> model_flags = {"--prompt-tokens", "--decode-tokens", "--no-mmap", "--dtype", "--panels"};
  const std::set<std::string> layer_flags = {"--hidden", "--heads", "--kv-heads", "--head-dim", "--top-k",
                                             "--tokens",  "--rounds", "--peak",    "--variant"};
  const std::set<std::string> valued = {"--model", "--dtype", "--panels", "--variant"};  // besides the integers'
  std::set<std::string> seen;
  std::vector<std::string> seen_model_flags, seen_layer_flags;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    bool ok = true;
    if (model_flags.count(a) || layer_flags.count(a) || valued.count(a) || a == "--threads" || a == "--no-probe" ||
        a == "--layer-speedup") {
      if (!seen.insert(a).second) {
        std::fprintf(stderr, "gqe-bench: error: %s is given twice; expected it once\n", a.c_str());
        return 2;
      }
      if (valued.count(a) && i + 1 >= argc) {
        std::fprintf(stderr, "gqe-bench: error: %s needs a value\n", a.c_str());
        return 2;
      }
      if (model_flags.count(a)) seen_model_flags.push_back(a);
      if (layer_flags.count(a)) seen_layer_flags.push_back(a);
    }
    if (a == "--version") {
      std::printf("gqe-bench %s (gqe %s, SIMD %s, GEMM backend %s)\n", GQE_VERSION_STRING, GQE_VERSION_STRING,
                  gqe::simd_level().c_str(), gqe::gemm_backend_description().c_str());
      return 0;
    } else if (a == "--help" || a == "-h") {
      help = true;
      args.push_back(argv[i]);
    } else if (a == "--threads") ok = integer_flag(i, "--threads", 1, 1024, threads);
    else if (a == "--no-probe") probe = false;
    else if (a == "--model") checkpoint = true, model.dir = argv[++i];
    else if (a == "--prompt-tokens") ok = integer_flag(i, "--prompt-tokens", 1, 1 << 24, model.prompt_tokens);
    else if (a == "--decode-tokens") ok = integer_flag(i, "--decode-tokens", 1, 1 << 24, model.decode_tokens);
    else if (a == "--no-mmap") model.load.map = false;
    else if (a == "--dtype") {
      const std::string d = argv[++i];
      if (d != "stored" && d != "f32") {
        std::fprintf(stderr, "gqe-bench: error: --dtype is \"%s\"; expected stored or f32\n", d.c_str());
        return 2;
      }
      model.load.keep_16bit = d == "stored";
    } else if (a == "--panels") {
      const std::string p = argv[++i];
      const auto layout = gqe::panel_layout_from_name(p);
      if (!layout) {
        std::string names;
        for (gqe::PanelLayout each : gqe::kPanelLayouts) names += std::string(names.empty() ? "" : ", ") + gqe::panel_layout_name(each);
        std::fprintf(stderr, "gqe-bench: error: --panels is \"%s\"; expected one of %s\n", p.c_str(), names.c_str());
        return 2;
      }
      model.load.panels = *layout;
    } else if (a == "--layer-speedup") layer = true;
    else if (a == "--hidden") ok = integer_flag(i, "--hidden", 1, 1 << 16, shape.hidden);
    else if (a == "--heads") ok = integer_flag(i, "--heads", 1, 1024, shape.heads);
    else if (a == "--kv-heads") ok = integer_flag(i, "--kv-heads", 1, 1024, shape.kv_heads);
    else if (a == "--head-dim") ok = integer_flag(i, "--head-dim", 2, 2048, shape.head_dim);
    else if (a == "--top-k") ok = integer_flag(i, "--top-k", 1, 1024, shape.top_k);
    else if (a == "--tokens") ok = integer_flag(i, "--tokens", 1, 1 << 20, shape.tokens);
    else if (a == "--rounds") ok = integer_flag(i, "--rounds", 1, 1000, shape.rounds);
    else if (a == "--peak") shape.peak = true;
    else if (a == "--variant") {
      try {
        shape.variant = gqe::gqe_variant_from_string(argv[++i]);
      } catch (const gqe::Error& e) {
        std::fprintf(stderr, "gqe-bench: error: %s\n", e.what());
        return 2;
      }
    } else args.push_back(argv[i]);
    if (!ok) return 2;
  }
  const auto refuse_out_of_mode = [](const std::vector<std::string>& flags, const char* mode, const char* here) {
    if (flags.empty()) return false;
    std::fprintf(stderr, "gqe-bench: error: %s is a flag of %s; expected it with that mode, not %s\n", flags[0].c_str(),
                 mode, here);
    return true;
  };
  if (checkpoint && layer) {
    std::fprintf(stderr, "gqe-bench: error: --model and --layer-speedup are two modes; expected one of them\n");
    return 2;
  }
  const char* mode = checkpoint ? "--model" : layer ? "--layer-speedup" : "the suite";
  if ((!checkpoint && refuse_out_of_mode(seen_model_flags, "--model", mode)) ||
      (!layer && refuse_out_of_mode(seen_layer_flags, "--layer-speedup", mode)))
    return 2;
  if (help) std::fputs(kUsage, stdout);
  if (checkpoint || layer) {
    if (help) return 0;
    if (args.size() > 1) {  // what neither mode knows (Google Benchmark's flags are the suite's)
      std::fprintf(stderr, "gqe-bench: error: %s is not a flag of %s; expected those listed by --help\n",
                   gqe::detail::one_line(args[1]).c_str(), checkpoint ? "--model" : "--layer-speedup");
      return 2;
    }
  }
  gqe::set_num_threads(static_cast<int>(threads));
  if (const std::string warning = gqe::gemm_backend_warning(); !warning.empty())
    std::fprintf(stderr, "gqe-bench: warning: %s\n", warning.c_str());
  try {
    if (checkpoint) return gqe::bench::run_checkpoint_benchmark(model);
    if (layer) return gqe::bench::run_layer_speedup(shape);
  } catch (const gqe::Error& e) {
    std::fprintf(stderr, "gqe-bench: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "gqe-bench: error: out of memory; expected a %s that fit in memory\n",
                 checkpoint ? "model and prompt" : "layer shape and token count");
    return 2;
  }
  int count = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&count, args.data());  // --help prints Google Benchmark's flags and exits
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 2;
  if (probe) {
    std::fprintf(stderr, "gqe-bench: measuring the FMA peak and the read bandwidth (--no-probe skips this)...\n");
    gqe::bench::machine_peaks() = gqe::bench::measure_peaks(static_cast<int>(threads));
    const auto& p = gqe::bench::machine_peaks();
    std::fprintf(stderr, "gqe-bench: FMA peak %.1f GFLOP/s on 1 thread, %.1f on %ld; read bandwidth %.1f GB/s\n",
                 p.fma_gflops_one, p.fma_gflops_all, threads, p.read_gbps);
  }
  add_context(gqe::bench::machine_peaks(), probe);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
