#pragma once
// Writing a file so that no half-written file ever stands under its final name: the bytes go to a
// temporary file in the same folder, which is renamed over the target only once complete.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <system_error>

#include "gqe/error.hpp"

namespace gqe {

// Calls write(std::ostream&) on a temporary file beside `path`, then renames it to `path`. On any
// failure the temporary file is removed, the target is left as it was, and IoError is thrown.
template <class Writer>
void write_file_atomically(const std::filesystem::path& path, Writer&& write) {
  namespace fs = std::filesystem;
  const fs::path folder = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) fail<IoError>("cannot write ", path.string(), ": folder ", folder.string(), " does not exist");
  if (fs::is_directory(path, ec)) fail<IoError>("cannot write ", path.string(), ": it is a folder; expected a file path");
  std::random_device entropy;
  const fs::path temp = folder / ("." + path.filename().string() + ".tmp" + std::to_string(entropy()));
  try {
    {
      std::ofstream out(temp, std::ios::binary | std::ios::trunc);
      if (!out) fail<IoError>("cannot write ", path.string(), ": cannot create a file in ", folder.string());
      write(out);
      out.flush();
      if (!out) fail<IoError>("cannot write ", path.string(), ": write failed (disk full?)");
    }
    fs::rename(temp, path, ec);
    if (ec) fail<IoError>("cannot write ", path.string(), ": ", ec.message());
  } catch (...) {
    fs::remove(temp, ec);
    throw;
  }
}

}  // namespace gqe
