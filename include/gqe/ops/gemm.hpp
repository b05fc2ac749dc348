#pragma once
// The one matrix product under every projection and attention tile: C [m, n] (+)= A [m, k] B [k, n],
// single-threaded (callers split the work over the pool in units fixed by the shapes).
//
// Batch invariance by construction: every C[i][j] is one chain of multiply-adds over p = 0 .. k-1
// in order, starting from 0 (or from C when accumulating). How many rows or columns share the call,
// where i and j fall in it, and what the other rows hold change nothing in that chain, so a token's
// result never depends on its companions: the later tokens of a prompt, the rows gathered with it
// for an expert, the other sequences of a batch. The multiply-add is fused wherever the build
// targets FMA (x86-64-v3 and up), so those builds even agree with one another bit for bit.
//
// A register-blocked micro-kernel keeps an MR x NR block of C in registers and, per step of p,
// loads one row of NR values of B and broadcasts MR values of A (AVX-512: 12 x 32 floats in 24 of
// its 32 registers; AVX2 and SSE: 6 x 2 packets). A is packed per MR-row panel ([kc][MR], so the
// broadcasts read consecutive memory) and B per NR-column panel ([kc][NR]), converting 16-bit
// weights to Scalar on the way; a B already laid out [k][n] in Scalar is read in place. The depth
// is cut into blocks of kDepth so that the panels stay in cache; the chain continues from one block
// to the next through C, unchanged.
#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

#include "gqe/tensor/dtype.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/tensor.hpp"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gqe {

// A [m, k] with element (i, p) at data[i * row_stride + p * col_stride]: row-major (col_stride 1)
// or a transposed view (row_stride 1).
template <class Scalar>
struct LhsMatrix {
  const Scalar* data = nullptr;
  Index row_stride = 0;
  Index col_stride = 1;
};

// B [k, n] in any float dtype, stored row-major either as itself ([k, n], element (p, j) at
// data[p * stride + j]) or as its transpose ([n, k], element (p, j) at data[j * stride + p]: a
// weight [out, in] read as W^T). Any alignment.
struct RhsMatrix {
  const void* data = nullptr;
  DType dtype = DType::F32;
  Index stride = 0;
  bool transposed = false;
};

template <class Scalar>
RhsMatrix rhs_of(const Scalar* data, Index stride, bool transposed) {
  return {data, dtype_of<Scalar>(), stride, transposed};
}

