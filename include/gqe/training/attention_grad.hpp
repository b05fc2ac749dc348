#pragma once
// Causal attention for training: the forward pass (the library's causal_attention, plus each query
// row's log-sum-exp of its scaled scores) and its backward pass. Neither ever holds a T x T matrix:
// the backward recomputes the scores of one (query tile, key tile) block at a time from the saved
// Q, K, V and log-sum-exp, as FlashAttention-2 does:
//   P = exp(Q K^T * scale - lse),  dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
//   dQ += dS K * scale,  dK += dS^T Q * scale.
// One work unit is one entry (the query heads of one sequence that read one K/V head) with all its
// query and key tiles, so that dK and dV are summed inside the unit: bit-identical results for any
// thread count, and no locks.
#include "gqe/tensor/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gqe/ops/attention.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe::training {

// `heads` query heads of one sequence of `count` tokens that read one K/V head, with the buffers of
// both passes. The heads' columns are consecutive blocks of d_h at the given pointers.
template <class Scalar>
struct TrainHead {
  const Scalar* query = nullptr;  // [count, heads*d_h], stride query_stride (after RoPE)
  Index query_stride = 0;
  const Scalar* key = nullptr;    // [count, d_h], stride kv_stride (after RoPE)
  const Scalar* value = nullptr;  // [count, d_h], stride kv_stride
  Index kv_stride = 0;
  Scalar* out = nullptr;          // [count, heads*d_h], stride out_stride: forward output
  Index out_stride = 0;
  Scalar* lse = nullptr;          // lse[t*lse_stride + h]: log-sum-exp of query t of head h
  Index lse_stride = 0;
  const Scalar* d_out = nullptr;  // [count, heads*d_h], stride out_stride (backward input)
  Scalar* d_query = nullptr;      // [count, heads*d_h], stride query_stride (written)
  Scalar* d_key = nullptr;        // [count, d_h], stride d_kv_stride (written)
  Scalar* d_value = nullptr;      // [count, d_h], stride d_kv_stride (written)
  Index d_kv_stride = 0;
  Index count = 0;
  Index heads = 1;
};

namespace detail {

constexpr Index kTrainQueryTile = 64;
constexpr Index kTrainKeyTile = 128;

template <class Scalar>
struct AttentionGradScratch {
  Matrix<Scalar> query, d_out, d_query, scores, d_scores, d_key, d_value;
  Vector<Scalar> lse, delta;
};

template <class Scalar>
AttentionGradScratch<Scalar>& attention_grad_scratch() {
  thread_local AttentionGradScratch<Scalar> s;
  return s;
}

template <class Scalar>
using ConstStrided = StridedMatrixMap<const Scalar>;

// Stacks the heads' rows [first, first + n) of a [count, heads*d_h] block: head q's row i -> q*n + i.
template <class Scalar, class Dest>
void stack_heads(const Scalar* data, Index stride, Index heads, Index head_dim, Index first, Index n, Dest&& dest) {
  for (Index q = 0; q < heads; ++q)
    dest.middleRows(q * n, n) =
        ConstStrided<Scalar>(data + first * stride + q * head_dim, n, head_dim, Eigen::OuterStride<>(stride));
}

// Log-sum-exp of the scaled, causally masked scores of queries [first, first + n) of h.
template <class Scalar>
void lse_tile(const TrainHead<Scalar>& h, Index head_dim, Scalar scale, Index first, Index n) {
  auto& s = attention_grad_scratch<Scalar>();
  const Index rows = h.heads * n;
  s.query.resize(rows, head_dim);
  stack_heads(h.query, h.query_stride, h.heads, head_dim, first, n, s.query);
  s.query *= scale;
  Vector<Scalar> row_max = Vector<Scalar>::Constant(rows, -std::numeric_limits<Scalar>::infinity());
  Vector<Scalar> row_sum = Vector<Scalar>::Zero(rows);
  const Index keys = first + n;
  for (Index j0 = 0; j0 < keys; j0 += kTrainKeyTile) {
    const Index nk = std::min(kTrainKeyTile, keys - j0);
    const ConstStrided<Scalar> k(h.key + j0 * h.kv_stride, nk, head_dim, Eigen::OuterStride<>(h.kv_stride));
    s.scores.resize(rows, nk);
    s.scores.noalias() = s.query * k.transpose();
    for (Index r = 0; r < rows; ++r) {
      const Index valid = std::min(nk, first + r % n - j0 + 1);
      if (valid <= 0) continue;
      auto row = s.scores.row(r).head(valid);
      const Scalar new_max = std::max(row_max(r), row.maxCoeff());
      row_sum(r) = row_sum(r) * std::exp(row_max(r) - new_max) + (row.array() - new_max).exp().sum();
      row_max(r) = new_max;
    }
  }
  for (Index q = 0; q < h.heads; ++q)
    for (Index i = 0; i < n; ++i)
      h.lse[(first + i) * h.lse_stride + q] = row_max(q * n + i) + std::log(row_sum(q * n + i));
}

// Every gradient of one entry.
template <class Scalar>
void attention_backward_entry(const TrainHead<Scalar>& h, Index head_dim, Scalar scale) {
  auto& s = attention_grad_scratch<Scalar>();
  const Index T = h.count;
  s.d_key.setZero(T, head_dim);
  s.d_value.setZero(T, head_dim);
  for (Index first = 0; first < T; first += kTrainQueryTile) {
    const Index n = std::min(kTrainQueryTile, T - first), rows = h.heads * n;
    s.query.resize(rows, head_dim);
    s.d_out.resize(rows, head_dim);
    stack_heads(h.query, h.query_stride, h.heads, head_dim, first, n, s.query);
    s.query *= scale;
    stack_heads(h.d_out, h.out_stride, h.heads, head_dim, first, n, s.d_out);
    s.lse.resize(rows);
    s.delta.resize(rows);
    for (Index q = 0; q < h.heads; ++q)
      for (Index i = 0; i < n; ++i) {
        const Index r = q * n + i;
        s.lse(r) = h.lse[(first + i) * h.lse_stride + q];
        const ConstStrided<Scalar> o(h.out + (first + i) * h.out_stride + q * head_dim, 1, head_dim,
                                     Eigen::OuterStride<>(h.out_stride));
        s.delta(r) = s.d_out.row(r).dot(o.row(0));
      }
    s.d_query.setZero(rows, head_dim);
    const Index keys = first + n;
    for (Index j0 = 0; j0 < keys; j0 += kTrainKeyTile) {
      const Index nk = std::min(kTrainKeyTile, keys - j0);
      const ConstStrided<Scalar> k(h.key + j0 * h.kv_stride, nk, head_dim, Eigen::OuterStride<>(h.kv_stride));
      const ConstStrided<Scalar> v(h.value + j0 * h.kv_stride, nk, head_dim, Eigen::OuterStride<>(h.kv_stride));
      s.scores.resize(rows, nk);
      s.scores.noalias() = s.query * k.transpose();
      for (Index r = 0; r < rows; ++r) {
        const Index valid = std::max<Index>(0, std::min(nk, first + r % n - j0 + 1));
        auto row = s.scores.row(r);
        row.head(valid) = (row.head(valid).array() - s.lse(r)).exp();
        row.tail(nk - valid).setZero();
      }
      s.d_value.middleRows(j0, nk).noalias() += s.scores.transpose() * s.d_out;
      s.d_scores.resize(rows, nk);
      s.d_scores.noalias() = s.d_out * v.transpose();
      s.d_scores.array() = s.scores.array() * (s.d_scores.array().colwise() - s.delta.array());
      s.d_query.noalias() += s.d_scores * k;
      s.d_key.middleRows(j0, nk).noalias() += s.d_scores.transpose() * s.query;
    }
    for (Index q = 0; q < h.heads; ++q)
      StridedMatrixMap<Scalar>(h.d_query + first * h.query_stride + q * head_dim, n, head_dim,
                               Eigen::OuterStride<>(h.query_stride)) = s.d_query.middleRows(q * n, n) * scale;
  }
  StridedMatrixMap<Scalar>(h.d_key, T, head_dim, Eigen::OuterStride<>(h.d_kv_stride)) = s.d_key;
  StridedMatrixMap<Scalar>(h.d_value, T, head_dim, Eigen::OuterStride<>(h.d_kv_stride)) = s.d_value;
}

}  // namespace detail

