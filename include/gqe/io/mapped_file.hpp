#pragma once
// A file's bytes, mapped read-only into memory (its pages come from the page cache, mapped at once
// on Linux, and are shared with every other process that maps the same file), or read into a
// buffer where mapping is not available or not wanted. Weights borrowed from a checkpoint keep the
// FileBytes alive through a shared pointer.
//
// While a file is mapped, replacing it by a rename (as gqe's own writers do: write beside, then
// rename) does not affect the mapping, which keeps the old file's pages. Editing the file in place
// or truncating it while a model uses it is not supported: changed bytes may show up in results,
// and reading a page past a truncated end raises SIGBUS. Read the file instead of mapping it
// (LoadOptions::map = false, gqe-run --no-mmap) where that can happen.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <system_error>

#include "gqe/error.hpp"
#include "gqe/tensor/aligned_bytes.hpp"
#include "gqe/util/system_memory.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define GQE_HAS_MMAP 1
#endif

namespace gqe {

class FileBytes {
 public:
  // The bytes of the regular file at path: mapped when `map` and the system can, else read, with
  // byte `aligned_at` on a 64-byte boundary (a safetensors file's first data byte).
  static std::shared_ptr<const FileBytes> open(const std::filesystem::path& path, bool map = true, std::size_t aligned_at = 0) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
      fail<IoError>(path.string(), " does not exist or is not a file; expected a safetensors file");
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) fail<IoError>("cannot read the size of ", path.string(), ": ", ec.message());
    if (size > static_cast<std::uintmax_t>(PTRDIFF_MAX))
      fail<IoError>(path.string(), " is ", size, " bytes long, more than this machine can address");
    std::shared_ptr<FileBytes> file(new FileBytes());
    file->size_ = static_cast<std::size_t>(size);
    if (map && file->try_map(path)) return file;
    // Read into memory: refused when it cannot fit, before the allocation that would succeed
    // (memory is overcommitted) and the process be killed as it fills.
    const std::uint64_t memory = physical_memory_bytes();
    if (memory > 0 && size > memory)
      fail<IoError>(path.string(), " is ", memory_size(static_cast<double>(size)), ", more than this machine's ",
                    memory_size(static_cast<double>(memory)), " of memory, and ",
                    map ? "could not be mapped" : "was to be read, not mapped", "; expected a file that fits in memory, or mapping");
    file->read_all(path, aligned_at);
    return file;
  }
  // Bytes already in memory (a fuzzer's input, a test's file).
  static std::shared_ptr<const FileBytes> hold(std::string bytes) {
    std::shared_ptr<FileBytes> file(new FileBytes());
    file->buffer_ = std::move(bytes);
    file->size_ = file->buffer_.size();
    file->data_ = reinterpret_cast<const unsigned char*>(file->buffer_.data());
    return file;
  }
  // Bytes [offset, offset + count) of the file at path, read (not mapped).
  static std::string read_range(const std::filesystem::path& path, std::size_t offset, std::size_t count) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail<IoError>("cannot open ", path.string());
    std::string bytes(count, '\0');
    if (!in.seekg(static_cast<std::streamoff>(offset)) || !in.read(bytes.data(), static_cast<std::streamsize>(count)))
      fail<IoError>("cannot read ", path.string(), " (", count, " bytes from ", offset, "; did it change while being read?)");
    return bytes;
  }

  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  ~FileBytes() {
#ifdef GQE_HAS_MMAP
    if (mapping_) ::munmap(mapping_, size_);
#endif
  }

  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool mapped() const { return mapping_ != nullptr; }
  // Gives the whole pages of [begin, begin + bytes) that lie in this file's bytes back to the
  // system, for bytes that were copied elsewhere and will not be read here again: a mapping's
  // pages stay in the page cache (reading them would map them again), a read file's pages are
  // freed (reading them would give zeros). Bytes handed over by hold() stay.
  void release(const void* begin, std::size_t bytes) const {
#ifdef GQE_HAS_MMAP
    const auto first = reinterpret_cast<std::uintptr_t>(begin), start = reinterpret_cast<std::uintptr_t>(data_);
    if (!(mapping_ || owned_) || first < start || first + bytes > start + size_) return;
    const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const std::uintptr_t lo = (first + page - 1) / page * page, hi = (first + bytes) / page * page;
    if (lo < hi) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
#else
    (void)begin;
    (void)bytes;
#endif
  }

 private:
  FileBytes() = default;

  bool try_map(const std::filesystem::path& path) {
#ifdef GQE_HAS_MMAP
    if (size_ == 0) return false;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    // Linux maps every page up front: one pass over the page cache is far cheaper than a fault per
    // 64 KB on the first forward (a 1.26 GB model's first token came 10% sooner). Not for a file
    // over half the memory, which that pass would read whole, evicting its own first pages.
    int flags = MAP_PRIVATE;
#ifdef MAP_POPULATE
    const std::uint64_t memory = physical_memory_bytes();
    if (memory == 0 || size_ <= memory / 2) flags |= MAP_POPULATE;
#endif
    void* p = ::mmap(nullptr, size_, PROT_READ, flags, fd, 0);
    ::close(fd);  // the mapping keeps the file open
    if (p == MAP_FAILED) return false;
    mapping_ = p;
    data_ = static_cast<const unsigned char*>(p);
    return true;
#else
    (void)path;
    return false;
#endif
  }

  // Into memory of its own, not zero-filled first; on huge pages when large, where a decode step
  // streams the weights faster than from the page cache's 4 KB pages.
  void read_all(const std::filesystem::path& path, std::size_t aligned_at) {
    constexpr std::size_t kLine = 64;
    const std::size_t shift = (kLine - aligned_at % kLine) % kLine;
    owned_ = detail::AlignedBytes::allocate(size_ + shift);
    std::ifstream in(path, std::ios::binary);
    if (!in) fail<IoError>("cannot open ", path.string());
    if (!in.read(reinterpret_cast<char*>(owned_.get() + shift), static_cast<std::streamsize>(size_)))
      fail<IoError>("cannot read ", path.string(), " (", size_, " bytes; did it change while being read?)");
    data_ = owned_.get() + shift;
  }

  void* mapping_ = nullptr;
  detail::AlignedBytes::Pointer owned_;  // a file read, not mapped
  std::string buffer_;                   // bytes handed over by hold()
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace gqe
