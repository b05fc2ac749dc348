#pragma once
// Row-wise helpers whose arithmetic is the same for every row, wherever it sits in memory: each
// runs over the row in whole packets from its first element (the last one masked), so the lanes a
// value lands in, and the order of every sum, depend on the row's length alone. (Eigen's own
// reductions align to the address, which would make a token's result depend on its row index.)
#include <algorithm>
#include <limits>
#include <type_traits>

#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/tensor.hpp"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gqe::detail {

template <class Scalar>
using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
template <class Scalar>
constexpr Index kPacketLanes = Eigen::internal::unpacket_traits<Packet<Scalar>>::size;

// Lanes j .. j+L-1 that lie below n, as a mask packet.
template <class Scalar>
Packet<Scalar> lanes_below(Index j, Index n) {
  using namespace Eigen::internal;
  return pcmp_lt(plset<Packet<Scalar>>(Scalar(j)), pset1<Packet<Scalar>>(Scalar(n)));
}

// The packet of x at j, with zeros past n (reads only below n).
template <class Scalar>
Packet<Scalar> load_partial(const Scalar* x, Index j, Index n) {
  using namespace Eigen::internal;
  constexpr Index L = kPacketLanes<Scalar>;
  if (j + L <= n) return ploadu<Packet<Scalar>>(x + j);
  alignas(64) Scalar part[L] = {};
  for (Index i = j; i < n; ++i) part[i - j] = x[i];
  return pload<Packet<Scalar>>(part);
}

// Writes the lanes of v that lie below n to x + j.
template <class Scalar>
void store_partial(Scalar* x, Index j, Index n, const Packet<Scalar>& v) {
  using namespace Eigen::internal;
  constexpr Index L = kPacketLanes<Scalar>;
  if (j + L <= n) return pstoreu(x + j, v);
  alignas(64) Scalar part[L];
  pstore(part, v);
  for (Index i = j; i < n; ++i) x[i] = part[i - j];
}

// sum of x[i] * y[i] over i < n.
template <class Scalar>
Scalar row_dot(const Scalar* x, const Scalar* y, Index n) {
  using namespace Eigen::internal;
  Packet<Scalar> sum = pset1<Packet<Scalar>>(Scalar(0));
  for (Index j = 0; j < n; j += kPacketLanes<Scalar>) sum = pmadd(load_partial(x, j, n), load_partial(y, j, n), sum);
  return predux(sum);
}

// y[i] = f(x[i]) for i < n, f taking and returning packets. y may be x.
template <class Scalar, class F>
void map_row(const Scalar* x, Scalar* y, Index n, F f) {
  for (Index j = 0; j < n; j += kPacketLanes<Scalar>) store_partial(y, j, n, f(load_partial(x, j, n)));
}

// The maximum of row[0 .. valid). A NaN in the row may or may not come out (the hardware's max
// picks an operand); callers subtract the maximum and exponentiate, which turns the NaN itself
// into NaN either way. Two chains of maxima, so that each packet waits for no other.
template <class Scalar>
Scalar row_maximum(const Scalar* row, Index valid) {
  using namespace Eigen::internal;
  using P = Packet<Scalar>;
  constexpr int L = kPacketLanes<Scalar>;
  const P minus_inf = pset1<P>(-std::numeric_limits<Scalar>::infinity());
  P even = minus_inf, odd = minus_inf;
  Index j = 0;
  for (; j + 2 * L <= valid; j += 2 * L) {
    even = pmax(even, ploadu<P>(row + j));
    odd = pmax(odd, ploadu<P>(row + j + L));
  }
  for (; j < valid; j += L) even = pmax(even, pselect(lanes_below<Scalar>(j, valid), ploadu<P>(row + j), minus_inf));
  return predux_max(pmax(even, odd));
}

// exp(x) lane by lane for x <= 0 (NaN stays NaN): the softmax's exponentials, whose arguments are
// scores minus their maximum. With AVX2 or AVX-512 a shorter route than Eigen's general pexp (half
// its instructions; the exponentials were a sixth of the attention kernel's time): x is clamped at
// -87 (exp(-87), about 2^-125.5, is still normal; smaller arguments give that, a weight of 0 beside
// any term near 1), split as n ln 2 + r with n = round(x / ln 2) (ln 2 in two parts, so that r is
// exact to float's precision) and |r| <= ln 2 / 2; exp(r) comes from a degree-6 polynomial fitted
// on that range, times 2^n, which is exact. Within 1.04 ulp of exp over [-87, 0]; AVX2 and AVX-512
// give the same bits.
template <class Scalar>
Packet<Scalar> exp_nonpositive(const Packet<Scalar>& x) {
#if defined(EIGEN_VECTORIZE_AVX512) || (defined(EIGEN_VECTORIZE_AVX2) && defined(EIGEN_VECTORIZE_FMA))
  if constexpr (std::is_same_v<Scalar, float>) {
    using namespace Eigen::internal;
    using P = Packet<float>;
    const P clamped = pmax(x, pset1<P>(-87.0f));  // NaN passes (Eigen's pmax keeps its first operand's NaN)
    const P n = print(pmul(clamped, pset1<P>(1.44269504f)));
    P r = pmadd(n, pset1<P>(-0.693359375f), clamped);
    r = pmadd(n, pset1<P>(2.12194440e-4f), r);
    P y = pset1<P>(0.00138368458f);
    y = pmadd(y, r, pset1<P>(0.00837481581f));
    y = pmadd(y, r, pset1<P>(0.0416682251f));
    y = pmadd(y, r, pset1<P>(0.166664198f));
    y = pmadd(y, r, pset1<P>(0.499999911f));
    y = pmadd(y, r, pset1<P>(1.0f));
    y = pmadd(y, r, pset1<P>(1.0f));
#if defined(EIGEN_VECTORIZE_AVX512)
    return _mm512_scalef_ps(y, n);
#else
    // 2^n from its exponent bits (n >= -126: a normal number).
    return pmul(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
#endif
  }
#endif
  return Eigen::internal::pexp(x);
}

// row[j] = exp(row[j] - shift) for j < valid and 0 for valid <= j < len; returns the sum of the
// exponentials, added lane by lane from j = 0 and then across the lanes: a fixed order for a given
// `valid`. Reads and writes whole packets up to `valid` (the row has room for them).
template <class Scalar>
Scalar exp_row(Scalar* row, Index valid, Index len, Scalar shift) {
  using namespace Eigen::internal;
  using P = Packet<Scalar>;
  constexpr int L = kPacketLanes<Scalar>;
  const P sub = pset1<P>(shift);
  P sum = pzero(sub);
  Index j = 0;
  for (; j + L <= valid; j += L) {
    const P e = exp_nonpositive<Scalar>(psub(ploadu<P>(row + j), sub));
    pstoreu(row + j, e);
    sum = padd(sum, e);
  }
  if (j < valid) {
    const P e = pand(lanes_below<Scalar>(j, valid), exp_nonpositive<Scalar>(psub(ploadu<P>(row + j), sub)));
    pstoreu(row + j, e);
    sum = padd(sum, e);
    j += L;
  }
  std::fill(row + std::min(j, len), row + len, Scalar(0));
  return predux(sum);
}

}  // namespace gqe::detail
