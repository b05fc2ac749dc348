#pragma once
// Eigen, included the one way gqe includes it. GCC 12 and older report a false
// -Wmaybe-uninitialized inside their own AVX-512 intrinsics (avx512fintrin.h's _mm512_undefined
// values, GCC bug 105593) wherever Eigen's AVX-512 packet code is inlined. The warning is turned
// off for exactly the lines of Eigen and of the intrinsics headers it brings in, and only for
// those compilers; every warning about gqe's own code stays on.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ <= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <Eigen/Core>
#pragma GCC diagnostic pop
#else
#include <Eigen/Core>
#endif
