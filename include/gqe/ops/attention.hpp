#pragma once
// Causal attention for any number of query heads reading shared KV heads: one kernel for GQA, for
// GQE's slots and shared head, for prefill, chunked prefill and decode.
//
// Tiled with an online softmax (no T x T score matrix is ever held): each work unit is one head and
// one tile of queries; it walks the key tiles left of the diagonal, a GEMM each, keeping a running
// maximum and sum per query row. Blocks above the diagonal are never computed. Units are fixed by the
// shapes alone, so results are bit-identical whatever the thread count.
//
// Masking is aligned bottom-right: with `past` keys already cached, query i of the chunk sits at
// position past + i and sees keys 0 .. past + i.
#include "gqe/tensor/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

// `heads` query heads that read one KV head, over one run of queries. Pointers address row-major
// blocks with the given row strides (heads' columns inside a wider matrix); the heads' query and
// output columns are consecutive blocks of d_h. Heads sharing a KV head are computed together, so
// each key tile is loaded once for all of them and the GEMMs are taller.
template <class Scalar>
struct AttentionHead {
  const Scalar* query = nullptr;  // [count, heads*d_h], stride query_stride
  Index query_stride = 0;
  const Scalar* key = nullptr;    // [past + count, d_h], stride kv_stride
  const Scalar* value = nullptr;  // [past + count, d_h], stride kv_stride
  Index kv_stride = 0;
  Scalar* out = nullptr;  // [count, heads*d_h], stride out_stride
  Index out_stride = 0;
  Index past = 0;   // keys before the first query
  Index count = 0;  // queries
  Index heads = 1;  // query heads sharing this KV head
};

namespace detail {

constexpr Index kQueryTile = 128;
constexpr Index kKeyTile = 256;
constexpr Index kDecodeKeyTile = 512;  // a single query row: longer key tiles, fewer GEMV calls
constexpr Index kMinGemmRows = 8;      // below this many tile rows, products go row by row

// Rows of a tile: head h's query i is row h*n + i. The buffers only grow, and a tile uses their
// top rows, so that tiles of other sizes reuse them: no allocation per token.
template <class Scalar>
struct AttentionScratch {
  Matrix<Scalar> query;    // [>= heads*n, d_h], scaled copy of the query tile
  Matrix<Scalar> scores;   // [>= heads*n, kDecodeKeyTile]
  Matrix<Scalar> acc;      // [>= heads*n, d_h], unnormalised output
  Vector<Scalar> row_max;  // [>= heads*n]
  Vector<Scalar> row_sum;  // [>= heads*n]

