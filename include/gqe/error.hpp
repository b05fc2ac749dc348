#pragma once
// One error type for everything a user or a file can get wrong. Each throw names the thing, the
// value and what was expected, so that a CLI can print e.what() as its one line.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace gqe {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A configuration value out of its domain (sizes, k, variant names, sampler settings).
class ConfigError : public Error {
 public:
  using Error::Error;
};
// A tensor whose shape disagrees with what the callee or the config expects.
class ShapeError : public Error {
 public:
  using Error::Error;
};
// A malformed file: safetensors, config.json, checkpoint contents.
class FormatError : public Error {
 public:
  using Error::Error;
};
// A file that cannot be opened, read, written or renamed.
class IoError : public Error {
 public:
  using Error::Error;
};
// A run-time input out of range: token ids, positions, cache capacity, non-finite values.
class InputError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

// Throws E with the concatenation of the parts: fail<ConfigError>("head_dim is ", h, "; expected ...").
template <class E, class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw E(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace gqe
