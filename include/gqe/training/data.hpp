#pragma once
// Training data: multi-query associative recall (MQAR, as in the Zoology benchmark) generated on
// the fly, and byte-level language modelling on a text file with a held-out tail.
//
// Every batch is a pure function of (seed, index): a run can be resumed at any step without saving
// a generator's state, and two models trained with the same seed see the same tokens.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/io/read_file.hpp"
#include "gqe/layers/attention_config.hpp"
#include "gqe/training/loss.hpp"
#include "gqe/training/rng.hpp"

namespace gqe::training {

// MQAR: `num_pairs` key-value pairs k1 v1 k2 v2 ..., then a query region of blanks (token 0) in
// which every key of the context appears once, at distinct random positions, in random order. The
// model must answer each queried key with its value at that position: the loss and the accuracy
// count those positions only. Keys are drawn without replacement from ids [1, 1 + K) and values
// with replacement from [1 + K, V), K = (V - 1) / 2.
struct MqarConfig {
  Index vocab_size = 128;
  Index seq_len = 128;
  Index num_pairs = 16;

  Index num_keys() const { return (vocab_size - 1) / 2; }
  Index num_values() const { return vocab_size - 1 - num_keys(); }
  void validate() const {
    if (vocab_size < 5 || vocab_size > (1 << 20))
      fail<ConfigError>("MQAR vocabulary is ", vocab_size, " tokens; expected 5 to ", 1 << 20);
    if (num_pairs < 1 || num_pairs > num_keys())
      fail<ConfigError>("MQAR key-value pairs are ", num_pairs, "; expected 1 to ", num_keys(),
                        " (the distinct keys of a vocabulary of ", vocab_size, ")");
    if (seq_len < 3 * num_pairs || seq_len > Limits::max_positions)
      fail<ConfigError>("MQAR sequence length is ", seq_len, "; expected at least 3 x ", num_pairs, " pairs = ", 3 * num_pairs,
                        " (the context, then a query per key) and at most ", Limits::max_positions);
  }
};

// Fills sequence b of `out` (already sized) with one MQAR example drawn from rng.
inline void mqar_example(const MqarConfig& c, Rng& rng, Batch& out, Index b) {
  const Index T = out.seq_len, P = c.num_pairs, K = c.num_keys();
  const auto at = [&](Index t) { return static_cast<std::size_t>(b * T + t); };
  std::vector<std::int32_t> keys(static_cast<std::size_t>(K));
  for (Index i = 0; i < K; ++i) keys[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(1 + i);
  for (Index i = 0; i < P; ++i)  // partial Fisher-Yates: the first P are a random draw
    std::swap(keys[static_cast<std::size_t>(i)], keys[static_cast<std::size_t>(i + static_cast<Index>(rng.below(static_cast<std::uint64_t>(K - i))))]);
  std::vector<std::int32_t> values(static_cast<std::size_t>(P));
  for (auto& v : values) v = static_cast<std::int32_t>(1 + K + static_cast<Index>(rng.below(static_cast<std::uint64_t>(c.num_values()))));
  for (Index t = 0; t < T; ++t) {
    out.tokens[at(t)] = 0;
    out.targets[at(t)] = 0;
    out.weights[at(t)] = 0.0f;
  }
  for (Index i = 0; i < P; ++i) {
    out.tokens[at(2 * i)] = keys[static_cast<std::size_t>(i)];
    out.tokens[at(2 * i + 1)] = values[static_cast<std::size_t>(i)];
  }
  // P distinct query positions in [2P, T), and a random order of the keys.
  std::vector<Index> slots(static_cast<std::size_t>(T - 2 * P));
  for (std::size_t i = 0; i < slots.size(); ++i) slots[i] = 2 * P + static_cast<Index>(i);
  for (Index i = 0; i < P; ++i)
    std::swap(slots[static_cast<std::size_t>(i)],
              slots[static_cast<std::size_t>(i + static_cast<Index>(rng.below(slots.size() - static_cast<std::size_t>(i))))]);
  std::vector<Index> order(static_cast<std::size_t>(P));
  for (Index i = 0; i < P; ++i) order[static_cast<std::size_t>(i)] = i;
  for (Index i = P - 1; i > 0; --i)
    std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(rng.below(static_cast<std::uint64_t>(i + 1)))]);
  for (Index i = 0; i < P; ++i) {
    const Index pos = slots[static_cast<std::size_t>(i)], pair = order[static_cast<std::size_t>(i)];
    out.tokens[at(pos)] = keys[static_cast<std::size_t>(pair)];
    out.targets[at(pos)] = values[static_cast<std::size_t>(pair)];
    out.weights[at(pos)] = 1.0f;
  }
}