namespace detail {

template <class Scalar>
struct GemmShape {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr int kLanes = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int kVectors = 2;                  // packets per micro-tile row
  static constexpr int kCols = kVectors * kLanes;     // NR
  static constexpr int kRows = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 12 : 6;  // MR
  static constexpr Index kDepth = 256;                // kc: depth per packed block
  // With at most MR rows (a decode step) the product streams the weights once: longer depth blocks
  // read each weight row in longer runs, which the hardware prefetchers follow.
  static constexpr Index kDepthFewRows = 2048;
  static Index depth_block(Index m) { return m <= kRows ? kDepthFewRows : kDepth; }
};

// C[0..Rows)[0..cols) (+)= A_packed [kc][MR] x B [kc][>= NR] (row stride ldb). With `load`, the
// chains continue from C; otherwise they start at zero. Columns past `cols` are computed on B's
// padding and never stored.
template <class Scalar, int Rows>
void micro_tile(Index kc, const Scalar* a, const Scalar* b, Index ldb, Scalar* c, Index ldc, Index cols, bool load) {
  using S = GemmShape<Scalar>;
  using Packet = typename S::Packet;
  using namespace Eigen::internal;
  constexpr int V = S::kVectors, L = S::kLanes;
  Packet acc[Rows][V];
  alignas(64) Scalar edge[Rows][S::kCols];  // C's block when it is narrower than NR
  const bool narrow = cols < S::kCols;
  if (load && narrow) {
    for (int i = 0; i < Rows; ++i) std::copy_n(c + i * ldc, cols, edge[i]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[i][v] = !load ? pzero(Packet{}) : narrow ? pload<Packet>(edge[i] + v * L) : ploadu<Packet>(c + i * ldc + v * L);
  for (Index p = 0; p < kc; ++p) {
    Packet bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = ploadu<Packet>(b + p * ldb + v * L);
    const Scalar* ap = a + p * S::kRows;
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i) {
      const Packet ai = pset1<Packet>(ap[i]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = pmadd(ai, bv[v], acc[i][v]);
    }
  }
  if (!narrow) {
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) pstoreu(c + i * ldc + v * L, acc[i][v]);
    return;
  }
  for (int i = 0; i < Rows; ++i) {
    for (int v = 0; v < V; ++v) pstore(edge[i] + v * L, acc[i][v]);
    std::copy_n(edge[i], cols, c + i * ldc);
  }
}

template <class Scalar>
using MicroTile = void (*)(Index, const Scalar*, const Scalar*, Index, Scalar*, Index, Index, bool);

// micro_tile<Scalar, rows> for rows = 1 .. MR.
template <class Scalar, std::size_t... R>
MicroTile<Scalar> micro_tile_for(Index rows, std::index_sequence<R...>) {
  static constexpr MicroTile<Scalar> table[] = {&micro_tile<Scalar, static_cast<int>(R) + 1>...};
  return table[rows - 1];
}
template <class Scalar>
MicroTile<Scalar> micro_tile_for(Index rows) {
  return micro_tile_for<Scalar>(rows, std::make_index_sequence<GemmShape<Scalar>::kRows>{});
}

// Copies `count` values of a stored row (any float dtype, any alignment), starting at element
// `first`, into out as Scalar.
template <class Scalar>
void stage_row(const void* data, DType dtype, Index stride, Index row, Index first, Index count, Scalar* out) {
  const std::size_t offset = static_cast<std::size_t>(row) * static_cast<std::size_t>(stride) + static_cast<std::size_t>(first);
  convert_values(static_cast<const unsigned char*>(data) + offset * dtype_size(dtype), dtype, static_cast<std::size_t>(count), out);
}

// dst[p * width + r] = element p0 + p of stored row r, for r < rows (rows <= width) and p < kc:
// rows of a row-major matrix packed transposed, L at a time (L = the packet's lanes). Each group
// of L rows is first copied into `stage` (converting 16-bit values), so that the register
// transposes read neighbouring memory instead of L rows a page apart, which would all compete for
// one cache set. Lanes past `rows` get arbitrary values, and stores may run L - 1 elements past
// dst[kc * width): the panel buffers keep that slack.
template <class Scalar>
void pack_transposed(const void* data, DType dtype, Index stride, Index first_row, Index rows, Index p0, Index kc,
                     Index width, Scalar* dst, Scalar* stage, Index stage_stride) {
  using Packet = typename GemmShape<Scalar>::Packet;
  using namespace Eigen::internal;
  constexpr int L = GemmShape<Scalar>::kLanes;
  // Groups from the last: a group's stores past `width` land on the next depth row's first lanes,
  // which a lower group writes afterwards (or a later depth step of the same group).
  for (Index r0 = (rows - 1) / L * L; r0 >= 0; r0 -= L) {
    const Index here = std::min<Index>(L, rows - r0);
    for (Index r = 0; r < here; ++r) stage_row(data, dtype, stride, first_row + r0 + r, p0, kc, stage + r * stage_stride);
    // A PacketBlock of SIMD types draws GCC's -Wignored-attributes (the vector type's alignment
    // attribute does not take part in the template's identity); Eigen silences it for its own code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
    PacketBlock<Packet, L> block;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
    for (Index p = 0; p < kc; p += L) {
      // Rows past `here` repeat row 0; depth past kc reads the stage's slack. Neither is stored
      // where a later pass does not overwrite it or the micro-kernel reads it.
      for (int r = 0; r < L; ++r) block.packet[r] = ploadu<Packet>(stage + (r < here ? r : 0) * stage_stride + p);
      ptranspose(block);
      const Index depth = std::min<Index>(L, kc - p);
      for (Index q = 0; q < depth; ++q) pstoreu(dst + (p + q) * width + r0, block.packet[q]);
    }
  }
}

// dst [kc][MR] = rows [i0, i0 + rows) of A, depth [p0, p0 + kc).
template <class Scalar>
void pack_lhs(const LhsMatrix<Scalar>& a, Index i0, Index rows, Index p0, Index kc, Scalar* dst, Scalar* stage,
              Index stage_stride) {
  constexpr int MR = GemmShape<Scalar>::kRows;
  if (a.col_stride == 1) {
    pack_transposed(a.data, dtype_of<Scalar>(), a.row_stride, i0, rows, p0, kc, Index(MR), dst, stage, stage_stride);
    return;
  }
  for (Index p = 0; p < kc; ++p)  // a transposed view: each depth step's rows are neighbours
    for (Index i = 0; i < rows; ++i) dst[p * MR + i] = a.data[(i0 + i) * a.row_stride + (p0 + p) * a.col_stride];
}

// dst [kc][NR] = columns [j0, j0 + cols) of B, depth [p0, p0 + kc); columns past cols arbitrary.
template <class Scalar>
void pack_rhs(const RhsMatrix& b, Index j0, Index cols, Index p0, Index kc, Scalar* dst, Scalar* stage,
              Index stage_stride) {
  constexpr int NR = GemmShape<Scalar>::kCols;
  if (b.transposed) {
    pack_transposed(b.data, b.dtype, b.stride, j0, cols, p0, kc, Index(NR), dst, stage, stage_stride);
    return;
  }
  for (Index p = 0; p < kc; ++p) stage_row(b.data, b.dtype, b.stride, p0 + p, j0, cols, dst + p * NR);
}

// Packed panels and the staging rows, reused call after call (they only grow, with the slack that
// pack_transposed may write): no allocation once warm.
template <class Scalar>
struct GemmBuffers {
  static constexpr Index kSlack = GemmShape<Scalar>::kLanes;
  std::vector<Scalar> lhs, rhs, stage;

  // Room for panels of lhs_size and rhs_size values and for staging rows of `depth` values
  // (returns the staging stride: a row and a packet of slack).
  Index reserve(Index lhs_size, Index rhs_size, Index depth) {
    constexpr Index L = GemmShape<Scalar>::kLanes;
    const auto grow = [](std::vector<Scalar>& v, Index n) {
      if (static_cast<Index>(v.size()) < n + kSlack) v.resize(static_cast<std::size_t>(n + kSlack));
    };
    grow(lhs, lhs_size);
    grow(rhs, rhs_size);
    grow(stage, L * (depth + L));
    return depth + L;
  }
};
template <class Scalar>
GemmBuffers<Scalar>& gemm_buffers() {
  thread_local GemmBuffers<Scalar> buffers;
  return buffers;
}

}  // namespace detail

// C [m, n] = A [m, k] B [k, n] (accumulate: C += A B), C row-major with row stride ldc. Single-
// threaded. C must not overlap A or B.
template <class Scalar>
void gemm(Index m, Index n, Index k, const LhsMatrix<Scalar>& a, const RhsMatrix& b, Scalar* c, Index ldc,
          bool accumulate) {
  using S = detail::GemmShape<Scalar>;
  constexpr int MR = S::kRows, NR = S::kCols;
  assert(m >= 0 && n >= 0 && k >= 0 && is_float(b.dtype));
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (Index i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, Scalar(0));
    return;
  }
  auto& buf = detail::gemm_buffers<Scalar>();
  const Index panels = (n + NR - 1) / NR;
  // B in place when stored [k][n] in Scalar; then only a ragged last panel is copied.
  const bool in_place = !b.transposed && b.dtype == dtype_of<Scalar>();
  const Index first_packed = in_place ? n / NR : 0;
  const Index depth = S::depth_block(m);
  for (Index p0 = 0; p0 < k; p0 += depth) {
    const Index kc = std::min(depth, k - p0);
    const bool load = accumulate || p0 > 0;
    const Index stage_stride = buf.reserve(kc * MR, (panels - first_packed) * kc * NR, kc);
    for (Index jp = first_packed; jp < panels; ++jp)
      detail::pack_rhs(b, jp * NR, std::min<Index>(NR, n - jp * NR), p0, kc, buf.rhs.data() + (jp - first_packed) * kc * NR,
                       buf.stage.data(), stage_stride);
    for (Index i0 = 0; i0 < m; i0 += MR) {
      const Index rows = std::min<Index>(MR, m - i0);
      detail::pack_lhs(a, i0, rows, p0, kc, buf.lhs.data(), buf.stage.data(), stage_stride);
      const auto tile = detail::micro_tile_for<Scalar>(rows);
      for (Index jp = 0; jp < panels; ++jp) {
        const Index j0 = jp * NR;
        const bool packed = jp >= first_packed;
        const Scalar* panel = packed ? buf.rhs.data() + (jp - first_packed) * kc * NR
                                     : static_cast<const Scalar*>(b.data) + p0 * b.stride + j0;
        tile(kc, buf.lhs.data(), panel, packed ? NR : b.stride, c + i0 * ldc + j0, ldc, std::min<Index>(NR, n - j0), load);
      }
    }
  }
}

