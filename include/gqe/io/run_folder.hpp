#pragma once
// A folder replaced as a whole (a training run's checkpoint and state), safe against a crash at any
// point, and a lock that keeps a second writer out.
//
// The new contents are written into the sibling <dir>.saving, whose `marker` file (written last,
// atomically) says it is complete. Then: <dir> -> <dir>.old, <dir>.saving -> <dir>, <dir>.old
// removed. After a crash at any step one complete copy is left, and the newest complete one wins:
//   <dir>.saving with its marker (the save had finished writing), else <dir>, else <dir>.old.
// newest_saved_folder() finds it without changing anything; replace_folder() first finishes or
// undoes whatever a crashed save left (recover_folder), so nothing complete is ever deleted before a
// newer complete copy stands under <dir>.
//
// Paths are made absolute and free of "." and ".." and links first: "--resume ." inside the folder
// names the folder itself, not a "..saving" inside it. A process working inside dir is left in the
// replaced copy, which is removed: a program resolves its paths once, before the first save.
#include <filesystem>
#include <functional>
#include <string>
#include <system_error>
#include <utility>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#endif

#include "gqe/error.hpp"

namespace gqe {

namespace detail {
// Test hook: called with the name of each step of replace_folder and recover_folder just before it
// runs ("write", "swap_out", "swap_in", "drop_old", "promote_old"); a test throws from it to stop a
// save there as a crash would. Empty in normal use.
inline std::function<void(const char* step)>& run_folder_fault_hook() {
  static std::function<void(const char*)> hook;
  return hook;
}
inline void run_folder_step(const char* step) {
  if (run_folder_fault_hook()) run_folder_fault_hook()(step);
}

// Makes the renames so far durable: a folder's entries reach the disk when the folder is synced.
inline void sync_folder(const std::filesystem::path& dir) {
#if defined(__unix__) || defined(__APPLE__)
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
#else
  (void)dir;
#endif
}

inline void rename_or_fail(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::error_code ec;
  std::filesystem::rename(from, to, ec);
  if (ec) fail<IoError>("cannot rename ", from.string(), " to ", to.string(), ": ", ec.message());
}
inline void remove_or_fail(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  if (ec) fail<IoError>("cannot remove ", dir.string(), ": ", ec.message());
}
}  // namespace detail

// dir as an absolute path without ".", "..", links or a trailing separator.
inline std::filesystem::path resolved_folder(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(dir, ec), ec);
  if (ec) fail<IoError>("cannot resolve the path ", dir.string(), ": ", ec.message());
  if (!p.has_filename()) p = p.parent_path();
  if (p == p.root_path()) fail<IoError>(dir.string(), " is the root folder; expected a folder that can be replaced");
  return p;
}

// The sibling <dir><suffix> of a resolved folder.
inline std::filesystem::path folder_sibling(const std::filesystem::path& dir, const char* suffix) {
  return dir.parent_path() / (dir.filename().string() + suffix);
}

// The newest complete copy of dir (see the file comment), or an empty path when there is none.
inline std::filesystem::path newest_saved_folder(const std::filesystem::path& dir_given, const std::string& marker) {
  const auto dir = resolved_folder(dir_given);
  std::error_code ec;
  for (const auto& candidate : {folder_sibling(dir, ".saving"), dir, folder_sibling(dir, ".old")})
    if (std::filesystem::is_regular_file(candidate / marker, ec)) return candidate;
  return {};
}

// Brings dir back to one complete copy under its own name after a save that crashed: a complete
// <dir>.saving is swapped in, an incomplete one removed; a lone <dir>.old is moved back.
inline void recover_folder(const std::filesystem::path& dir_given, const std::string& marker) {
  namespace fs = std::filesystem;
  const auto dir = resolved_folder(dir_given);
  const auto saving = folder_sibling(dir, ".saving"), old = folder_sibling(dir, ".old");
  std::error_code ec;
  const auto complete = [&](const fs::path& d) { return fs::is_regular_file(d / marker, ec); };
  if (complete(saving)) {
    if (fs::exists(dir, ec)) {
      if (complete(dir)) detail::remove_or_fail(old);  // dir is complete: the older copy can go
      if (fs::exists(old, ec)) fail<IoError>("cannot finish an interrupted save of ", dir.string(), ": both it and ",
                                             old.string(), " are there; expected at most one of them");
      detail::run_folder_step("swap_out");
      detail::rename_or_fail(dir, old);
    }
    detail::run_folder_step("swap_in");
    detail::rename_or_fail(saving, dir);
    detail::sync_folder(dir.parent_path());
  } else {
    detail::remove_or_fail(saving);
    if (!fs::exists(dir, ec) && complete(old)) {
      detail::run_folder_step("promote_old");
      detail::rename_or_fail(old, dir);
      detail::sync_folder(dir.parent_path());
    }
  }
  if (complete(dir)) {
    detail::run_folder_step("drop_old");
    detail::remove_or_fail(old);
  }
}

// Replaces dir by what write(folder) puts into a fresh folder, which must end by writing `marker`
// (atomically: see write_file_atomically). The first save creates dir.
inline void replace_folder(const std::filesystem::path& dir_given, const std::string& marker,
                           const std::function<void(const std::filesystem::path&)>& write) {
  namespace fs = std::filesystem;
  const auto dir = resolved_folder(dir_given);
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    fail<IoError>("cannot save into ", dir.string(), ": it is not a folder");
  recover_folder(dir, marker);
  const auto saving = folder_sibling(dir, ".saving");
  detail::run_folder_step("write");
  try {
    write(saving);
    if (!fs::is_regular_file(saving / marker, ec))
      fail<IoError>("saving ", dir.string(), " wrote no ", marker, "; expected it last, to mark the copy complete");
  } catch (...) {
    fs::remove_all(saving, ec);  // a failed save (a full disk) leaves nothing half-written behind
    throw;
  }
  detail::sync_folder(saving);
  recover_folder(dir, marker);  // swaps the complete copy in
}

// An exclusive lock on a folder for as long as the object lives (flock on the folder itself, so no
// file is left behind; the kernel drops it when the process dies). A second holder, in this process
// or another, is refused at once with IoError naming the folder.
class FolderLock {
 public:
  FolderLock() = default;
  FolderLock(const std::filesystem::path& dir, const std::string& purpose) {
#if defined(__unix__) || defined(__APPLE__)
    fd_ = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd_ < 0) fail<IoError>("cannot open ", dir.string(), " to lock it for ", purpose);
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd_);
      fd_ = -1;
      fail<IoError>(dir.string(), " is in use by another process (", purpose,
                    "); expected one process at a time on a folder");
    }
#else
    (void)dir;
    (void)purpose;
#endif
  }
  FolderLock(FolderLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  FolderLock& operator=(FolderLock&& other) noexcept {
    if (this != &other) {
      release();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;
  ~FolderLock() { release(); }

  bool held() const { return fd_ >= 0; }

 private:
  void release() {
#if defined(__unix__) || defined(__APPLE__)
    if (fd_ >= 0) ::close(fd_);  // closing drops the flock
#endif
    fd_ = -1;
  }
  int fd_ = -1;
};

}  // namespace gqe