// Batch `index` of the stream `seed`: B examples of c.seq_len tokens.
inline void mqar_batch(const MqarConfig& c, Index B, std::uint64_t seed, std::uint64_t index, Batch& out) {
  c.validate();
  if (B < 1) fail<ConfigError>("batch size is ", B, "; expected at least 1");
  out.resize(B, c.seq_len);
  Rng rng(derive_seed(seed, 0x3a9, index));
  for (Index b = 0; b < B; ++b) mqar_example(c, rng, out, b);
}

// Byte-level language modelling on a text file: token ids are bytes; the last `heldout_fraction`
// of the file is held out for evaluation. Training windows start at random offsets of the head;
// held-out windows tile the tail in order.
class TextData {
 public:
  static void check_heldout_fraction(double heldout_fraction) {
    if (!(heldout_fraction > 0 && heldout_fraction < 1))
      fail<ConfigError>("held-out fraction is ", heldout_fraction, "; expected a number in (0, 1)");
  }

  TextData() = default;
  TextData(const std::filesystem::path& path, Index seq_len, double heldout_fraction = 0.1) : seq_len_(seq_len) {
    if (seq_len < 1) fail<ConfigError>("sequence length is ", seq_len, "; expected at least 1");
    check_heldout_fraction(heldout_fraction);
    bytes_ = read_whole_file(path, "a text file");
    const auto size = static_cast<Index>(bytes_.size());
    split_ = size - tail_bytes(size, heldout_fraction);
    const Index need = seq_len + 1;
    if (split_ < need || size - split_ < need)
      fail<InputError>("text file ", path.string(), " has ", size, " bytes; with sequence length ", seq_len,
                       " and a held-out tail of ", heldout_fraction * 100, "% it needs at least ",
                       least_size(need, heldout_fraction), " bytes");
    source_ = path.string();
  }

  Index size() const { return static_cast<Index>(bytes_.size()); }
  Index train_bytes() const { return split_; }
  Index heldout_bytes() const { return size() - split_; }
  // Held-out windows of seq_len + 1 bytes that fit in the tail (non-overlapping).
  Index heldout_windows() const {
    require_text();
    return (heldout_bytes() - 1) / seq_len_;
  }

  // Training batch `index` of stream `seed`: B windows at random offsets of the training head.
  void train_batch(Index B, std::uint64_t seed, std::uint64_t index, Batch& out) const {
    if (B < 1) fail<ConfigError>("batch size is ", B, "; expected at least 1");
    require_text();
    out.resize(B, seq_len_);
    Rng rng(derive_seed(seed, 0x7e47, index));
    for (Index b = 0; b < B; ++b) window(static_cast<Index>(rng.below(static_cast<std::uint64_t>(split_ - seq_len_))), out, b);
  }
  // Held-out windows [first, first + B) (wrapping around the tail).
  void heldout_batch(Index B, Index first, Batch& out) const {
    if (B < 1) fail<ConfigError>("batch size is ", B, "; expected at least 1");
    if (first < 0) fail<InputError>("first held-out window is ", first, "; expected 0 or more");
    require_text();
    out.resize(B, seq_len_);
    const Index windows = heldout_windows();
    for (Index b = 0; b < B; ++b) window(split_ + ((first + b) % windows) * seq_len_, out, b);
  }

 private:
  static Index tail_bytes(Index size, double heldout_fraction) {
    return static_cast<Index>(static_cast<double>(size) * heldout_fraction);
  }
  // The smallest file whose head and held-out tail both hold `need` bytes.
  static Index least_size(Index need, double heldout_fraction) {
    const double n = static_cast<double>(need);
    auto size = static_cast<Index>(std::ceil(std::max(n / heldout_fraction, n / (1 - heldout_fraction))));
    while (tail_bytes(size, heldout_fraction) < need || size - tail_bytes(size, heldout_fraction) < need)
      ++size;  // past the rounding of the products above
    return size;
  }

  // A default-constructed TextData holds no text to draw windows from.
  void require_text() const {
    if (seq_len_ < 1) fail<InputError>("this TextData holds no text; expected one built from a text and a sequence length");
  }

  void window(Index offset, Batch& out, Index b) const {
    for (Index t = 0; t < seq_len_; ++t) {
      const auto i = static_cast<std::size_t>(b * seq_len_ + t);
      out.tokens[i] = static_cast<unsigned char>(bytes_[static_cast<std::size_t>(offset + t)]);
      out.targets[i] = static_cast<unsigned char>(bytes_[static_cast<std::size_t>(offset + t + 1)]);
      out.weights[i] = 1.0f;
    }
  }

  std::string bytes_, source_;
  Index seq_len_ = 0, split_ = 0;
};

}  // namespace gqe::training
