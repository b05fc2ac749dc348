#pragma once
// Causal attention, forward and backward: one kernel for GQA's heads, GQE's slots and shared head,
// prefill, chunks appended to a cache, decode and training.
//
// Keys and values live in tiles of kKeyTile positions (the KV cache's own layout): tile t holds
// positions [t*KT, (t+1)*KT) as K transposed [d_h][KT] and V [KT][d_h], so that both products of a
// tile read them in place: S = Q K^T and O += P V are gemm's [k][n] operands. Forward, per work unit
// (one group of query heads sharing a KV head, one tile of queries): for each key tile left of the
// diagonal, S = (Q * scale) K^T, an online softmax update per query row (running maximum m and sum
// l), O = O * exp(m_old - m) + P V; finally O /= l and, for training, lse = m + log(l). No T x T
// matrix is ever held; blocks above the diagonal are never computed, and in the diagonal's tile each
// register tile of rows stops at its latest query's keys. The key tiles are taken in chunks of
// kKeyChunk positions, each chunk's state (O, m, l) started from scratch and merged into the first
// chunk's in order: a decode step over a long cache runs its chunks as separate units
// (a few groups would otherwise leave threads idle) and merges them after, with the same arithmetic.
//
// Masking is aligned bottom-right: with `past` keys already cached, query i of the chunk sits at
// position past + i and sees keys 0 .. past + i.
//
// Batch invariance: a query row's arithmetic depends only on its own position and values. Key
// tiles and chunks start at fixed positions, masked keys contribute exact zeros, the row sums add packets in a
// fixed lane order, and gemm's products are row-invariant; so prefill, chunks and decode give the
// same bits for the same position, whatever the other rows of the tile.
//
// Backward (FlashAttention-2's, from the saved lse): P = exp(S - lse), dV += P^T dO,
// dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ += dS K * scale, dK += dS^T (Q * scale).
// One work unit per query group walks all its key tiles (outer) and query tiles (inner), so dK and
// dV are summed inside the unit: bit-identical for any thread count, no locks.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gqe/ops/gemm.hpp"
#include "gqe/ops/rows.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/scratch_buffer.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

// Positions per key tile: the KV cache's tiles and the kernel's key blocks.
constexpr Index kKeyTile = 256;

// The keys and values of one KV head, in tiles (see the file comment).
template <class Scalar>
struct KeyValueTiles {
  const Scalar* const* tiles = nullptr;  // tile t's block
  Index key_offset = 0;                  // K^T [d_h][KT] of this head inside a block
  Index value_offset = 0;                // V [KT][d_h] of this head inside a block
  const Scalar* key(Index t) const { return tiles[t] + key_offset; }
  const Scalar* value(Index t) const { return tiles[t] + value_offset; }
};

// `heads` query heads that read one KV head, over one run of `count` queries after `past` cached
// positions. The heads' query and output columns are consecutive blocks of d_h.
template <class Scalar>
struct QueryGroup {
  const Scalar* query = nullptr;  // [count, heads*d_h], row stride query_stride
  Index query_stride = 0;
  KeyValueTiles<Scalar> kv;       // positions 0 .. past + count - 1
  Scalar* out = nullptr;          // [count, heads*d_h], row stride out_stride
  Index out_stride = 0;
  Scalar* lse = nullptr;          // optional: lse[t*lse_stride + h], log-sum-exp of query t of head h
  Index lse_stride = 0;
  Index past = 0;
  Index count = 0;
  Index heads = 1;
};

// What the backward pass reads and writes besides the forward's QueryGroup (past must be 0).
template <class Scalar>
struct QueryGroupGrad {
  const Scalar* d_out = nullptr;  // [count, heads*d_h], row stride out_stride
  Scalar* d_query = nullptr;      // [count, heads*d_h], row stride query_stride (written)
  Scalar* d_key = nullptr;        // [count, d_h], row stride d_kv_stride (written)
  Scalar* d_value = nullptr;      // [count, d_h], row stride d_kv_stride (written)
  Index d_kv_stride = 0;
};

