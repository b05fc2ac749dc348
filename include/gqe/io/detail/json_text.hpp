#pragma once
// What the io headers say about JSON they did not write: error messages quote names and values
// from a file, and must stay one short line (a CLI prints e.what() as its one line on stderr)
// however long, nested or full of control characters the file's text is.
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/io/read_file.hpp"

namespace gqe::detail {

// s with control characters escaped and cut after max_bytes (at a UTF-8 character boundary).
inline std::string printable(const std::string& s, std::size_t max_bytes = 120) {
  std::size_t n = s.size();
  if (n > max_bytes) {
    n = max_bytes;
    while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xc0u) == 0x80u) --n;  // not inside a character
  }
  std::string out;
  static const char* hex = "0123456789abcdef";
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15u];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (n < s.size()) out += "...";
  return out;
}

// A JSON value as a message shows it: scalars and short flat arrays as JSON, anything larger by its
// kind and size. Never recursive: a hostile file may nest values millions deep.
inline std::string describe_json(const nlohmann::json& v) {
  if (v.is_string()) return "\"" + printable(v.get_ref<const std::string&>(), 60) + "\"";
  if (v.is_array()) {
    bool flat = v.size() <= 8;
    for (const auto& e : v) flat = flat && e.is_primitive();
    if (!flat) return "an array of " + std::to_string(v.size()) + " values";
    std::string out = "[";
    for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + describe_json(v[i]);
    return out + "]";
  }
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " keys";
  if (v.is_binary()) return "binary data";
  return v.dump();  // number, boolean or null
}

// Refuses text that nlohmann's parser would read as JSON though it is not: the parser stops at a
// NUL byte (so anything after one would go unread) and skips a leading UTF-8 byte-order mark.
// Python's and Rust's JSON readers refuse both, and a file must not say one thing to gqe and
// another to the tools that wrote it. `what` names the text ("config.json", "x: the header").
inline void require_plain_json(const char* text, std::size_t size, const std::string& what) {
  if (size >= 3 && static_cast<unsigned char>(text[0]) == 0xef && static_cast<unsigned char>(text[1]) == 0xbb &&
      static_cast<unsigned char>(text[2]) == 0xbf)
    fail<FormatError>(what, " is not valid JSON (it begins with a UTF-8 byte-order mark; expected the JSON text itself)");
  if (const void* nul = std::memchr(text, 0, size))
    fail<FormatError>(what, " is not valid JSON (byte ", static_cast<const char*>(nul) - text,
                      " is NUL; JSON text holds none, not even as padding)");
}

// Parses text, refusing a key that appears twice in one object (of the top `depth` levels, those
// gqe reads): nlohmann would keep the last one silently, so a file could say two things and be read
// as one. `source` names the file.
inline nlohmann::json parse_json_unique_keys(const std::string& text, const std::string& source, int depth = 1) {
  std::vector<std::set<std::string>> open;  // the keys seen so far in each object being parsed
  const nlohmann::json::parser_callback_t check = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start) open.emplace_back();
    if (event == Event::object_end && !open.empty()) open.pop_back();
    if (event == Event::key && !open.empty() && static_cast<int>(open.size()) <= depth &&
        !open.back().insert(parsed.get_ref<const std::string&>()).second)
      fail<FormatError>(source, " names \"", printable(parsed.get_ref<const std::string&>()), "\" twice; expected each key once");
    return true;
  };
  require_plain_json(text.data(), text.size(), source);
  try {
    return nlohmann::json::parse(text, check);
  } catch (const nlohmann::json::exception& e) {
    fail<FormatError>(source, " is not valid JSON (", printable(e.what(), 200), ")");
  }
}

// The JSON of a file gqe reads whole (a config, a training state), parsed as above. `expected`
// names what the file should be; a file over max_bytes is refused before it is read.
inline nlohmann::json read_json_file(const std::filesystem::path& path, const std::string& expected,
                                     std::uintmax_t max_bytes, int depth = 1) {
  return parse_json_unique_keys(read_whole_file(path, expected, max_bytes), path.string(), depth);
}

}  // namespace gqe::detail
