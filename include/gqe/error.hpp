#pragma once
// One error type for everything a user or a file can get wrong. Each throw names the thing, the
// value and what was expected, so that a CLI can print e.what() as its one line (control characters
// in it are escaped).
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace gqe {

namespace detail {
// The message with its control characters written as \xNN: a path or a name from a file that holds
// a newline or an escape sequence must neither break the one line nor drive the terminal.
inline std::string one_line(const std::string& text) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15u];
    } else {
      out += ch;
    }
  }
  return out;
}
}  // namespace detail

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(detail::one_line(what)) {}
  explicit Error(const char* what) : Error(std::string(what)) {}
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