namespace detail {

constexpr Index kQueryTile = 128;
// Positions per key chunk: a query's keys are taken chunk by chunk, each chunk's online softmax
// from scratch, and the chunks' states merged in order. Decode runs a long cache's chunks in
// parallel and merges them after; prefill runs them in turn; both give the same bits.
constexpr Index kKeyChunk = 8 * kKeyTile;


// Grow-only scratch, reused call after call: no allocation once warm.
template <class Scalar>
struct AttentionScratch {
  ScratchBuffer<Scalar> query, scores, acc, row_max, row_sum, chunk_acc, chunk_max, chunk_sum, d_out, d_scores, delta, lse,
      d_query, d_key, d_value, key_rows, value_t, tile_max, correction;
};
template <class Scalar>
AttentionScratch<Scalar>& attention_scratch() {
  thread_local AttentionScratch<Scalar> scratch;
  return scratch;
}

// Stacks rows [first, first + n) of the heads' blocks: head h's row i -> dst row h*n + i (d_h wide),
// times `scale`.
template <class Scalar>
void stack_heads(const Scalar* src, Index stride, Index heads, Index head_dim, Index first, Index n, Scalar scale, Scalar* dst) {
  for (Index h = 0; h < heads; ++h)
    for (Index i = 0; i < n; ++i) {
      const Scalar* row = src + (first + i) * stride + h * head_dim;
      Scalar* out = dst + (h * n + i) * head_dim;
      for (Index c = 0; c < head_dim; ++c) out[c] = row[c] * scale;
    }
}

// max(a, b), NaN when either is NaN.
template <class Scalar>
Scalar max_or_nan(Scalar a, Scalar b) {
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<Scalar>::quiet_NaN() : std::max(a, b);
}

// The online softmax's state of `rows` stacked query rows over a run of keys: O unnormalised
// [rows][d_h], the running maximum m and sum l per row.
template <class Scalar>
struct SoftmaxState {
  Scalar* acc;
  Scalar* max;
  Scalar* sum;
};

// Key chunk c of g (positions [c*KC, (c+1)*KC), cut at what the rows see) for the stacked,
// scaled queries `query` [rows][d_h] of queries [first, first + n): the state from scratch. A row
// that sees no key of the chunk keeps m = -inf, l = 0, O = 0.
template <class Scalar>
void attend_chunk(const QueryGroup<Scalar>& g, Index head_dim, Index first, Index n, Index chunk, const Scalar* query,
                  const SoftmaxState<Scalar>& st) {
  constexpr Index KT = kKeyTile, L = kPacketLanes<Scalar>, MR = GemmShape<Scalar>::kRows, NR = GemmShape<Scalar>::kCols;
  auto& s = attention_scratch<Scalar>();
  const Index rows = g.heads * n, dh = head_dim;
  s.scores.reserve(rows * KT + L);
  s.tile_max.reserve(rows);
  s.correction.reserve(rows);
  std::fill_n(st.acc, rows * dh, Scalar(0));
  std::fill_n(st.max, rows, -std::numeric_limits<Scalar>::infinity());
  std::fill_n(st.sum, rows, Scalar(0));
  const Index first_pos = g.past + first, last_pos = first_pos + n - 1;
  const Index t_end = std::min((chunk + 1) * kKeyChunk, last_pos + 1);
  for (Index t = chunk * kKeyChunk / KT; t * KT < t_end; ++t) {
    const Index j0 = t * KT, nk = std::min(KT, last_pos + 1 - j0);
    const auto keys_of = [&](Index i) { return std::min(nk, first_pos + i - j0 + 1); };  // query i's keys in this tile
    // Calls product(r0, rb, seen) for blocks of stacked rows [r0, r0 + rb) and the keys they see:
    // left of the diagonal every row sees the whole tile, one block; on it, MR rows at a time, each
    // block over the keys of its latest query, so that the triangle above the diagonal is skipped
    // down to a register tile. What lies past a row's own keys is never read (masked scores) or
    // adds exact zeros (probabilities), as the rest of the tile does.
    const auto by_blocks = [&](const auto& product) {
      if (first_pos - j0 + 1 >= nk) {
        product(Index(0), rows, nk);
        return;
      }
      for (Index r0 = 0; r0 < rows; r0 += MR) {
        const Index rb = std::min(MR, rows - r0);
        const Index latest = r0 / n == (r0 + rb - 1) / n ? (r0 + rb - 1) % n : n - 1;  // the block may span two heads
        const Index seen = keys_of(latest);
        if (seen > 0) product(r0, rb, seen);
      }
    };
    by_blocks([&](Index r0, Index rb, Index seen) {  // whole panels of K^T, read in place
      gemm<Scalar>(rb, std::min(nk, (seen + NR - 1) / NR * NR), dh, LhsMatrix<Scalar>{query + r0 * dh, dh, 1},
                   rhs_of(g.kv.key(t), KT, false), s.scores.data() + r0 * KT, KT, false);
    });
    // Every row's new maximum first, then the rescaling factors exp(m_old - m_new) a packet of rows
    // at a time, where rows in turn would each wait on a scalar exp (the kernel 1.04-1.12x as
    // fast). The factor is 1 where the maximum did not move (a row that saw no key here included)
    // and, on a row's first tile, exp's floor (about 1e-38), which multiplies a state of zeros.
    Scalar* const new_max = s.tile_max.data();
    Scalar* const correction = s.correction.data();
    for (Index r = 0; r < rows; ++r) {
      const Index valid = keys_of(r % n);
      new_max[r] = valid <= 0 ? st.max[r] : max_or_nan(st.max[r], row_maximum(s.scores.data() + r * KT, valid));
    }
    {
      using namespace Eigen::internal;
      for (Index r = 0; r < rows; r += L) {
        const Packet<Scalar> old_max = load_partial(st.max, r, rows), now = load_partial(new_max, r, rows);
        store_partial(correction, r, rows, pselect(pcmp_eq(old_max, now), pset1<Packet<Scalar>>(Scalar(1)),
                                                   exp_nonpositive<Scalar>(psub(old_max, now))));
      }
    }
    for (Index r = 0; r < rows; ++r) {
      Scalar* row = s.scores.data() + r * KT;
      const Index valid = keys_of(r % n);
      if (valid <= 0) {
        std::fill(row, row + nk, Scalar(0));
        continue;
      }
      const Scalar tile_sum = exp_row(row, valid, nk, new_max[r]);
      st.sum[r] = st.sum[r] * correction[r] + tile_sum;
      if (correction[r] != Scalar(1)) {  // times 1 is exact: skipping it changes no bit
        Scalar* acc = st.acc + r * dh;
        for (Index c = 0; c < dh; ++c) acc[c] *= correction[r];
      }
      st.max[r] = new_max[r];
    }
    by_blocks([&](Index r0, Index rb, Index seen) {
      gemm<Scalar>(rb, dh, seen, LhsMatrix<Scalar>{s.scores.data() + r0 * KT, KT, 1}, rhs_of(g.kv.value(t), dh, false),
                   st.acc + r0 * dh, dh, true);
    });
  }
}

// st becomes the state over its keys and those of `later` (the next chunk's state).
template <class Scalar>
void merge_states(Index rows, Index head_dim, const SoftmaxState<Scalar>& st, const SoftmaxState<Scalar>& later) {
  for (Index r = 0; r < rows; ++r) {
    const Scalar m_later = later.max[r];
    if (m_later == -std::numeric_limits<Scalar>::infinity()) continue;  // the row saw no key there
    const Scalar new_max = max_or_nan(st.max[r], m_later);
    const Scalar a = std::exp(st.max[r] - new_max), b = std::exp(m_later - new_max);
    st.sum[r] = st.sum[r] * a + later.sum[r] * b;
    Scalar* acc = st.acc + r * head_dim;
    const Scalar* acc_later = later.acc + r * head_dim;
    for (Index c = 0; c < head_dim; ++c) acc[c] = acc[c] * a + acc_later[c] * b;
    st.max[r] = new_max;
  }
}

// out = O / l for queries [first, first + n) of g, and lse = m + log(l) when g keeps it.
template <class Scalar>
void write_attention(const QueryGroup<Scalar>& g, Index head_dim, Index first, Index n, const SoftmaxState<Scalar>& st) {
  const Index dh = head_dim;
  for (Index h = 0; h < g.heads; ++h)
    for (Index i = 0; i < n; ++i) {
      const Index r = h * n + i;
      const Scalar sum = st.sum[r];
      const Scalar* acc = st.acc + r * dh;
      Scalar* out = g.out + (first + i) * g.out_stride + h * dh;
      for (Index c = 0; c < dh; ++c) out[c] = acc[c] / sum;
      if (g.lse) g.lse[(first + i) * g.lse_stride + h] = st.max[r] + std::log(sum);
    }
}

// Key chunks that queries [first, first + n) of g see.
template <class Scalar>
Index chunks_seen(const QueryGroup<Scalar>& g, Index first, Index n) {
  return (g.past + first + n - 1) / kKeyChunk + 1;
}

// Queries [first, first + n) of every head of g: chunk by chunk, each merged into the first.
template <class Scalar>
void attention_tile(const QueryGroup<Scalar>& g, Index head_dim, Scalar scale, Index first, Index n) {
  auto& s = attention_scratch<Scalar>();
  const Index rows = g.heads * n, dh = head_dim, chunks = chunks_seen(g, first, n);
  for (auto* v : {&s.query, &s.acc, &s.chunk_acc}) v->reserve(rows * dh);
  for (auto* v : {&s.row_max, &s.row_sum, &s.chunk_max, &s.chunk_sum}) v->reserve(rows);
  stack_heads(g.query, g.query_stride, g.heads, dh, first, n, scale, s.query.data());
  const SoftmaxState<Scalar> state{s.acc.data(), s.row_max.data(), s.row_sum.data()};
  const SoftmaxState<Scalar> chunk{s.chunk_acc.data(), s.chunk_max.data(), s.chunk_sum.data()};
  attend_chunk(g, dh, first, n, 0, s.query.data(), state);
  for (Index c = 1; c < chunks; ++c) {
    attend_chunk(g, dh, first, n, c, s.query.data(), chunk);
    merge_states(rows, dh, state, chunk);
  }
  write_attention(g, dh, first, n, state);
}

// Every group one query tile (decode, short chunks after a cache): each (group, key chunk) is a
// unit of its own, so that a long cache's few groups still spread over every thread; then each
// group's chunk states are merged in order, as attention_tile merges them.
template <class Scalar>
void attention_by_chunks(const std::vector<QueryGroup<Scalar>>& groups, Index head_dim, Scalar scale, double flops) {
  const Index dh = head_dim;
  struct Plan {
    std::vector<std::pair<Index, Index>> units;  // (group, chunk), a group's chunks consecutive
    std::vector<Index> first_unit, offset;       // per group; per unit, of its state in `states`
    ScratchBuffer<Scalar> states;                // per unit: O [rows][d_h], m [rows], l [rows]
  };
  thread_local Plan plan;  // grow-only; the units, on other threads, reach it through these references
  auto& units = plan.units;
  auto& first_unit = plan.first_unit;
  auto& offset = plan.offset;
  auto& states = plan.states;
  units.clear();
  first_unit.clear();
  offset.assign(1, 0);
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& g = groups[gi];
    first_unit.push_back(static_cast<Index>(units.size()));
    for (Index c = 0; c < chunks_seen(g, 0, g.count); ++c) {
      units.emplace_back(static_cast<Index>(gi), c);
      offset.push_back(offset.back() + g.heads * g.count * (dh + 2));
    }
  }
  first_unit.push_back(static_cast<Index>(units.size()));
  states.reserve(offset.back());
  const auto state_of = [&](Index unit) {
    const auto& g = groups[static_cast<std::size_t>(units[static_cast<std::size_t>(unit)].first)];
    const Index rows = g.heads * g.count;
    Scalar* acc = states.data() + offset[static_cast<std::size_t>(unit)];
    return SoftmaxState<Scalar>{acc, acc + rows * dh, acc + rows * dh + rows};
  };
  thread_pool().parallel_for(static_cast<Index>(units.size()), [&](Index u) {
    const auto [gi, c] = units[static_cast<std::size_t>(u)];
    const auto& g = groups[static_cast<std::size_t>(gi)];
    auto& s = attention_scratch<Scalar>();
    s.query.reserve(g.heads * g.count * dh);
    stack_heads(g.query, g.query_stride, g.heads, dh, Index(0), g.count, scale, s.query.data());
    attend_chunk(g, dh, 0, g.count, c, s.query.data(), state_of(u));
  }, flops);
  thread_pool().parallel_for(static_cast<Index>(groups.size()), [&](Index gi) {
    const auto& g = groups[static_cast<std::size_t>(gi)];
    const Index first = first_unit[static_cast<std::size_t>(gi)], last = first_unit[static_cast<std::size_t>(gi) + 1];
    const SoftmaxState<Scalar> state = state_of(first);
    for (Index u = first + 1; u < last; ++u) merge_states(g.heads * g.count, dh, state, state_of(u));
    write_attention(g, dh, 0, g.count, state);
  }, 4.0 * static_cast<double>(offset.back()));
}