// ---- products with a weight: C [m, n] = A [m, k] W^T, W stored [n, k] -----------------------
//
// Weights are stored [out, in]: each output column j of the product reads its own row of W, so
// the depth runs of W^T are W's rows. Vectorising across output columns (as gemm above does) would
// transpose every weight on every call, which a decode step, reading each weight once, cannot
// afford. Instead each C[i][j] keeps G partial sums (G = kGroup: 4, or the packet's lanes when
// fewer), sum g taking the terms p = g mod G in order, and adds them by one fixed tree at the end:
// C = (s0 + s1) + (s2 + s3). A packet holds L / G columns x G partial sums, so W's rows are read
// G consecutive values at a time (no transposition: a copy of 4-value pieces, or plain loads),
// A's G values are broadcast to every column of the packet, and the micro-kernel keeps an
// MR x NR block of C in registers as gemm's does. Every C[i][j] is a function of row i of A and
// row j of W alone: batch invariant like gemm, and equal across SIMD widths with FMA. 16-bit
// weights (BF16, F16) widen exactly while their panels are copied.

namespace detail {

// The 16-bit storage types, as tags for the kernels' templates.
struct Bf16Bits {
  std::uint16_t bits;
};
struct F16Bits {
  std::uint16_t bits;
};
template <class Stored>
constexpr DType stored_dtype() {
  if constexpr (std::is_same_v<Stored, Bf16Bits>) return DType::BF16;
  else if constexpr (std::is_same_v<Stored, F16Bits>) return DType::F16;
  else return dtype_of<Stored>();
}

template <class Scalar>
struct WeightShape {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr int kLanes = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int kGroup = kLanes < 4 ? kLanes : 4;       // partial sums per C element
  static constexpr int kColsPerPacket = kLanes / kGroup;
  static constexpr int kVectors = 2;                           // packets per micro-tile row
  static constexpr int kCols = kVectors * kColsPerPacket;      // NR
  static constexpr int kRows = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 12 : 6;  // MR
  static Index steps(Index k) { return (k + kGroup - 1) / kGroup; }
};

// The G values at p, repeated in every column of a packet.
template <class Scalar>
typename WeightShape<Scalar>::Packet broadcast_group(const Scalar* p) {
  using W = WeightShape<Scalar>;
  using Packet = typename W::Packet;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Scalar, float> && W::kLanes == 16) return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  if constexpr (std::is_same_v<Scalar, double> && W::kLanes == 8) return _mm512_broadcast_f64x4(_mm256_loadu_pd(p));
#endif
#if defined(__AVX__)
  if constexpr (std::is_same_v<Scalar, float> && W::kLanes == 8) return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
#endif
  if constexpr (W::kColsPerPacket == 1) {
    return Eigen::internal::ploadu<Packet>(p);
  } else {
    alignas(64) Scalar values[W::kLanes];
    for (int c = 0; c < W::kColsPerPacket; ++c) std::copy_n(p, W::kGroup, values + c * W::kGroup);
    return Eigen::internal::pload<Packet>(values);
  }
}

