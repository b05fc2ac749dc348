#pragma once
// One layer's KV cache: exactly GQA's G heads per token, plus, for GQE's shared head, the derived
// per-position mean over groups of K and V (2*d_h per token) so that decode never re-averages.
//
// Positions are kept in tiles of kKeyTile, the attention kernel's key blocks, each head's K
// transposed [d_h][KT] and V [KT][d_h], so that the kernel reads both in place. Tiles are
// allocated as positions arrive (never sized by max_position_embeddings, never copied when the
// cache grows, never zero-filled: a tile's positions are written before they are read). The tiles
// of one reserve() share one block, which from 2 MB on is backed by huge pages: a long prompt's
// cache costs a few page faults instead of one per 4 KB.
//
// Writing and committing are separate: a forward writes its new positions past length(), and
// length() moves only once the whole forward has succeeded (Transformer commits, or rolls back).
#include <algorithm>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/layers/attention_config.hpp"
#include "gqe/ops/attention.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/aligned_bytes.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

template <class Scalar>
class AttentionCache {
 public:
  AttentionCache() = default;
  explicit AttentionCache(const AttentionConfig& config)
      : kv_heads_(config.num_kv_heads), head_dim_(config.head_dim), with_mean_(config.has_shared_head()) {}
  AttentionCache(const AttentionCache& other)
      : kv_heads_(other.kv_heads_), head_dim_(other.head_dim_), with_mean_(other.with_mean_) {
    reserve(other.capacity());
    const auto filled = static_cast<std::size_t>(other.length_);
    for (std::size_t t = 0; t * kKeyTile < filled; ++t)  // the tiles that hold positions
      std::copy_n(other.tiles_[t], tile_size(), tiles_[t]);
    length_ = other.length_;
  }
  AttentionCache& operator=(const AttentionCache& other) {
    if (this != &other) *this = AttentionCache(other);
    return *this;
  }
  AttentionCache(AttentionCache&&) noexcept = default;
  AttentionCache& operator=(AttentionCache&&) noexcept = default;

  Index length() const { return length_; }
  // Positions the allocated tiles hold.
  Index capacity() const { return static_cast<Index>(tiles_.size()) * kKeyTile; }
  Index kv_heads() const { return kv_heads_; }
  Index head_dim() const { return head_dim_; }
  bool has_mean() const { return with_mean_; }
  // Bytes of the allocated tiles.
  std::size_t bytes() const { return tiles_.size() * static_cast<std::size_t>(tile_size()) * sizeof(Scalar); }

  // Allocates tiles until positions [0, positions) fit, so that decode up to there allocates nothing.
  void reserve(Index positions) {
    if (positions <= capacity()) return;
    const Index missing = (positions - capacity() - 1) / kKeyTile + 1;  // no overflow near Index's maximum
    const auto tile_bytes = static_cast<std::size_t>(tile_size()) * sizeof(Scalar);
    if (tile_bytes > 0 && static_cast<std::size_t>(missing) > std::numeric_limits<std::size_t>::max() / tile_bytes)
      throw std::bad_alloc();
    blocks_.push_back(detail::AlignedBytes::allocate(static_cast<std::size_t>(missing) * tile_bytes));  // uninitialised
    for (Index t = 0; t < missing; ++t) {
      tiles_.push_back(reinterpret_cast<Scalar*>(blocks_.back().get() + static_cast<std::size_t>(t) * tile_bytes));
      tile_pointers_.push_back(tiles_.back());
    }
  }
  // Forgets every position (keeps the tiles).
  void clear() { length_ = 0; }
  // Commits `count` written positions past length().
  void advance(Index count) {
    if (count < 0 || count > capacity() - length_)
      fail<InputError>("cannot commit ", count, " positions to an attention cache of ", length_, " with room for ", capacity(),
                       "; expected 0 to ", capacity() - length_, " (written positions)");
    length_ += count;
  }
  // Forgets the positions from `length` on (a rolled-back forward).
  void truncate(Index length) {
    if (length < 0 || length > length_)
      fail<InputError>("cannot truncate an attention cache of ", length_, " positions to ", length, "; expected 0 to ", length_);
    length_ = length;
  }

  // Writes positions [pos, pos + count) (at or past length(), within capacity()) from rows of key
  // and value [count, G*d_h] (row stride `stride`) after RoPE, and, when the cache keeps it, their
  // mean over the groups. Tiles are written in parallel: each is one unit of the library's pool.
  void write(Index pos, Index count, const Scalar* key, const Scalar* value, Index stride) {
    assert(pos >= length_ && pos + count <= capacity() && count >= 0);
    if (count <= 0) return;
    const Index first_tile = pos / kKeyTile, tiles = (pos + count - 1) / kKeyTile - first_tile + 1;
    const double copied = 2.0 * static_cast<double>(count) * static_cast<double>(tile_size() / kKeyTile);  // elements: the work
    thread_pool().parallel_for(tiles, [&](Index unit) {
      const Index t = first_tile + unit;
      const Index begin = std::max(pos, t * kKeyTile), end = std::min(pos + count, (t + 1) * kKeyTile);
      for (Index run = begin; run < end; run += kRun)
        write_run(run, std::min(kRun, end - run), key + (run - pos) * stride, value + (run - pos) * stride, stride);
    }, copied);
  }
  // One position: key and value [G*d_h].
  void write(Index pos, const Scalar* key, const Scalar* value) { write(pos, 1, key, value, 0); }

