#pragma once
// The KV cache of one sequence: one AttentionCache per layer, all of the same length.
#include <vector>

#include "gqe/layers/attention_cache.hpp"
#include "gqe/model/config.hpp"

namespace gqe {

template <class Scalar>
class KVCache {
 public:
  KVCache() = default;
  explicit KVCache(const ModelConfig& config) : layers_(static_cast<std::size_t>(config.num_layers),
                                                        AttentionCache<Scalar>(config.attention())) {}

  // Positions cached so far (the next token's position).
  Index length() const { return layers_.empty() ? 0 : layers_.front().length(); }
  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  // Allocates room for `positions` tokens at once, so that decode up to there allocates nothing.
  void reserve(Index positions) {
    for (auto& l : layers_) l.reserve(positions);
  }
  void clear() {
    for (auto& l : layers_) l.clear();
  }
  AttentionCache<Scalar>& layer(Index i) { return layers_[static_cast<std::size_t>(i)]; }
  const AttentionCache<Scalar>& layer(Index i) const { return layers_[static_cast<std::size_t>(i)]; }

 private:
  std::vector<AttentionCache<Scalar>> layers_;
};

}  // namespace gqe