// The fixed tree that adds a C element's G partial sums.
template <class Scalar, int G>
Scalar add_partial_sums(const Scalar* s) {
  if constexpr (G == 4) return (s[0] + s[1]) + (s[2] + s[3]);
  else if constexpr (G == 2) return s[0] + s[1];
  else return s[0];
}

// The G stored values at p, widened exactly to float, as one 128-bit vector.
#if defined(__SSE4_1__)
template <class Stored>
__m128 load_group_f32(const Stored* p) {
  if constexpr (std::is_same_v<Stored, float>) {
    return _mm_loadu_ps(p);
  } else {
    const __m128i half = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<Stored, Bf16Bits>) return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(half), 16));
#if defined(__F16C__)
    if constexpr (std::is_same_v<Stored, F16Bits>) return _mm_cvtph_ps(half);
#endif
    alignas(16) float wide[4];
    convert_values(p, stored_dtype<Stored>(), 4, wide);
    return _mm_load_ps(wide);
  }
}
#endif

// One packet of W read in place: columns rows[0 .. kColsPerPacket), G values each from `offset`.
template <class Scalar, class Stored>
typename WeightShape<Scalar>::Packet load_columns(const Stored* const* rows, Index offset) {
  using W = WeightShape<Scalar>;
  using Packet = typename W::Packet;
  if constexpr (std::is_same_v<Scalar, float> && W::kGroup == 4) {
#if defined(__AVX512F__)
    if constexpr (W::kLanes == 16) {
      __m512 x = _mm512_castps128_ps512(load_group_f32(rows[0] + offset));
      x = _mm512_insertf32x4(x, load_group_f32(rows[1] + offset), 1);
      x = _mm512_insertf32x4(x, load_group_f32(rows[2] + offset), 2);
      return _mm512_insertf32x4(x, load_group_f32(rows[3] + offset), 3);
    }
#endif
#if defined(__AVX__) && defined(__SSE4_1__)
    if constexpr (W::kLanes == 8)
      return _mm256_insertf128_ps(_mm256_castps128_ps256(load_group_f32(rows[0] + offset)), load_group_f32(rows[1] + offset), 1);
#endif
#if defined(__SSE4_1__)
    if constexpr (W::kLanes == 4) return load_group_f32(rows[0] + offset);
#endif
  }
  alignas(64) Scalar values[W::kLanes];
  for (int c = 0; c < W::kColsPerPacket; ++c)
    convert_values(rows[c] + offset, stored_dtype<Stored>(), W::kGroup, values + c * W::kGroup);
  return Eigen::internal::pload<Packet>(values);
}

