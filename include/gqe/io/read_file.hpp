#pragma once
// Reading a whole file at once (a config, a training state, a text): the checks and messages that
// every such reader needs, in one place.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>

#include "gqe/error.hpp"

namespace gqe {

// The bytes of the file at path. IoError when it is missing, not a regular file or unreadable;
// FormatError when it is longer than max_bytes (refused before it is read). `expected` names what
// the file should be, for the messages.
inline std::string read_whole_file(const std::filesystem::path& path, const std::string& expected,
                                   std::uintmax_t max_bytes = UINTMAX_MAX) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    fail<IoError>(path.string(), " does not exist or is not a file; expected ", expected);
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) fail<IoError>("cannot read the size of ", path.string(), ": ", ec.message());
  if (size > max_bytes)
    fail<FormatError>(path.string(), " is ", size, " bytes long; expected ", expected, " of at most ", max_bytes);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<IoError>("cannot open ", path.string());
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) fail<IoError>("cannot read ", path.string());
  return text.str();
}

}  // namespace gqe
