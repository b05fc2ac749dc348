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
// its 32 registers; AVX2 and SSE: 6 x 2 packets; against a B read in place, up to four rows go
// through wider tiles, and on AVX-512 a whole 12-row block as two of 6 x 4 packets, see wide_plan).
// A is read in place, row-major or a transposed view alike: a broadcast is a plain load wherever
// its value sits. B is packed per NR-column panel ([kc][NR]), converting 16-bit weights to Scalar
// on the way; a B already laid out [k][n] in Scalar is read in place. The depth is cut into blocks
// of kDepth (more with a larger L2) so that the panels stay in cache; the chain continues from one
// block to the next through C, unchanged.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "gqe/tensor/dtype.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/panels.hpp"
#include "gqe/tensor/scratch_buffer.hpp"
#include "gqe/tensor/tensor.hpp"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gqe {

// A [m, k] with element (i, p) at data[i * row_stride + p * col_stride]: row-major (col_stride 1)
// or a transposed view (row_stride 1). Or, when `rows` is set, row i at rows[i] (its k values
// consecutive): rows gathered from anywhere, read where they are.
template <class Scalar>
struct LhsMatrix {
  const Scalar* data = nullptr;
  Index row_stride = 0;
  Index col_stride = 1;
  const Scalar* const* rows = nullptr;
};

// B [k, n] in any float dtype, stored row-major either as itself ([k, n], element (p, j) at
// data[p * stride + j]) or as its transpose ([n, k], element (p, j) at data[j * stride + p]: a
// weight [out, in] read as W^T). Any alignment. Or, with `panels` (and `transposed`), a
// panel-laid weight (tensor/panels.hpp) of rows `stride` long read as W^T: its panels are B's
// NR-column panels, read in place (float) or widened one block at a time (16-bit).
struct RhsMatrix {
  const void* data = nullptr;
  DType dtype = DType::F32;
  Index stride = 0;
  bool transposed = false;
  bool panels = false;
};

template <class Scalar>
RhsMatrix rhs_of(const Scalar* data, Index stride, bool transposed) {
  return {data, dtype_of<Scalar>(), stride, transposed};
}

namespace detail {

// The L2 cache per core in MB, at least 1. The packed blocks below and the units of linear were
// chosen by measurement on CPUs with a 1 MB L2 (AMD Zen 4 and 5); a larger L2 holds proportionally
// larger ones, which read A's rows in longer runs and fewer times (Intel Xeon, 2 MB: the
// projections' product 1.10-1.14x as fast with both doubled).
inline Index l2_scale() {
  static const Index scale = std::max<Index>(1, static_cast<Index>(Eigen::l2CacheSize()) >> 20);
  return scale;
}

template <class Scalar>
struct GemmShape {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr int kLanes = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int kVectors = 2;                  // packets per micro-tile row
  static constexpr int kCols = kVectors * kLanes;     // NR
  static_assert(!std::is_same_v<Scalar, float> || kCols == kPanelWidth, "a weight's panels are the float kernel's NR columns");
  static constexpr int kRows = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 12 : 6;  // MR
  static constexpr Index kDepth = 256;                // kc: depth per packed block (a 1 MB L2)
  static Index packed_depth() { return std::min<Index>(kDepth * l2_scale(), 4 * kDepth); }
  // With at most MR rows and B in place, the product streams B once: longer depth blocks read
  // each row of B in longer runs, which the hardware prefetchers follow.
  static constexpr Index kDepthFewRows = 2048;
  static Index depth_block(Index m) { return m <= kRows ? kDepthFewRows : kDepth; }
  // With at most kWideRows rows and B in place (a decode step's attention: one or two query rows
  // against a cached tile), tiles hold up to kWideAccumulators packets: one row over a long row of
  // B, or two rows over half as many columns. NR-wide tiles would leave a row's two chains waiting
  // on each other's multiply-add latency, and read each row of B in short runs, where a decode step
  // streams B from memory once.
  static constexpr int kWideRows = 2;
  static constexpr int kWideAccumulators = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 16 : 8;
};

// A Rows x (V packets) block of C in registers (MR x NR by default), started from zero or from C,
// and stored back to C's first `cols` columns (a narrow block goes through `edge`).
template <class Scalar, int Rows, int V = GemmShape<Scalar>::kVectors>
struct Accumulators {
  using S = GemmShape<Scalar>;
  using Packet = typename S::Packet;
  static constexpr int L = S::kLanes, Width = V * L;
  Packet acc[Rows][V];

  // A narrow block (cols < Width) is loaded and stored with masks where the packet has them (float
  // on AVX and AVX-512); elsewhere through a buffer. Copying through a buffer calls memcpy, which
  // made the compiler keep the accumulators in memory on every path: 24 stores and loads more per
  // register tile (1.5-2.5% of the attention kernel's time).
  static constexpr bool kMasked =
#if defined(__AVX512F__)
      std::is_same_v<Packet, Eigen::internal::Packet16f> ||
#endif
#if defined(__AVX__)
      std::is_same_v<Packet, Eigen::internal::Packet8f> ||
#endif
      false;
  template <class P = Packet>
  static auto lanes_below(Index cols, int v) {  // packet v's lanes left of cols, as a mask
    using Mask = typename Eigen::internal::unpacket_traits<P>::mask_t;
    return static_cast<Mask>((std::uint64_t(1) << std::clamp<Index>(cols - v * L, 0, L)) - 1);
  }

