#pragma once
// Writing a file so that no half-written file ever stands under its final name: the bytes go to a
// temporary file in the same folder (a rename across file systems would not be atomic), which is
// flushed to disk and renamed over the target only once complete.
//
// What is at the path decides how: a regular file (or nothing) is replaced by the rename; a symbolic
// link keeps its place, and the file it points to is replaced; a device, a FIFO or a socket (say
// /dev/null, or a pipe another program reads) is written through as a stream, never renamed over.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <system_error>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/stat.h>
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

// True when something other than a regular file or a folder is at path (after following links).
inline bool is_stream_target(const std::filesystem::path& path) {
#if defined(__unix__) || defined(__APPLE__)
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode);
#else
  (void)path;
  return false;
#endif
}

// The longest file name the folder's file system takes (255 on the usual ones).
inline std::size_t name_limit(const std::filesystem::path& folder) {
#if defined(__unix__) || defined(__APPLE__)
  const long limit = ::pathconf(folder.c_str(), _PC_NAME_MAX);
  if (limit > 0) return static_cast<std::size_t>(limit);
#else
  (void)folder;
#endif
  return 255;
}

// A fresh temporary name beside `name`, never longer than the folder allows: ".<name>.<random>.tmp"
// with <name> cut short (at a UTF-8 character boundary) when the whole would not fit.
inline std::string temporary_name(const std::string& name, std::size_t limit) {
  static const char* hex = "0123456789abcdef";
  std::random_device entropy;
  std::string tag = ".";
  for (int i = 0; i < 4; ++i) {
    const unsigned r = entropy();
    for (int j = 0; j < 4; ++j) tag += hex[(r >> (4 * j)) & 15u];
  }
  tag += ".tmp";
  const std::size_t room = limit > tag.size() + 2 ? limit - tag.size() - 1 : 1;
  std::size_t keep = std::min(name.size(), room);
  while (keep > 0 && keep < name.size() && (static_cast<unsigned char>(name[keep]) & 0xc0u) == 0x80u) --keep;
  return "." + name.substr(0, keep) + tag;
}
// The folder that holds `path` (a bare name's is ".").
inline std::filesystem::path folder_of(const std::filesystem::path& path) {
  return path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
}

// The file a write to `path_given` replaces: the one a symbolic link names, through a chain of
// links and whether it exists yet or not (the link keeps its place, as with a shell's `>`), else
// the path itself.
inline std::filesystem::path replaced_file(const std::filesystem::path& path_given) {
  namespace fs = std::filesystem;
  constexpr int kMaxLinks = 40;  // Linux's limit on the links one path may pass through
  fs::path path = path_given;
  std::error_code ec;
  for (int links = 0; fs::is_symlink(path, ec); ++links) {
    if (links == kMaxLinks)
      fail<IoError>("cannot write ", path_given.string(), ": more than ", kMaxLinks, " symbolic links in a row (a loop?)");
    const fs::path target = fs::read_symlink(path, ec);
    if (ec) fail<IoError>("cannot write ", path_given.string(), ": cannot follow the link (", ec.message(), ")");
    path = target.is_absolute() ? target : folder_of(path) / target;
  }
  return path;
}
}  // namespace detail

// Calls write(std::ostream&) on a temporary file beside `path`, then renames it to `path`. On any
// failure the temporary file is removed, the target is left as it was, and the error propagates
// (IoError for the file system's own failures). A device, FIFO or socket at `path` is written
// through instead (see the file comment): there a failure may leave part of the bytes written.
template <class Writer>
void write_file_atomically(const std::filesystem::path& path_given, Writer&& write) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path_given, ec))
    fail<IoError>("cannot write ", path_given.string(), ": it is a folder; expected a file path");
  if (detail::is_stream_target(path_given)) {
    std::ofstream out(path_given, std::ios::binary);
    if (!out) fail<IoError>("cannot open ", path_given.string(), " for writing: ", std::strerror(errno));
    errno = 0;
    write(static_cast<std::ostream&>(out));
    int error = out ? 0 : errno;  // the stream's first failed write set errno
    if (out) {
      out.close();
      error = out ? 0 : errno;
    }
    if (!out) fail<IoError>("cannot write ", path_given.string(), ": ", error ? std::strerror(error) : "write failed");
    return;
  }
  const fs::path path = detail::replaced_file(path_given), folder = detail::folder_of(path);
  if (!fs::is_directory(folder, ec))
    fail<IoError>("cannot write ", path.string(), ": ", folder.string(), fs::exists(folder, ec) ? " is not a folder" : " does not exist");
  const fs::path temp = folder / detail::temporary_name(path.filename().string(), detail::name_limit(folder));
  try {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out) fail<IoError>("cannot write ", path.string(), ": cannot create a file in ", folder.string(), ": ", std::strerror(errno));
    errno = 0;
    write(static_cast<std::ostream&>(out));
    int error = out ? 0 : errno;  // the stream's first failed write set errno
    if (out) {
      out.close();  // closing flushes: a full disk or a file size limit shows here
      error = out ? 0 : errno;
    }
    if (!out) fail<IoError>("cannot write ", path.string(), ": ", error ? std::strerror(error) : "write failed");
    if (!detail::sync_to_disk(temp)) fail<IoError>("cannot write ", path.string(), ": flushing to disk failed");
    fs::rename(temp, path, ec);
    if (ec) fail<IoError>("cannot write ", path.string(), ": ", ec.message());
  } catch (...) {
    fs::remove(temp, ec);
    throw;
  }
}

}  // namespace gqe