// dst [cols][rows] = src [rows][cols] (row strides given).
template <class Scalar>
void transpose_block(const Scalar* src, Index src_stride, Index rows, Index cols, Scalar* dst, Index dst_stride) {
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
}

// One (key tile, query tile) block of a group's backward pass: dV, dK and (unscaled) dQ of the
// block accumulated into the scratch's [T][...] buffers. The key tile's K rows and V^T are in
// s.key_rows and s.value_t.
template <class Scalar>
void attention_backward_block(const QueryGroup<Scalar>& g, const QueryGroupGrad<Scalar>& d, Index head_dim, Scalar scale,
                              Index t, Index first) {
  constexpr Index KT = kKeyTile, QT = kQueryTile;
  auto& s = attention_scratch<Scalar>();
  const Index T = g.count, H = g.heads, dh = head_dim, j0 = t * KT, nk = std::min(KT, T - j0);
  const Index n = std::min(QT, T - first), rows = H * n;
  stack_heads(g.query, g.query_stride, H, dh, first, n, scale, s.query.data());
  stack_heads(d.d_out, g.out_stride, H, dh, first, n, Scalar(1), s.d_out.data());
  for (Index r = 0; r < rows; ++r) {  // delta = rowsum(dO * O), and the forward's lse
    const Index h = r / n, i = r % n;
    const Scalar* o = g.out + (first + i) * g.out_stride + h * dh;
    s.delta[r] = row_dot(s.d_out.data() + r * dh, o, dh);
    s.lse[r] = g.lse[(first + i) * g.lse_stride + h];
  }
  // P = exp(Q K^T * scale - lse), masked.
  gemm<Scalar>(rows, nk, dh, LhsMatrix<Scalar>{s.query.data(), dh, 1}, rhs_of(g.kv.key(t), KT, false), s.scores.data(), KT, false);
  for (Index r = 0; r < rows; ++r) {
    const Index valid = std::max<Index>(0, std::min(nk, first + r % n - j0 + 1));
    Scalar* row = s.scores.data() + r * KT;
    if (valid == 0)
      std::fill(row, row + nk, Scalar(0));
    else
      exp_row(row, valid, nk, s.lse[r]);
  }
  // dV[keys] += P^T dO; dP = dO V^T; dS = P * (dP - delta).
  gemm<Scalar>(nk, dh, rows, LhsMatrix<Scalar>{s.scores.data(), 1, KT}, rhs_of(s.d_out.data(), dh, false),
               s.d_value.data() + j0 * dh, dh, true);
  gemm<Scalar>(rows, nk, dh, LhsMatrix<Scalar>{s.d_out.data(), dh, 1}, rhs_of(s.value_t.data(), KT, false), s.d_scores.data(),
               KT, false);
  for (Index r = 0; r < rows; ++r) {
    const Scalar* p = s.scores.data() + r * KT;
    Scalar* ds = s.d_scores.data() + r * KT;
    const Scalar delta = s.delta[r];
    for (Index j = 0; j < nk; ++j) ds[j] = p[j] * (ds[j] - delta);
  }
  // dQ += dS K (per head: its rows land in its own columns); dK[keys] += dS^T (Q * scale).
  for (Index h = 0; h < H; ++h)
    gemm<Scalar>(n, dh, nk, LhsMatrix<Scalar>{s.d_scores.data() + h * n * KT, KT, 1}, rhs_of(s.key_rows.data(), dh, false),
                 s.d_query.data() + first * H * dh + h * dh, H * dh, true);
  gemm<Scalar>(nk, dh, rows, LhsMatrix<Scalar>{s.d_scores.data(), 1, KT}, rhs_of(s.query.data(), dh, false),
               s.d_key.data() + j0 * dh, dh, true);
}

