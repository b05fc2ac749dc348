#pragma once
// The KV cache of one sequence: one AttentionCache per layer, all of the same length.
#include <vector>

#include "gqe/error.hpp"
#include "gqe/layers/attention_cache.hpp"
#include "gqe/model/config.hpp"

namespace gqe {

template <class Scalar>
class KVCache {
 public:
  KVCache() = default;
  explicit KVCache(const ModelConfig& config)
      : config_(config), layers_(layer_count(config), AttentionCache<Scalar>(config.attention())) {}

  // The configuration of the model the cache was made for (its K carry that model's RoPE).
  const ModelConfig& config() const { return config_; }

  // Positions cached so far (the next token's position). Every layer holds as many: a forward that
  // fails part-way leaves them all where they were.
  Index length() const { return layers_.empty() ? 0 : layers_.front().length(); }
  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  // Allocates room for `positions` tokens at once, so that decode up to there allocates nothing.
  void reserve(Index positions) {
    for (auto& l : layers_) l.reserve(positions);
  }
  void clear() {
    for (auto& l : layers_) l.clear();
  }
  // Forgets the positions from `length` on, in every layer (a length past length() keeps them all).
  void truncate(Index length) {
    if (length < 0) fail<InputError>("cannot truncate a KV cache to ", length, " positions; expected 0 or more");
    for (auto& l : layers_) l.truncate(std::min(length, l.length()));
  }
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& l : layers_) n += l.bytes();
    return n;
  }
  AttentionCache<Scalar>& layer(Index i) { return layers_[checked_layer(i)]; }
  const AttentionCache<Scalar>& layer(Index i) const { return layers_[checked_layer(i)]; }

 private:
  static std::size_t layer_count(const ModelConfig& config) {
    config.validate();
    return static_cast<std::size_t>(config.num_layers);
  }
  std::size_t checked_layer(Index i) const {
    if (i < 0 || i >= num_layers()) fail<InputError>("KV cache layer ", i, " does not exist; expected 0 to ", num_layers() - 1);
    return static_cast<std::size_t>(i);
  }

  ModelConfig config_;
  std::vector<AttentionCache<Scalar>> layers_;
};

}  // namespace gqe