  // KV head g (0 .. G-1), or the mean over groups (g == G, when kept), for the attention kernel.
  KeyValueTiles<Scalar> head(Index g) const {
    assert(g >= 0 && g < kv_heads_ + (with_mean_ ? 1 : 0));
    return {tile_pointers_.data(), g * head_size(), g * head_size() + head_dim_ * kKeyTile};
  }

  // The key (after RoPE) and value of KV head g at position pos, into key[d_h] and value[d_h]; g ==
  // G reads the mean over the groups, when the cache keeps it. Positions written but not yet
  // committed (length() to capacity()) read as well.
  void read(Index g, Index pos, Scalar* key, Scalar* value) const {
    const Index heads = kv_heads_ + (with_mean_ ? 1 : 0);
    if (g < 0 || g >= heads || pos < 0 || pos >= capacity())
      fail<InputError>("no KV head ", g, " at position ", pos, " in this cache; expected a head 0 to ", heads - 1,
                       " and a position 0 to ", capacity() - 1);
    const Scalar* tile = tiles_[static_cast<std::size_t>(pos / kKeyTile)] + g * head_size();
    const Index slot = pos % kKeyTile;
    for (Index c = 0; c < head_dim_; ++c) key[c] = tile[c * kKeyTile + slot];
    std::copy_n(tile + head_dim_ * kKeyTile + slot * head_dim_, head_dim_, value);
  }

 private:
  Index head_size() const { return 2 * head_dim_ * kKeyTile; }
  Index tile_size() const { return (kv_heads_ + (with_mean_ ? 1 : 0)) * head_size(); }
  // Positions written together: one cache line of K^T per channel, so that the transpose writes
  // whole lines instead of one element of 16 lines per position.
  static constexpr Index kRun = 16;

  // n <= kRun positions from pos on (one tile): rows of key and value [n, G*d_h], row stride `stride`.
  void write_run(Index pos, Index n, const Scalar* key, const Scalar* value, Index stride) {
    const Index dh = head_dim_, slot = pos % kKeyTile;
    Scalar* tile = tiles_[static_cast<std::size_t>(pos / kKeyTile)];
    for (Index g = 0; g < kv_heads_; ++g) write_head(tile, g, slot, n, key + g * dh, value + g * dh, stride);
    if (!with_mean_) return;
    thread_local std::vector<Scalar> mean_rows;  // [n, d_h] of K, then of V
    mean_rows.resize(static_cast<std::size_t>(2 * n * dh));
    Scalar* mean = mean_rows.data();
    // Position i's channels side by side (a vector loop), each summed over the groups in order: the
    // same sum for every position.
    for (Index i = 0; i < n; ++i) {
      Scalar* sk = mean + i * dh;
      Scalar* sv = mean + (n + i) * dh;
      std::fill_n(sk, dh, Scalar(0));
      std::fill_n(sv, dh, Scalar(0));
      for (Index g = 0; g < kv_heads_; ++g)
        for (Index c = 0; c < dh; ++c) {
          sk[c] += key[i * stride + g * dh + c];
          sv[c] += value[i * stride + g * dh + c];
        }
      for (Index c = 0; c < dh; ++c) {
        sk[c] /= Scalar(kv_heads_);
        sv[c] /= Scalar(kv_heads_);
      }
    }
    write_head(tile, kv_heads_, slot, n, mean, mean + n * dh, dh);
  }
  // Head h's K^T [d_h][KT] and V [KT][d_h] at slots [slot, slot + n) from rows of key and value.
  void write_head(Scalar* tile, Index h, Index slot, Index n, const Scalar* key, const Scalar* value, Index stride) {
    Scalar* block = tile + h * head_size();
    for (Index c = 0; c < head_dim_; ++c)
      for (Index i = 0; i < n; ++i) block[c * kKeyTile + slot + i] = key[i * stride + c];
    for (Index i = 0; i < n; ++i) std::copy_n(value + i * stride, head_dim_, block + head_dim_ * kKeyTile + (slot + i) * head_dim_);
  }

  Index kv_heads_ = 0, head_dim_ = 0;
  bool with_mean_ = false;
  Index length_ = 0;
  std::vector<detail::AlignedBytes::Pointer> blocks_;  // the tiles' storage
  std::vector<Scalar*> tiles_;                                        // [capacity / KT]
  std::vector<const Scalar*> tile_pointers_;                          // tiles_, as the kernel reads them
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