  void reserve(Index rows, Index head_dim) {
    if (rows <= query.rows() && head_dim == query.cols()) return;
    rows = std::max(rows, query.rows());
    query.resize(rows, head_dim);
    scores.resize(rows, std::max(kKeyTile, kDecodeKeyTile));
    acc.resize(rows, head_dim);
    row_max.resize(rows);
    row_sum.resize(rows);
  }
};

template <class Scalar>
AttentionScratch<Scalar>& attention_scratch() {
  thread_local AttentionScratch<Scalar> scratch;  // reused across calls: no allocation per token
  return scratch;
}

// Queries [first, first + n) of every head of h.
template <class Scalar>
void attention_tile(const AttentionHead<Scalar>& h, Index head_dim, Scalar scale, Index first, Index n) {
  using ConstStrided = StridedMatrixMap<const Scalar>;
  auto& s = attention_scratch<Scalar>();
  const Index rows = h.heads * n;
  const Index key_tile = n == 1 ? kDecodeKeyTile : kKeyTile;
  s.reserve(rows, head_dim);
  auto query = s.query.topRows(rows);      // [rows, d_h]
  auto acc = s.acc.topRows(rows);          // [rows, d_h]
  auto row_max = s.row_max.head(rows);     // [rows]
  auto row_sum = s.row_sum.head(rows);     // [rows]
  for (Index q = 0; q < h.heads; ++q)
    query.middleRows(q * n, n) =
        ConstStrided(h.query + first * h.query_stride + q * head_dim, n, head_dim, Eigen::OuterStride<>(h.query_stride)) *
        scale;
  acc.setZero();
  row_max.setConstant(-std::numeric_limits<Scalar>::infinity());
  row_sum.setZero();

  const Index first_pos = h.past + first;  // position of query 0 of the tile
  const Index keys = first_pos + n;        // keys seen by the last query
  for (Index j0 = 0; j0 < keys; j0 += key_tile) {
    const Index nk = std::min(key_tile, keys - j0);
    const ConstStrided k(h.key + j0 * h.kv_stride, nk, head_dim, Eigen::OuterStride<>(h.kv_stride));
    const ConstStrided v(h.value + j0 * h.kv_stride, nk, head_dim, Eigen::OuterStride<>(h.kv_stride));
    auto scores = s.scores.topLeftCorner(rows, nk);  // [rows, nk]
    // A few rows (decode): one GEMV per row. Eigen's GEMM path packs the key tile for every call,
    // which costs several times the arithmetic when there are only one or two rows.
    const bool by_row = rows < kMinGemmRows;
    if (by_row)
      for (Index r = 0; r < rows; ++r) scores.row(r).noalias() = query.row(r) * k.transpose();
    else
      scores.noalias() = query * k.transpose();
    for (Index r = 0; r < rows; ++r) {
      // Query r % n sees keys up to first_pos + r % n: `valid` columns of this tile.
      const Index valid = std::min(nk, first_pos + r % n - j0 + 1);
      auto row = scores.row(r);
      if (valid <= 0) {
        row.setZero();
        continue;
      }
      const Scalar tile_max = row.head(valid).maxCoeff();
      const Scalar new_max = std::max(row_max(r), tile_max);
      const Scalar correction = std::exp(row_max(r) - new_max);  // 0 on the first tile (exp(-inf))
      row.head(valid) = (row.head(valid).array() - new_max).exp();
      row.tail(nk - valid).setZero();
      row_sum(r) = row_sum(r) * correction + row.head(valid).sum();
      acc.row(r) *= correction;
      row_max(r) = new_max;
    }
    if (by_row)
      for (Index r = 0; r < rows; ++r) acc.row(r).noalias() += scores.row(r) * v;
    else
      acc.noalias() += scores * v;
  }
  for (Index q = 0; q < h.heads; ++q) {
    StridedMatrixMap<Scalar> out(h.out + first * h.out_stride + q * head_dim, n, head_dim,
                                 Eigen::OuterStride<>(h.out_stride));
    out = acc.middleRows(q * n, n).array().colwise() / row_sum.segment(q * n, n).array();
  }
}

}  // namespace detail

// Runs every entry of `heads` (each over its own queries and keys) on the library's pool.
// scale multiplies the scores (1/sqrt(d_h)).
template <class Scalar>
void causal_attention(const std::vector<AttentionHead<Scalar>>& heads, Index head_dim, Scalar scale) {
  // Work units: (head, query tile). Later tiles see more keys, so they go first for a better balance.
  Index max_tiles = 0;
  double flops = 0;  // score and value products of every query against the keys it sees
  for (const auto& h : heads) {
    max_tiles = std::max(max_tiles, (h.count + detail::kQueryTile - 1) / detail::kQueryTile);
    flops += 4.0 * static_cast<double>(h.heads * h.count * head_dim) * static_cast<double>(h.past + h.count);
  }
  const Index num_heads = static_cast<Index>(heads.size());
  thread_pool().parallel_for(num_heads * max_tiles, [&](Index unit) {
    const Index tile = max_tiles - 1 - unit / num_heads;
    const auto& h = heads[static_cast<std::size_t>(unit % num_heads)];
    const Index first = tile * detail::kQueryTile;
    if (first >= h.count) return;
    detail::attention_tile(h, head_dim, scale, first, std::min(detail::kQueryTile, h.count - first));
  }, flops);
}

}  // namespace gqe