// Every gradient of one query group (past == 0): key tiles outer (each tile's K and V transposed
// once), the query tiles that see it inner.
template <class Scalar>
void attention_backward_group(const QueryGroup<Scalar>& g, const QueryGroupGrad<Scalar>& d, Index head_dim, Scalar scale) {
  constexpr Index KT = kKeyTile, QT = kQueryTile, L = kPacketLanes<Scalar>;
  auto& s = attention_scratch<Scalar>();
  const Index T = g.count, H = g.heads, dh = head_dim, rows_max = H * std::min(QT, T);
  for (auto* v : {&s.query, &s.d_out}) v->reserve(rows_max * dh);
  s.scores.reserve(rows_max * KT + L);
  s.d_scores.reserve(rows_max * KT);
  s.delta.reserve(rows_max);
  s.lse.reserve(rows_max);
  s.d_query.reserve(T * H * dh);
  for (auto* v : {&s.d_key, &s.d_value}) v->reserve(T * dh);
  s.key_rows.reserve(KT * dh);
  s.value_t.reserve(dh * KT);
  std::fill_n(s.d_query.data(), T * H * dh, Scalar(0));  // [T][H*d_h], unscaled dS K
  std::fill_n(s.d_key.data(), T * dh, Scalar(0));
  std::fill_n(s.d_value.data(), T * dh, Scalar(0));
  for (Index t = 0; t * KT < T; ++t) {
    const Index j0 = t * KT, nk = std::min(KT, T - j0);
    transpose_block(g.kv.key(t), KT, dh, nk, s.key_rows.data(), dh);   // K [nk][d_h]
    transpose_block(g.kv.value(t), dh, nk, dh, s.value_t.data(), KT);  // V^T [d_h][nk]
    for (Index first = j0 / QT * QT; first < T; first += QT) attention_backward_block(g, d, head_dim, scale, t, first);
  }
  for (Index i = 0; i < T; ++i) {
    for (Index c = 0; c < H * dh; ++c) d.d_query[i * g.query_stride + c] = s.d_query[i * H * dh + c] * scale;
    std::copy_n(s.d_key.data() + i * dh, dh, d.d_key + i * d.d_kv_stride);
    std::copy_n(s.d_value.data() + i * dh, dh, d.d_value + i * d.d_kv_stride);
  }
}

}  // namespace detail