// Where a micro-tile reads W: packed panels [steps][NR][G], or NR rows read in place (a decode
// step), whose partial last group is copied beside zeros.
template <class Scalar>
struct PackedWeights {
  using Packet = typename WeightShape<Scalar>::Packet;
  const Scalar* panel;
  Index steps;
  Index full_steps() const { return steps; }
  Packet load(Index q, int v) const {
    using W = WeightShape<Scalar>;
    return Eigen::internal::ploadu<Packet>(panel + q * W::kCols * W::kGroup + v * W::kLanes);
  }
  Packet tail(int) const { return Packet{}; }
};

template <class Scalar, class Stored>
struct WeightsInPlace {
  using W = WeightShape<Scalar>;
  using Packet = typename W::Packet;
  const Stored* rows[W::kCols];
  Index full;                       // whole groups per row
  alignas(64) Scalar last[W::kCols * W::kGroup];  // the partial last group of each row, zero-padded

  WeightsInPlace(const Stored* base, Index stride, Index cols, Index k) : full(k / W::kGroup) {
    for (Index j = 0; j < W::kCols; ++j) rows[j] = base + std::min(j, cols - 1) * stride;
    std::fill(last, last + W::kCols * W::kGroup, Scalar(0));
    for (Index j = 0; j < W::kCols && full * W::kGroup < k; ++j)
      convert_values(rows[j] + full * W::kGroup, stored_dtype<Stored>(), static_cast<std::size_t>(k - full * W::kGroup),
                     last + j * W::kGroup);
  }
  Index full_steps() const { return full; }
  Packet load(Index q, int v) const { return load_columns<Scalar>(rows + v * W::kColsPerPacket, q * W::kGroup); }
  Packet tail(int v) const { return Eigen::internal::pload<Packet>(last + v * W::kLanes); }
};