  void begin(const Scalar* c, Index ldc, Index cols, bool load) {
    using namespace Eigen::internal;
    if (load && cols < Width) {
      if constexpr (kMasked) {
#pragma GCC unroll 16
        for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[i][v] = ploadu<Packet>(c + i * ldc + v * L, lanes_below(cols, v));
      } else {
        alignas(64) Scalar edge[Width];
        for (int i = 0; i < Rows; ++i) {
          std::copy_n(c + i * ldc, cols, edge);
          for (int v = 0; v < V; ++v) acc[i][v] = pload<Packet>(edge + v * L);
        }
      }
      return;
    }
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = load ? ploadu<Packet>(c + i * ldc + v * L) : pzero(Packet{});
  }

  void end(Scalar* c, Index ldc, Index cols) {
    using namespace Eigen::internal;
    if (cols == Width) {
#pragma GCC unroll 16
      for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) pstoreu(c + i * ldc + v * L, acc[i][v]);
    } else if constexpr (kMasked) {
#pragma GCC unroll 16
      for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) pstoreu(c + i * ldc + v * L, acc[i][v], lanes_below(cols, v));
    } else {
      alignas(64) Scalar edge[Width];
      for (int i = 0; i < Rows; ++i) {
        for (int v = 0; v < V; ++v) pstore(edge + v * L, acc[i][v]);
        std::copy_n(edge, cols, c + i * ldc);
      }
    }
  }

  // One step of every chain: acc[i][v] += a(i) * bv[v].
  template <class ValueOfA>
  void step(const Packet* bv, const ValueOfA& a) {
    using namespace Eigen::internal;
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i) {
      const Packet ai = pset1<Packet>(a(i));
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[i][v] = pmadd(ai, bv[v], acc[i][v]);
    }
  }

  // One step of the chains of packet column v alone: acc[i][v] += a(i) * bv.
  template <class ValueOfA>
  void step_column(int v, const Packet& bv, const ValueOfA& a) {
    using namespace Eigen::internal;
#pragma GCC unroll 16
    for (int i = 0; i < Rows; ++i) acc[i][v] = pmadd(pset1<Packet>(a(i)), bv, acc[i][v]);
  }
};

// Rows [i0, ...) and depth [p0, ...) of A, as the micro-tiles read them in place.
template <class Scalar>
struct LhsBlock {
  const LhsMatrix<Scalar>* a;
  Index i0, p0;
  const Scalar* strided() const { return a->data + i0 * a->row_stride + p0 * a->col_stride; }
};

// A's element (i, p) of a block, for i < Rows: by strides, or through the row table (Table).
template <class Scalar, int Rows, bool Table>
struct LhsReader {
  const Scalar* base[Table ? Rows : 1];
  Index rs = 0, cs = 0;
  explicit LhsReader(const LhsBlock<Scalar>& block) {
    if constexpr (Table) {
      for (int i = 0; i < Rows; ++i) base[i] = block.a->rows[block.i0 + i] + block.p0;
    } else {
      base[0] = block.strided();
      rs = block.a->row_stride;
      cs = block.a->col_stride;
    }
  }
  Scalar operator()(int i, Index p) const {
    if constexpr (Table) return base[i][p];
    else return base[0][i * rs + p * cs];
  }
};

// C[0..Rows)[0..cols) (+)= A [Rows][kc] x B [kc][>= V packets], A read in place. B's NR-column
// panels lie panel_gap apart, each row p of a panel at p * ldb from its start: NR apart for B read
// across in place ([kc][n], row stride ldb), kc * NR for packed panels side by side. With `load`,
// the chains continue from C; otherwise they start at zero. Columns past `cols` are computed on
// B's padding and never stored.
template <class Scalar, int Rows, bool Table, int V = GemmShape<Scalar>::kVectors>
void micro_tile(Index kc, const LhsBlock<Scalar>& a_block, const Scalar* b, Index ldb, Index panel_gap, Scalar* c, Index ldc,
                Index cols, bool load) {
  using S = GemmShape<Scalar>;
  constexpr int L = S::kLanes, VP = S::kVectors;
  const LhsReader<Scalar, Rows, Table> a(a_block);
  Accumulators<Scalar, Rows, V> block;
  block.begin(c, ldc, cols, load);
  // Unrolled four times: fewer turns of the loop per register tile, whose depth is often short
  // (64, the score product's d_h). The same arithmetic in the same order; measured 1-4% faster.
#pragma GCC unroll 4
  for (Index p = 0; p < kc; ++p) {
    typename S::Packet bv[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) bv[v] = Eigen::internal::ploadu<typename S::Packet>(b + (v / VP) * panel_gap + p * ldb + (v % VP) * L);
    block.step(bv, [&](int i) { return a(i, p); });
  }
  block.end(c, ldc, cols);
}

template <class Scalar>
using MicroTile = void (*)(Index, const LhsBlock<Scalar>&, const Scalar*, Index, Index, Scalar*, Index, Index, bool);