// Runs every group (each over its own queries and keys) on the library's pool; scale multiplies
// the scores (1/sqrt(d_h)).
template <class Scalar>
void causal_attention(const std::vector<QueryGroup<Scalar>>& groups, Index head_dim, Scalar scale) {
  // Work units: (group, query tile). Later tiles see more keys, so they go first for a better balance.
  Index max_tiles = 0;
  double flops = 0;  // score and value products of every query against the keys it sees
  for (const auto& g : groups) {
    max_tiles = std::max(max_tiles, (g.count + detail::kQueryTile - 1) / detail::kQueryTile);
    flops += 4.0 * static_cast<double>(g.heads * g.count * head_dim) * static_cast<double>(g.past + g.count);
  }
  const Index num_groups = static_cast<Index>(groups.size());
  const bool long_cache = std::any_of(groups.begin(), groups.end(), [](const auto& g) { return detail::chunks_seen(g, 0, g.count) > 1; });
  if (max_tiles == 1 && long_cache) {
    detail::attention_by_chunks(groups, head_dim, scale, flops);
    return;
  }
  thread_pool().parallel_for(num_groups * max_tiles, [&](Index unit) {
    const Index tile = max_tiles - 1 - unit / num_groups;
    const auto& g = groups[static_cast<std::size_t>(unit % num_groups)];
    const Index first = tile * detail::kQueryTile;
    if (first >= g.count) return;
    detail::attention_tile(g, head_dim, scale, first, std::min(detail::kQueryTile, g.count - first));
  }, flops);
}

// The gradients of every group (forward run with lse saved, past == 0): d_query, d_key and d_value
// overwritten. Groups must not share d_key / d_value rows.
template <class Scalar>
void causal_attention_backward(const std::vector<QueryGroup<Scalar>>& groups, const std::vector<QueryGroupGrad<Scalar>>& grads,
                               Index head_dim, Scalar scale) {
  assert(groups.size() == grads.size());
  double flops = 0;
  for (const auto& g : groups) {
    assert(g.past == 0 && g.lse);
    flops += 5.0 * static_cast<double>(g.heads * head_dim) * static_cast<double>(g.count) * static_cast<double>(g.count);
  }
  thread_pool().parallel_for(static_cast<Index>(groups.size()), [&](Index unit) {
    const auto u = static_cast<std::size_t>(unit);
    detail::attention_backward_group(groups[u], grads[u], head_dim, scale);
  }, flops);
}

}  // namespace gqe