// Steps [q0, q1) of C[0..Rows)[0..cols) = A_panel x W^T, of `steps` groups of G in all: A_panel
// [steps][MR][G] (zero past k), W from `weights`. The partial sums start at zero (q0 == 0) or from
// `partial` [Rows][V][L], and end in `partial` or, after the last step, added up into C. Keeping
// them in `partial` between depth blocks continues the same chains: the result does not depend on
// the blocks. Columns past `cols` are computed and not stored.
template <class Scalar, int Rows, class Weights>
void weight_tile(Index q0, Index q1, Index steps, const Scalar* a, const Weights& weights, Scalar* partial, Scalar* c,
                 Index ldc, Index cols) {
  using W = WeightShape<Scalar>;
  using Packet = typename W::Packet;
  using namespace Eigen::internal;
  constexpr int V = W::kVectors, G = W::kGroup, MR = W::kRows, L = W::kLanes;
  Packet acc[Rows][V];
#pragma GCC unroll 16
  for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[i][v] = q0 == 0 ? pzero(Packet{}) : ploadu<Packet>(partial + (i * V + v) * L);
  const auto step = [&](Index q, const Packet* wv) {
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i) {
      const Packet ai = broadcast_group(a + (q * MR + i) * G);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = pmadd(ai, wv[v], acc[i][v]);
    }
  };
  const Index full = std::min(q1, weights.full_steps());
  for (Index q = q0; q < full; ++q) {
    Packet wv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) wv[v] = weights.load(q, v);
    step(q, wv);
  }
  if (q1 == steps && weights.full_steps() < steps) {
    Packet wv[V];
    for (int v = 0; v < V; ++v) wv[v] = weights.tail(v);
    step(steps - 1, wv);
  }
  if (q1 < steps) {
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) pstoreu(partial + (i * V + v) * L, acc[i][v]);
    return;
  }
  alignas(64) Scalar sums[V * L];
  for (int i = 0; i < Rows; ++i) {
    for (int v = 0; v < V; ++v) pstore(sums + v * L, acc[i][v]);
    for (Index j = 0; j < cols; ++j) c[i * ldc + j] = add_partial_sums<Scalar, G>(sums + j * G);
  }
}

template <class Scalar, class Weights>
using WeightTile = void (*)(Index, Index, Index, const Scalar*, const Weights&, Scalar*, Scalar*, Index, Index);

template <class Scalar, class Weights, std::size_t... R>
WeightTile<Scalar, Weights> weight_tile_for(Index rows, std::index_sequence<R...>) {
  static constexpr WeightTile<Scalar, Weights> table[] = {&weight_tile<Scalar, static_cast<int>(R) + 1, Weights>...};
  return table[rows - 1];
}

// dst [steps][width][G] = `count` rows (any float dtype) starting at `first`, each row's values
// p = q*G + g at dst[(q*width + r)*G + g], zeros past k. Lanes of rows past `count` are left as they
// are: the micro-kernels never store what they compute from them.
template <class Scalar>
void pack_groups(const void* data, DType dtype, Index stride, Index first, Index count, Index k, Index width,
                 Scalar* dst, Scalar* row) {
  constexpr int G = WeightShape<Scalar>::kGroup;
  const Index steps = WeightShape<Scalar>::steps(k);
  for (Index r = 0; r < count; ++r) {
    const Scalar* src = row;
    if (dtype == dtype_of<Scalar>() && k % G == 0) {  // read in place
      src = static_cast<const Scalar*>(data) + (first + r) * stride;
    } else {
      stage_row(data, dtype, stride, first + r, 0, k, row);
      std::fill(row + k, row + steps * G, Scalar(0));
    }
    for (Index q = 0; q < steps; ++q) std::copy_n(src + q * G, G, dst + (q * width + r) * G);
  }
}

}  // namespace detail

