#pragma once
// Writing a file so that no half-written file ever stands under its final name: the bytes go to a
// temporary file in the same folder (a rename across file systems would not be atomic), which is
// flushed to disk and renamed over the target only once complete.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <system_error>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#endif

#include "gqe/error.hpp"

namespace gqe {
namespace detail {
// Asks the OS to put the file's bytes on disk before the rename publishes it; otherwise a crash
// soon after could leave an empty file under the final name on some file systems.
inline bool sync_to_disk(const std::filesystem::path& file) {
#if defined(__unix__) || defined(__APPLE__)
  const int fd = ::open(file.c_str(), O_RDONLY);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
#else
  (void)file;
  return true;
#endif
}
}  // namespace detail

// Calls write(std::ostream&) on a temporary file beside `path`, then renames it to `path`. On any
// failure the temporary file is removed, the target is left as it was, and the error propagates
// (IoError for the file system's own failures).
template <class Writer>
void write_file_atomically(const std::filesystem::path& path, Writer&& write) {
  namespace fs = std::filesystem;
  const fs::path folder = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(folder, ec))
    fail<IoError>("cannot write ", path.string(), ": folder ", folder.string(), " does not exist");
  if (fs::is_directory(path, ec)) fail<IoError>("cannot write ", path.string(), ": it is a folder; expected a file path");
  std::random_device entropy;
  const fs::path temp = folder / ("." + path.filename().string() + ".tmp" + std::to_string(entropy()));
  try {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out) fail<IoError>("cannot write ", path.string(), ": cannot create a file in ", folder.string());
    write(static_cast<std::ostream&>(out));
    out.close();  // closing flushes: a full disk shows here
    if (!out) fail<IoError>("cannot write ", path.string(), ": write failed (disk full?)");
    if (!detail::sync_to_disk(temp)) fail<IoError>("cannot write ", path.string(), ": flushing to disk failed");
    fs::rename(temp, path, ec);
    if (ec) fail<IoError>("cannot write ", path.string(), ": ", ec.message());
  } catch (...) {
    fs::remove(temp, ec);
    throw;
  }
}

}  // namespace gqe
