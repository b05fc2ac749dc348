#pragma once
// What a build of gqe computes with, for reports: the SIMD level the compiler targeted, the GEMM
// backend and the compiler. Results are bit-identical within one build; they may differ between
// SIMD levels (wider packets add the same terms in another order) and between backends.
#include <algorithm>
#include <cctype>
#include <string>

#include "gqe/ops/gemm_backend.hpp"

namespace gqe {

// The widest vector instructions this build uses: "avx512f" (with "+bf16" when the compiler may use
// AVX-512 BF16), "avx2" (with FMA, x86-64-v3), "sse4.2" (x86-64-v2), "neon", or "scalar".
inline std::string simd_level() {
#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
  return "avx512f+bf16";
#else
  return "avx512f";
#endif
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#elif defined(__SSE4_2__)
  return "sse4.2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

inline std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#else
  return "unknown";
#endif
}

inline const char* gemm_backend() { return backend::kName; }

// The kernels the GEMM backend picked for this CPU at run time, where it says: OpenBLAS's core name
// ("SkylakeX", "Haswell", ...); empty for the other backends. OpenBLAS chooses by CPU model, and a
// release older than the CPU falls back to generic SSE kernels ("Prescott"), several times slower;
// OPENBLAS_CORETYPE overrides its choice.
inline std::string gemm_backend_kernels() {
#if defined(GQE_GEMM_OPENBLAS)
  const char* core = openblas_get_corename();
  return core ? core : "";
#else
  return "";
#endif
}

// The backend's name, with its kernels where it says: "eigen", "openblas (SkylakeX kernels)".
inline std::string gemm_backend_description() {
  const std::string kernels = gemm_backend_kernels();
  return kernels.empty() ? std::string(gemm_backend()) : std::string(gemm_backend()) + " (" + kernels + " kernels)";
}

// Whether this CPU runs AVX2 and FMA instructions, whatever the build targets (x86-64 with GCC or
// clang; false elsewhere).
inline bool cpu_has_avx2_fma() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// One line for the user when the backend's kernels are far below what the CPU can run, else empty:
// OpenBLAS on a CPU with AVX2 and FMA that it took for an older one (its products then run 5-7x
// slower, measured on an Intel Xeon that Debian's OpenBLAS 0.3.21 did not know). `kernels` is
// gemm_backend_kernels()'s answer. Only OpenBLAS's cores known to lack AVX2 + FMA kernels warn: a
// name not listed (a newer core, another build's spelling) is taken to be fine.
inline std::string gemm_backend_warning(std::string kernels, bool cpu_avx2_fma) {
  if (kernels.empty() || !cpu_avx2_fma) return "";
  const std::string name = kernels;
  std::transform(kernels.begin(), kernels.end(), kernels.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (const char* older_core : {"katmai", "coppermine", "northwood", "prescott", "banias", "atom", "core2", "penryn", "dunnington",
                                 "nehalem", "athlon", "opteron", "opteron_sse3", "barcelona", "nano", "sandybridge", "bobcat",
                                 "bulldozer", "piledriver", "steamroller"})
    if (kernels == older_core)
      return "OpenBLAS picked its \"" + name + "\" kernels, which do not use AVX2, on a CPU with AVX2 and FMA: its products "
             "run several times slower. Set OPENBLAS_CORETYPE=Haswell (SkylakeX on a CPU with AVX-512) before the program "
             "starts, or build gqe with GQE_GEMM=eigen.";
  return "";
}
inline std::string gemm_backend_warning() { return gemm_backend_warning(gemm_backend_kernels(), cpu_has_avx2_fma()); }

}  // namespace gqe