namespace detail {

// A decode step's product: one panel of A's rows, W read in place once.
template <class Scalar, class Stored>
void gemm_bt_in_place(Index m, Index n, Index k, const Scalar* a_panel, const WeightMatrix& w, Scalar* c, Index ldc) {
  using W = WeightShape<Scalar>;
  const auto tile = weight_tile_for<Scalar, WeightsInPlace<Scalar, Stored>>(m, std::make_index_sequence<W::kRows>{});
  const auto* base = static_cast<const Stored*>(w.data);
  for (Index j0 = 0; j0 < n; j0 += W::kCols) {
    const Index cols = std::min<Index>(W::kCols, n - j0);
    const WeightsInPlace<Scalar, Stored> weights(base + j0 * w.stride, w.stride, cols, k);
    tile(0, W::steps(k), W::steps(k), a_panel, weights, nullptr, c + j0, ldc, cols);
  }
}

}  // namespace detail

// C [m, n] = A [m, k] W^T (row stride lda of A, ldc of C), W stored [n, k]. Single-threaded. F32,
// BF16 and F16 weights (and F64 for double models; any float dtype works, widened the same way).
// With more rows than one micro-tile takes, W is copied into packed panels first (widening 16-bit
// values) and every panel of A's rows reads them from cache; with fewer (a decode step) W is read
// in place, once. The values, and so the results, are the same either way.
template <class Scalar>
void gemm_bt(Index m, Index n, Index k, const Scalar* a, Index lda, const WeightMatrix& w, Scalar* c, Index ldc) {
  using W = detail::WeightShape<Scalar>;
  constexpr int MR = W::kRows, NR = W::kCols, G = W::kGroup;
  assert(m >= 0 && n >= 0 && k >= 0 && is_float(w.dtype));
  if (m == 0 || n == 0) return;
  const Index steps = W::steps(k), panels = (n + NR - 1) / NR;
  thread_local std::vector<Scalar> a_panel, w_panels, row, partials;
  const auto grow = [](std::vector<Scalar>& v, Index size) {
    if (static_cast<Index>(v.size()) < size) v.resize(static_cast<std::size_t>(size));
  };
  grow(row, steps * G);
  grow(a_panel, steps * MR * G);
  if (m <= MR) {
    detail::pack_groups(a, dtype_of<Scalar>(), lda, 0, m, k, Index(MR), a_panel.data(), row.data());
    if constexpr (std::is_same_v<Scalar, float>) {
      if (w.dtype == DType::BF16) return detail::gemm_bt_in_place<Scalar, detail::Bf16Bits>(m, n, k, a_panel.data(), w, c, ldc);
      if (w.dtype == DType::F16) return detail::gemm_bt_in_place<Scalar, detail::F16Bits>(m, n, k, a_panel.data(), w, c, ldc);
    }
    if (w.dtype == dtype_of<Scalar>()) return detail::gemm_bt_in_place<Scalar, Scalar>(m, n, k, a_panel.data(), w, c, ldc);
  }
  grow(w_panels, panels * steps * NR * G);
  for (Index jp = 0; jp < panels; ++jp)
    detail::pack_groups(w.data, w.dtype, w.stride, jp * NR, std::min<Index>(NR, n - jp * NR), k, NR,
                        w_panels.data() + jp * steps * NR * G, row.data());
  // Per panel of A's rows, depth blocks of kDepthSteps: the block's part of the A panel stays in L1
  // while every W panel's part streams past it, the partial sums parked in `partials` in between.
  constexpr Index kDepthSteps = 64;
  grow(partials, panels * MR * W::kVectors * W::kLanes);
  for (Index i0 = 0; i0 < m; i0 += MR) {
    const Index rows = std::min<Index>(MR, m - i0);
    detail::pack_groups(a, dtype_of<Scalar>(), lda, i0, rows, k, Index(MR), a_panel.data(), row.data());
    const auto tile = detail::weight_tile_for<Scalar, detail::PackedWeights<Scalar>>(rows, std::make_index_sequence<MR>{});
    for (Index q0 = 0; q0 < steps; q0 += kDepthSteps)
      for (Index jp = 0; jp < panels; ++jp) {
        const detail::PackedWeights<Scalar> weights{w_panels.data() + jp * steps * NR * G, steps};
        tile(q0, std::min(steps, q0 + kDepthSteps), steps, a_panel.data(), weights,
             partials.data() + jp * MR * W::kVectors * W::kLanes, c + i0 * ldc + jp * NR, ldc, std::min<Index>(NR, n - jp * NR));
      }
  }
}

}  // namespace gqe