// micro_tile<Scalar, rows, Table, V> for rows = 1 .. MR: V packets wide, NR (V = 2) or, for a
// last panel of at most one packet's columns, one packet (V = 1).
template <class Scalar, bool Table, int V, std::size_t... R>
MicroTile<Scalar> micro_tile_for(Index rows, std::index_sequence<R...>) {
  static constexpr MicroTile<Scalar> table[] = {&micro_tile<Scalar, static_cast<int>(R) + 1, Table, V>...};
  return table[rows - 1];
}
template <class Scalar, int V = GemmShape<Scalar>::kVectors>
MicroTile<Scalar> micro_tile_for(Index rows, bool table) {
  constexpr auto R = std::make_index_sequence<GemmShape<Scalar>::kRows>{};
  return table ? micro_tile_for<Scalar, true, V>(rows, R) : micro_tile_for<Scalar, false, V>(rows, R);
}

// The wide tiles, Rows x (4, 8 or 16 packets): wide_tiles<Scalar>[table][Rows - 1][log2(packets) - 2].
template <class Scalar, int Rows, bool Table>
inline constexpr MicroTile<Scalar> wide_tiles_of[3] = {&micro_tile<Scalar, Rows, Table, 4>, &micro_tile<Scalar, Rows, Table, 8>,
                                                       &micro_tile<Scalar, Rows, Table, 16>};
template <class Scalar>
inline constexpr const MicroTile<Scalar>* wide_tiles[2][2] = {{wide_tiles_of<Scalar, 1, false>, wide_tiles_of<Scalar, 2, false>},
                                                               {wide_tiles_of<Scalar, 1, true>, wide_tiles_of<Scalar, 2, true>}};

// 3, 4 or 6 rows x 4 packets against an in-place B, where the accumulators hold them (AVX-512):
// quad_tiles<Scalar>[table][0, 1, 2 for 3, 4, 6 rows]. 3-4 rows (the 4 left of 256 attention rows
// in register tiles of 12, or 3-4 query heads of a decode step) get twice the chains per row of an
// MR-row tile's two packets, so that they do not wait on the multiply-adds' latency (1% of the
// attention kernel's time at T = 4096). A whole MR-row tile goes as two tiles of 6 rows: per step
// of the depth, 6 broadcasts of A and 4 loads of B feed 24 multiply-adds, where 12 rows x 2 packets
// take 12 broadcasts and 2 loads, and broadcast each value of A once per panel pair instead of once
// per panel. Measured on 2 threads: the attention tiles' S = Q K^T and O += P V 1-7% faster,
// training's dx = dy W and dW += dy^T x 9-11%. Packed panels go through the 6-row tile two at a
// time as well: the projections' product [4096 x 1024] x [1024 x 1024] 1.04-1.12x as fast on an
// Intel Xeon (AVX-512, 2 MB L2); on an AMD Zen 5 it took 1.003-1.013 times the time.
template <class Scalar>
inline constexpr MicroTile<Scalar> quad_tiles[2][3] = {
    {&micro_tile<Scalar, 3, false, 4>, &micro_tile<Scalar, 4, false, 4>, &micro_tile<Scalar, 6, false, 4>},
    {&micro_tile<Scalar, 3, true, 4>, &micro_tile<Scalar, 4, true, 4>, &micro_tile<Scalar, 6, true, 4>}};