// Forward: out (the library's causal_attention) and lse of every entry. scale multiplies the scores.
template <class Scalar>
void attention_forward(const std::vector<TrainHead<Scalar>>& entries, Index head_dim, Scalar scale) {
  std::vector<AttentionHead<Scalar>> heads;
  heads.reserve(entries.size());
  Index max_tiles = 0;
  double flops = 0;
  for (const auto& e : entries) {
    AttentionHead<Scalar> a;
    a.query = e.query;
    a.query_stride = e.query_stride;
    a.key = e.key;
    a.value = e.value;
    a.kv_stride = e.kv_stride;
    a.out = e.out;
    a.out_stride = e.out_stride;
    a.past = 0;
    a.count = e.count;
    a.heads = e.heads;
    heads.push_back(a);
    max_tiles = std::max(max_tiles, (e.count + detail::kTrainQueryTile - 1) / detail::kTrainQueryTile);
    flops += 2.0 * static_cast<double>(e.heads * head_dim) * static_cast<double>(e.count) * static_cast<double>(e.count);
  }
  causal_attention(heads, head_dim, scale);
  const Index num = static_cast<Index>(entries.size());
  thread_pool().parallel_for(num * max_tiles, [&](Index unit) {
    const auto& e = entries[static_cast<std::size_t>(unit % num)];
    const Index first = (max_tiles - 1 - unit / num) * detail::kTrainQueryTile;  // long tiles first
    if (first >= e.count) return;
    detail::lse_tile(e, head_dim, scale, first, std::min(detail::kTrainQueryTile, e.count - first));
  }, flops);
}

// Backward: d_query, d_key and d_value of every entry (overwritten) from d_out and the forward's
// query, key, value, out and lse. Entries must not share d_key / d_value rows.
template <class Scalar>
void attention_backward(const std::vector<TrainHead<Scalar>>& entries, Index head_dim, Scalar scale) {
  double flops = 0;
  for (const auto& e : entries)
    flops += 5.0 * static_cast<double>(e.heads * head_dim) * static_cast<double>(e.count) * static_cast<double>(e.count);
  thread_pool().parallel_for(static_cast<Index>(entries.size()), [&](Index unit) {
    detail::attention_backward_entry(entries[static_cast<std::size_t>(unit)], head_dim, scale);
  }, flops);
}

}  // namespace gqe::training
