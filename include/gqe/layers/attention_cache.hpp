#pragma once
// One layer's KV cache: exactly GQA's G heads per token, plus, for GQE's shared head, the derived
// per-position mean over groups of K and V (2*d_h per token) so that decode never re-averages.
#include <algorithm>

#include "gqe/layers/attention_config.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

template <class Scalar>
class AttentionCache {
 public:
  AttentionCache() = default;
  AttentionCache(const AttentionConfig& config)
      : kv_heads_(config.num_kv_heads), head_dim_(config.head_dim), with_mean_(config.has_shared_head()) {}

  Index length() const { return length_; }
  Index capacity() const { return capacity_; }
  Index kv_heads() const { return kv_heads_; }
  Index head_dim() const { return head_dim_; }
  bool has_mean() const { return with_mean_; }

  // Makes room for `capacity` positions, keeping the cached ones. Grows geometrically when asked
  // through ensure(), so that decode allocates only O(log T) times.
  void reserve(Index capacity) {
    if (capacity <= capacity_) return;
    regrow(key_, capacity, kv_heads_);
    regrow(value_, capacity, kv_heads_);
    if (with_mean_) {
      regrow(mean_key_, capacity, 1);
      regrow(mean_value_, capacity, 1);
    }
    capacity_ = capacity;
  }
  void ensure(Index capacity) {
    if (capacity > capacity_) reserve(std::max(capacity, std::max<Index>(64, 2 * capacity_)));
  }
  void clear() { length_ = 0; }
  // Marks `count` more positions as filled (after the caller wrote them).
  void advance(Index count) {
    assert(length_ + count <= capacity_);
    length_ += count;
  }

  // Rows of KV head g: [capacity, d_h], contiguous.
  Scalar* key(Index g) { return key_.data() + g * capacity_ * head_dim_; }
  Scalar* value(Index g) { return value_.data() + g * capacity_ * head_dim_; }
  const Scalar* key(Index g) const { return key_.data() + g * capacity_ * head_dim_; }
  const Scalar* value(Index g) const { return value_.data() + g * capacity_ * head_dim_; }
  Scalar* mean_key() { return mean_key_.data(); }
  Scalar* mean_value() { return mean_value_.data(); }
  const Scalar* mean_key() const { return mean_key_.data(); }
  const Scalar* mean_value() const { return mean_value_.data(); }

 private:
  // Tensor [heads, capacity, d_h]: copy each head's filled rows into the larger buffer.
  void regrow(Tensor<Scalar>& t, Index capacity, Index heads) {
    Tensor<Scalar> grown(Shape{heads, capacity, head_dim_});
    for (Index h = 0; h < heads; ++h)
      std::copy_n(t.data() + h * capacity_ * head_dim_, length_ * head_dim_, grown.data() + h * capacity * head_dim_);
    t = std::move(grown);
  }

  Index kv_heads_ = 0, head_dim_ = 0;
  bool with_mean_ = false;
  Index length_ = 0, capacity_ = 0;
  Tensor<Scalar> key_;         // [G, capacity, d_h], after RoPE
  Tensor<Scalar> value_;       // [G, capacity, d_h]
  Tensor<Scalar> mean_key_;    // [1, capacity, d_h], mean over groups of key_ (shared head only)
  Tensor<Scalar> mean_value_;  // [1, capacity, d_h]
};

// A run of consecutive rows of a layer's input that continue one sequence: rows
// [row_begin, row_begin + count) follow the `cache->length()` positions already cached.
template <class Scalar>
struct Segment {
  AttentionCache<Scalar>* cache = nullptr;
  Index row_begin = 0;
  Index count = 0;
};

}  // namespace gqe