// How rows go over `columns` in-place columns of B: in passes of `rows` rows, each through `tile`
// over `packets` packets. Up to kWideRows rows: the widest tile that fits the columns and the
// accumulators, so one row at a time over a long row of B (each pass streams B's rows from start
// to end). 3 or 4 rows, and multiples of 6 (a whole MR-row tile), through the quad tiles where the
// accumulators hold them (AVX-512). Other counts: no plan.
template <class Scalar>
struct WidePlan {
  MicroTile<Scalar> tile = nullptr;  // null: no wide tile fits
  int packets = 0, rows = 0;
};
template <class Scalar>
WidePlan<Scalar> wide_plan(Index rows, bool table, Index columns) {
  using S = GemmShape<Scalar>;
  static_assert(S::kWideRows == 2, "wide_tiles holds tiles of 1 and 2 rows");
  if (rows > S::kWideRows) {
    if constexpr (S::kWideAccumulators >= 16) {
      const auto& quad = quad_tiles<Scalar>[table ? 1 : 0];
      if (4 * S::kLanes <= columns && rows <= 4) return {quad[rows - 3], 4, static_cast<int>(rows)};
      if (4 * S::kLanes <= columns && rows % 6 == 0) return {quad[2], 4, 6};
    }
    return {};
  }
  for (int w = 2; w >= 0; --w) {
    const int packets = 4 << w;
    if (packets > S::kWideAccumulators || packets * S::kLanes > columns) continue;
    const int pass = static_cast<int>(std::min<Index>(rows, S::kWideAccumulators / packets));
    return {wide_tiles<Scalar>[table ? 1 : 0][pass - 1][w], packets, pass};
  }
  return {};
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

// dst [kc][NR] = columns [j0, j0 + cols) of B, depth [p0, p0 + kc); columns past cols arbitrary.
template <class Scalar>
void pack_rhs(const RhsMatrix& b, Index j0, Index cols, Index p0, Index kc, Scalar* dst, Scalar* stage,
              Index stage_stride) {
  constexpr int NR = GemmShape<Scalar>::kCols;
  if (b.panels) {  // already [kc][NR] in place: widened (padding rows included, zeros)
    const std::size_t first = static_cast<std::size_t>(j0 * b.stride + p0 * NR);
    convert_values(static_cast<const unsigned char*>(b.data) + first * dtype_size(b.dtype), b.dtype, static_cast<std::size_t>(kc * NR), dst);
    return;
  }
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
  ScratchBuffer<Scalar> rhs, stage;

  // Room for panels of rhs_size values and for staging rows of `depth` values (returns the
  // staging stride: a row and a packet of slack).
  Index reserve(Index rhs_size, Index depth) {
    constexpr Index L = GemmShape<Scalar>::kLanes;
    rhs.reserve(rhs_size + kSlack);
    stage.reserve(L * (depth + L) + kSlack);
    return depth + L;
  }
};
template <class Scalar>
GemmBuffers<Scalar>& gemm_buffers() {
  thread_local GemmBuffers<Scalar> buffers;
  return buffers;
}

// Rows of A up to which a product with a transposed B reads B in place (few_rows_tile), not packed.
constexpr Index kFewRows = 4;
// Panels of a panel-laid B that one row of A (a decode step) streams side by side: four streams per
// thread draw more of the memory's bandwidth than two, and give the row eight independent chains.
constexpr int kPanelsAtOnce = 4;

// `count` (<= L) values of stored row `row` of B, from element p0, as one packet of Scalar (lanes
// past count are zero).
template <class Scalar>
typename GemmShape<Scalar>::Packet load_stored(const RhsMatrix& b, Index row, Index p0, Index count) {
  using Packet = typename GemmShape<Scalar>::Packet;
  constexpr int L = GemmShape<Scalar>::kLanes;
  if (count == L && b.dtype == dtype_of<Scalar>())
    return Eigen::internal::ploadu<Packet>(static_cast<const Scalar*>(b.data) + row * b.stride + p0);
  alignas(64) Scalar values[L] = {};
  stage_row(b.data, b.dtype, b.stride, row, p0, count, values);
  return Eigen::internal::pload<Packet>(values);
}

// C[0..Rows)[0..cols) (+)= A [Rows][k] x B for B stored transposed (column j of B is stored row
// j0 + j), read in place: per L depth steps, each packet column's L stored rows (the last one
// repeated past `cols`) are loaded L values each and transposed in registers, and the packets of
// the block's depth steps feed the chains one p at a time, as in micro_tile.
template <class Scalar, int Rows, bool Table>
void few_rows_tile(Index k, const LhsBlock<Scalar>& a_block, const RhsMatrix& b, Index j0, Scalar* c, Index ldc, Index cols,
                   bool load) {
  using S = GemmShape<Scalar>;
  using Packet = typename S::Packet;
  constexpr int L = S::kLanes;
  const LhsReader<Scalar, Rows, Table> a(a_block);
  Accumulators<Scalar, Rows> block;
  block.begin(c, ldc, cols, load);
  // See pack_transposed on the -Wignored-attributes this draws from GCC.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
  Eigen::internal::PacketBlock<Packet, L> wt;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
  for (Index p0 = 0; p0 < k; p0 += L) {
    const Index depth = std::min<Index>(L, k - p0);
    for (int v = 0; v < S::kVectors && v * L < cols; ++v) {
#pragma GCC unroll 16
      for (int r = 0; r < L; ++r) wt.packet[r] = load_stored<Scalar>(b, j0 + std::min<Index>(v * L + r, cols - 1), p0, depth);
      Eigen::internal::ptranspose(wt);
      if (depth == L) {
#pragma GCC unroll 16
        for (int q = 0; q < L; ++q) block.step_column(v, wt.packet[q], [&](int i) { return a(i, p0 + q); });
      } else {
        for (Index q = 0; q < depth; ++q) block.step_column(v, wt.packet[q], [&](int i) { return a(i, p0 + q); });
      }
    }
  }
  block.end(c, ldc, cols);
}

template <class Scalar>
using FewRowsTile = void (*)(Index, const LhsBlock<Scalar>&, const RhsMatrix&, Index, Scalar*, Index, Index, bool);

template <class Scalar, bool Table, std::size_t... R>
FewRowsTile<Scalar> few_rows_tile_for(Index rows, std::index_sequence<R...>) {
  static constexpr FewRowsTile<Scalar> table[] = {&few_rows_tile<Scalar, static_cast<int>(R) + 1, Table>...};
  return table[rows - 1];
}
template <class Scalar>
FewRowsTile<Scalar> few_rows_tile_for(Index rows, bool table) {
  constexpr auto R = std::make_index_sequence<kFewRows>{};
  return table ? few_rows_tile_for<Scalar, true>(rows, R) : few_rows_tile_for<Scalar, false>(rows, R);
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// The decode kernel of float builds with AVX2 + FMA or AVX-512: the chains of few_rows_tile, with
// the weights' storage type known at compile time and the transposes written for the ISA, so that
// the 16-bit widening and the transposition stay in registers (the generic kernel's L x L block
// and per-load dtype dispatch spill, which left a decode step at a third of the read bandwidth).
// Each visit of a block's L rows reads a whole line's worth of each row at once (64 bytes on
// AVX-512), starting on a line boundary: weight rows often lie a power of two apart, and read a few
// values at a time they evict one another from their one L1 set before each line is used up.
struct Bf16Stored {};
struct F16Stored {};

template <class Stored>
constexpr Index stored_bytes() {
  return std::is_same_v<Stored, float> ? 4 : 2;
}

template <class Stored>
constexpr DType stored_dtype() {
  if constexpr (std::is_same_v<Stored, float>) return DType::F32;
  else if constexpr (std::is_same_v<Stored, Bf16Stored>) return DType::BF16;
  else return DType::F16;
}

#if defined(__AVX512F__)
using DecodePacket = __m512;
constexpr Index kVisitBytes = 64;
// How far ahead of a visit each row is prefetched (into L2): with 32 rows in flight the hardware
// prefetchers alone left an F32 decode step at half the read bandwidth.
constexpr Index kPrefetchBytes = 256;
template <class Stored>
constexpr int visit_depth() {  // depth steps per visit: 64 bytes of every row
  return static_cast<int>(kVisitBytes / stored_bytes<Stored>());
}

// Calls step(q, packet) for q = 0 .. visit_depth - 1 in order, the packet holding rows[r]'s value
// at depth p + q in lane r (16 rows, 64 bytes of each). Each row's 16-byte pieces are
// broadcast into the 128-bit lane of its row group (lane g of z[s][a] holds row a + 4g), and a
// 4 x 4 transpose of 32-bit elements in every lane puts row r's element e in lane r: loads that
// broadcast, and no shuffle across lanes. A 16-bit element pair widens by a shift or a mask (BF16)
// or through F16C (F16).
template <class Stored, class Step>
EIGEN_ALWAYS_INLINE void for_each_column(const unsigned char* const* rows, Index p, const Step& step) {
  constexpr int kPieces = kVisitBytes / 16;
  const Index offset = p * stored_bytes<Stored>();
  __m512 z[kPieces][4];
  // Fully unrolled: one load instruction per row and piece, whose steady stride the hardware
  // prefetchers follow.
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a)
#pragma GCC unroll 4
      for (int s = 0; s < kPieces; ++s) {
        const __m128 piece = _mm_loadu_ps(reinterpret_cast<const float*>(rows[a + 4 * g] + offset + 16 * s));
        if (s == 0) _mm_prefetch(reinterpret_cast<const char*>(rows[a + 4 * g] + offset + kPrefetchBytes), _MM_HINT_T1);
        z[s][a] = g == 0 ? _mm512_broadcast_f32x4(piece) : _mm512_mask_broadcast_f32x4(z[s][a], static_cast<__mmask16>(0xF << (4 * g)), piece);
      }
  constexpr int per_piece = std::is_same_v<Stored, float> ? 4 : 8;
  for (int s = 0; s < kPieces; ++s) {
    const __m512 t0 = _mm512_unpacklo_ps(z[s][0], z[s][1]), t1 = _mm512_unpackhi_ps(z[s][0], z[s][1]);
    const __m512 t2 = _mm512_unpacklo_ps(z[s][2], z[s][3]), t3 = _mm512_unpackhi_ps(z[s][2], z[s][3]);
    const __m512 u[4] = {_mm512_shuffle_ps(t0, t2, 0x44), _mm512_shuffle_ps(t0, t2, 0xEE), _mm512_shuffle_ps(t1, t3, 0x44),
                         _mm512_shuffle_ps(t1, t3, 0xEE)};
    for (int e = 0; e < 4; ++e) {
      const int q = s * per_piece + (per_piece / 4) * e;
      if constexpr (std::is_same_v<Stored, float>) {
        step(q, u[e]);
      } else {  // an element pair: depth q in the low half, q + 1 in the high half
        const __m512i pair = _mm512_castps_si512(u[e]);
        if constexpr (std::is_same_v<Stored, Bf16Stored>) {
          step(q, _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)));
          step(q + 1, _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
        } else {
          step(q, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(pair)));
          step(q + 1, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(pair, 16))));
        }
      }
    }
  }
}
#else
using DecodePacket = __m256;
constexpr Index kVisitBytes = 32;
template <class Stored>
constexpr int visit_depth() {  // depth steps per visit: one 8 x 8 transpose
  return 8;
}

