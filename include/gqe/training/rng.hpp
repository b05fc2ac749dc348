#pragma once
// A small seeded generator for training (initialisation, data, shuffling) whose output is fixed by
// its seed on every platform: SplitMix64 to spread the seed, xoshiro256** to draw. No std::
// distribution is used, since their output is implementation-defined. Its whole state is four
// words, so that a run's data stream can be re-derived from (seed, step) alone.
#include <cmath>
#include <cstdint>

namespace gqe::training {

// One step of SplitMix64: a good 64-bit mix of x (used to derive independent streams).
inline std::uint64_t splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A seed for stream `stream` of item `index` under `seed`: distinct arguments give unrelated streams.
inline std::uint64_t derive_seed(std::uint64_t seed, std::uint64_t stream, std::uint64_t index = 0) {
  std::uint64_t x = seed;
  std::uint64_t a = splitmix64(x) ^ (stream * 0xd1b54a32d192ed03ull);
  std::uint64_t y = a;
  std::uint64_t b = splitmix64(y) ^ (index * 0x8cb92ba72f3d8dd7ull);
  return splitmix64(b);
}

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) {
    std::uint64_t x = seed;
    for (auto& s : state_) s = splitmix64(x);
  }

  std::uint64_t next() {
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }
  // Uniform in [0, 1), 53 bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Uniform integer in [0, n), n >= 1, without bias (draws below 2^64 mod n are rejected).
  std::uint64_t below(std::uint64_t n) {
    const std::uint64_t threshold = (0 - n) % n;
    for (;;) {
      const std::uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }
  // Standard normal (Box-Muller; one value per call, the pair's second is dropped for simplicity).
  double normal() {
    double u1 = uniform();
    while (u1 <= 0) u1 = uniform();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t state_[4];
};

}  // namespace gqe::training