// 8 stored values from `at`, widened to float (exactly).
template <class Stored>
EIGEN_ALWAYS_INLINE __m256 load8(const unsigned char* at) {
  if constexpr (std::is_same_v<Stored, float>) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(at));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
    if constexpr (std::is_same_v<Stored, Bf16Stored>) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);  // F16C comes with every AVX2 + FMA CPU and build level
  }
}

// Calls step(q, packet) for q = 0 .. 7 in order, the packet holding rows[r]'s
// value at depth p + q in lane r (8 rows): the 8 x 8 transpose.
template <class Stored, class Step>
EIGEN_ALWAYS_INLINE void for_each_column(const unsigned char* const* rows, Index p, const Step& step) {
  const Index offset = p * stored_bytes<Stored>();
  __m256 z[8], t[8];
  for (int r = 0; r < 8; ++r) z[r] = load8<Stored>(rows[r] + offset);
  for (int r = 0; r < 8; r += 2) {
    t[r] = _mm256_unpacklo_ps(z[r], z[r + 1]);
    t[r + 1] = _mm256_unpackhi_ps(z[r], z[r + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    z[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    z[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
    z[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    z[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    step(q, _mm256_permute2f128_ps(z[q], z[q + 4], 0x20));
  }
  for (int q = 0; q < 4; ++q) {
    step(q + 4, _mm256_permute2f128_ps(z[q], z[q + 4], 0x31));
  }
}
#endif

template <class Stored, int Rows, bool Table>
void few_rows_tile_simd(Index k, const LhsBlock<float>& a_block, const RhsMatrix& b, Index j0, float* c, Index ldc, Index cols,
                        bool load) {
  using S = GemmShape<float>;
  constexpr int V = S::kVectors, L = S::kLanes;
  constexpr Index bytes = stored_bytes<Stored>();
  constexpr int W = visit_depth<Stored>();
  constexpr Index visit_bytes = W * bytes;
  const LhsReader<float, Rows, Table> a(a_block);
  Accumulators<float, Rows> block;
  block.begin(c, ldc, cols, load);
  const unsigned char* rows[V * L];  // rows past `cols` repeat the last one, and are not stored
  const auto* base = static_cast<const unsigned char*>(b.data);
  for (int r = 0; r < V * L; ++r) rows[r] = base + (j0 + std::min<Index>(r, cols - 1)) * b.stride * bytes;
  const auto visit = [&](Index p0) {
    // The packet columns' chains are independent: one's multiply-adds run while the other's wait.
    // Every column is computed (a narrow block's extra rows repeat its last one): with v known at
    // compile time the accumulators stay in registers.
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      for_each_column<Stored>(rows + v * L, p0, [&](int q, const DecodePacket& column) {
        block.step_column(v, column, [&](int i) { return a(i, p0 + q); });
      });
  };
  // Steps [p, p + count) (count < W: a row's ragged head or tail) one depth at a time, each column
  // gathered from the rows' widened values: the same chains as a whole visit, in a loop far smaller
  // than a second instance of the unrolled one.
  const auto step_singly = [&](Index p, Index count) {
    alignas(64) float values[V * L][W];
    for (int r = 0; r < V * L; ++r) convert_values(rows[r] + p * bytes, stored_dtype<Stored>(), static_cast<std::size_t>(count), values[r]);
    for (Index q = 0; q < count; ++q)
      for (int v = 0; v < V; ++v) {
        alignas(64) float column[L];
        for (int r = 0; r < L; ++r) column[r] = values[v * L + r][q];
        block.step_column(v, Eigen::internal::pload<DecodePacket>(column), [&](int i) { return a(i, p + q); });
      }
  };
  // Visits start on a boundary of visit_bytes of the first row (of every row when the row length
  // is a multiple of it, which is when rows share an L1 set): each visit then reads whole lines.
  const auto misaligned = static_cast<Index>(reinterpret_cast<std::uintptr_t>(rows[0]) % visit_bytes);
  const Index head = std::min<Index>(k, (visit_bytes - misaligned) % visit_bytes / bytes);
  if (head > 0) step_singly(0, head);
  const Index whole = head + (k - head) / W * W;
  for (Index p0 = head; p0 < whole; p0 += W) visit(p0);
  if (whole < k) step_singly(whole, k - whole);
  block.end(c, ldc, cols);
}

template <class Stored, bool Table, std::size_t... R>
FewRowsTile<float> few_rows_tile_simd_for(Index rows, std::index_sequence<R...>) {
  static constexpr FewRowsTile<float> table[] = {&few_rows_tile_simd<Stored, static_cast<int>(R) + 1, Table>...};
  return table[rows - 1];
}
template <class Stored>
FewRowsTile<float> few_rows_tile_simd_for(Index rows, bool table) {
  constexpr auto R = std::make_index_sequence<kFewRows>{};
  return table ? few_rows_tile_simd_for<Stored, true>(rows, R) : few_rows_tile_simd_for<Stored, false>(rows, R);
}

// One depth step of a panel (NR stored values at `at`) as the micro-kernel's two packets of float.
template <class Stored>
EIGEN_ALWAYS_INLINE void load_panel_step(const unsigned char* at, DecodePacket* out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Stored, float>) {
    out[0] = _mm512_loadu_ps(at);
    out[1] = _mm512_loadu_ps(at + 64);
  } else if constexpr (std::is_same_v<Stored, Bf16Stored>) {
    const __m512i v = _mm512_loadu_si512(at);
    out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
    out[1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
  } else {
    out[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
    out[1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 32)));
  }
#else
  out[0] = load8<Stored>(at);
  out[1] = load8<Stored>(at + 8 * stored_bytes<Stored>());
#endif
}

// How far ahead of its loads a 16-bit panel is prefetched, one line per line read. A 16-bit panel
// step reads half the bytes of a float one in the same time, and the hardware prefetchers alone
// left it below the memory's speed; float panels reach it without (and lose a little with it).
constexpr Index kPanelPrefetchBytes = 4096;

// C[0..Rows)[0..cols) (+)= A [Rows][k] x B for B in panels (RhsMatrix::panels), `Panels` panels side
// by side from `panel` on (panel_bytes apart), read and widened in registers: micro_tile's chains
// over a weight that streams in order. Two panels at once give a row of A four independent chains;
// one row alone takes kPanelsAtOnce.
template <class Stored, int Rows, bool Table, int Panels>
void panel_tile(Index k, const LhsBlock<float>& a_block, const unsigned char* panel, Index panel_bytes, float* c, Index ldc, Index cols,
                bool load) {
  constexpr Index step_bytes = GemmShape<float>::kCols * stored_bytes<Stored>();
  const LhsReader<float, Rows, Table> a(a_block);
  Accumulators<float, Rows, 2 * Panels> block;
  block.begin(c, ldc, cols, load);
  for (Index p = 0; p < k; ++p) {
    DecodePacket bv[2 * Panels];
#pragma GCC unroll 4
    for (int q = 0; q < Panels; ++q) {
      const unsigned char* at = panel + q * panel_bytes + p * step_bytes;
      if constexpr (stored_bytes<Stored>() == 2) {  // step_bytes divides a line (64 bytes): panels start on one
        static_assert(64 % step_bytes == 0);
        if ((p * step_bytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(at + kPanelPrefetchBytes), _MM_HINT_T0);
      }
      load_panel_step<Stored>(at, bv + 2 * q);
    }
    block.step(bv, [&](int i) { return a(i, p); });
  }
  block.end(c, ldc, cols);
}

using PanelTile = void (*)(Index, const LhsBlock<float>&, const unsigned char*, Index, float*, Index, Index, bool);

template <class Stored, bool Table, int Panels, std::size_t... R>
PanelTile panel_tile_for(Index rows, std::index_sequence<R...>) {
  static constexpr PanelTile table[] = {&panel_tile<Stored, static_cast<int>(R) + 1, Table, Panels>...};
  return table[rows - 1];
}
// The panel kernel for `rows` (<= kFewRows) rows of A, one or two panels at once (or, for one row,
// kPanelsAtOnce), B's storage type.
template <class Stored>
PanelTile panel_tile_for(Index rows, bool table, int panels) {
  constexpr auto R = std::make_index_sequence<kFewRows>{};
  if (panels == kPanelsAtOnce) {
    assert(rows == 1);
    return table ? &panel_tile<Stored, 1, true, kPanelsAtOnce> : &panel_tile<Stored, 1, false, kPanelsAtOnce>;
  }
  if (panels == 2) return table ? panel_tile_for<Stored, true, 2>(rows, R) : panel_tile_for<Stored, false, 2>(rows, R);
  return table ? panel_tile_for<Stored, true, 1>(rows, R) : panel_tile_for<Stored, false, 1>(rows, R);
}
inline PanelTile panel_tile_for(Index rows, bool table, int panels, DType stored) {
  if (stored == DType::F32) return panel_tile_for<float>(rows, table, panels);
  if (stored == DType::BF16) return panel_tile_for<Bf16Stored>(rows, table, panels);
  return panel_tile_for<F16Stored>(rows, table, panels);
}
#endif

// The decode kernel for `rows` rows of A (through a row table or not) and B's storage type.
template <class Scalar>
FewRowsTile<Scalar> decode_tile_for(Index rows, bool table, DType stored) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if constexpr (std::is_same_v<Scalar, float>) {
    if (stored == DType::F32) return few_rows_tile_simd_for<float>(rows, table);
    if (stored == DType::BF16) return few_rows_tile_simd_for<Bf16Stored>(rows, table);
    if (stored == DType::F16) return few_rows_tile_simd_for<F16Stored>(rows, table);
  }
#endif
  (void)stored;
  return few_rows_tile_for<Scalar>(rows, table);
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
  assert(!b.panels || (b.transposed && std::is_same_v<Scalar, float>));
  if (b.transposed && !b.panels && m <= detail::kFewRows) {  // a decode step: B read once, in place
    const auto tile = detail::decode_tile_for<Scalar>(m, a.rows != nullptr, b.dtype);
    for (Index j0 = 0; j0 < n; j0 += NR)
      tile(k, detail::LhsBlock<Scalar>{&a, 0, 0}, b, j0, c + j0, ldc, std::min<Index>(NR, n - j0), accumulate);
    return;
  }
  auto& buf = detail::gemm_buffers<Scalar>();
  const Index panels = (n + NR - 1) / NR;
  // B in place when stored [k][n] in Scalar (then only a ragged last panel is copied) or as panels
  // in Scalar.
  const bool in_place = (!b.transposed || b.panels) && b.dtype == dtype_of<Scalar>();
  const Index first_packed = !in_place ? 0 : b.panels ? panels : n / NR;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if constexpr (std::is_same_v<Scalar, float>) {
    if (b.panels && m <= detail::kFewRows) {  // a decode step: the panels streamed in order, side by side
      const Index panel_bytes = NR * b.stride * static_cast<Index>(dtype_size(b.dtype));
      const auto* base = static_cast<const unsigned char*>(b.data);
      for (Index j0 = 0; j0 < n;) {
        const Index left = (n - j0 + NR - 1) / NR;  // panels, the last one padded
        const int count = m == 1 && left >= detail::kPanelsAtOnce ? detail::kPanelsAtOnce : left >= 2 ? 2 : 1;
        const auto tile = detail::panel_tile_for(m, a.rows != nullptr, count, b.dtype);
        tile(k, detail::LhsBlock<Scalar>{&a, 0, 0}, base + (j0 / NR) * panel_bytes, panel_bytes, c + j0, ldc,
             std::min<Index>(count * NR, n - j0), accumulate);
        j0 += count * NR;
      }
      return;
    }
  }
#endif
  const Index depth = in_place ? S::depth_block(m) : S::packed_depth(), longest = depth + depth / 4;
  for (Index p0 = 0, kc = 0; p0 < k; p0 += kc) {
    // A tail of at most a quarter block joins the last block: a pass of its own would store and
    // reload C for little depth (GQE's o_proj, depth 576 = 512 + 64 at d_h = 64: [1024 x 576] x
    // [576 x 1024]^T 1.05-1.08x as fast in one block). Either way each chain runs over p in order.
    kc = k - p0 <= longest ? k - p0 : depth;
    const bool load = accumulate || p0 > 0;
    // Room for the longest block at once, whatever this block's depth: an in-place B's depth grows
    // with a KV cache, and packed products alternate between depths (GQE's o_proj, 576, after
    // the projections' 512), which would otherwise grow the buffers, fresh pages and all, anew.
    const Index room = longest;
    const Index stage_stride = buf.reserve((panels - first_packed) * room * NR, room);
    for (Index jp = first_packed; jp < panels; ++jp)
      detail::pack_rhs(b, jp * NR, std::min<Index>(NR, n - jp * NR), p0, kc, buf.rhs.data() + (jp - first_packed) * kc * NR,
                       buf.stage.data(), stage_stride);
    for (Index i0 = 0; i0 < m; i0 += MR) {
      const Index rows = std::min<Index>(MR, m - i0);
      const detail::LhsBlock<Scalar> a_block{&a, i0, p0};
      const auto tile = detail::micro_tile_for<Scalar>(rows, a.rows != nullptr);
      // A last panel of one packet's columns or fewer (GQE's router, 16 experts) through a tile one
      // packet wide: the same chains, without multiplying the padding.
      const auto narrow = detail::micro_tile_for<Scalar, 1>(rows, a.rows != nullptr);
      // In-place panels go W at a time through a wide tile where one applies (the same chains).
      const auto wide = b.panels ? detail::WidePlan<Scalar>{} : detail::wide_plan<Scalar>(rows, a.rows != nullptr, first_packed * NR);
      const Index W = wide.packets / S::kVectors;
      // Packed (or panel-laid) panels two at a time, 6 rows at a time, where a tile holds them.
      const auto pair = detail::wide_plan<Scalar>(rows, a.rows != nullptr, 2 * NR);
      const bool pairs = pair.rows == 6;
      for (Index jp = 0; jp < panels; ++jp) {
        const Index j0 = jp * NR;
        if (wide.tile && jp + W <= first_packed) {
          for (Index r = 0; r < rows; r += wide.rows)
            wide.tile(kc, detail::LhsBlock<Scalar>{&a, i0 + r, p0}, static_cast<const Scalar*>(b.data) + p0 * b.stride + j0, b.stride,
                      NR, c + (i0 + r) * ldc + j0, ldc, W * NR, load);
          jp += W - 1;
          continue;
        }
        const bool packed = jp >= first_packed;
        const Scalar* panel = packed     ? buf.rhs.data() + (jp - first_packed) * kc * NR
                              : b.panels ? static_cast<const Scalar*>(b.data) + j0 * b.stride + p0 * NR
                                         : static_cast<const Scalar*>(b.data) + p0 * b.stride + j0;
        if (pairs && (packed || b.panels) && jp + 1 < panels) {
          const Index gap = packed ? kc * NR : NR * b.stride;
          for (Index r = 0; r < rows; r += pair.rows)
            pair.tile(kc, detail::LhsBlock<Scalar>{&a, i0 + r, p0}, panel, NR, gap, c + (i0 + r) * ldc + j0, ldc,
                      std::min<Index>(2 * NR, n - j0), load);
          ++jp;
          continue;
        }
        (n - j0 <= S::kLanes ? narrow : tile)(kc, a_block, panel, packed || b.panels ? NR : b.stride, NR, c + i0 * ldc + j0, ldc,
                                             std::min<Index>(NR, n - j0), load);
      }
    }
  }
}

// ---- products with a weight: C [m, n] = A [m, k] W^T, W stored [n, k] -----------------------
//
// Weights are stored [out, in], so W^T is gemm's B stored transposed, in F32, BF16, F16 (or F64
// for double models): gemm packs W's rows transposed into its panels, widening 16-bit values
// exactly on the way. A decode step multiplies a few rows by every weight once, where packing
// would cost more than the product: with at most kFewRows rows, gemm reads W in place, a block of
// L rows at a time, transposes their values in registers (with AVX2 or AVX-512, 16-bit values
// widened there too) and runs the same chains as micro_tile, one multiply-add per p in order.
// Either way C[i][j] is the same chain
// over row i of A and row j of W: batch invariant, whichever path a call takes.

template <class Scalar>
void gemm_bt(Index m, Index n, Index k, const Scalar* a, Index lda, const WeightMatrix& w, Scalar* c, Index ldc,
             bool accumulate = false) {
  gemm<Scalar>(m, n, k, LhsMatrix<Scalar>{a, lda, 1}, RhsMatrix{w.data, w.dtype, w.stride, true, w.panels}, c, ldc, accumulate);
}

}  // namespace gqe
