#pragma once
// Uninitialised bytes aligned to 64 (one cache line, one AVX-512 packet). Large buffers (from 2 MB on
// unless the caller says otherwise) are aligned to 2 MB, rounded up to whole 2 MB pages and ask for
// transparent huge pages: one page fault per 2 MB on first touch instead of one per 4 KB (a fault
// costs microseconds; a cold prefill would otherwise spend much of its time in them).
#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gqe::detail {

struct AlignedBytes {
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  using Pointer = std::unique_ptr<unsigned char[], Free>;

  static constexpr std::size_t kHugePage = std::size_t(2) << 20;

  static Pointer allocate(std::size_t bytes, std::size_t huge_from = kHugePage) {
    constexpr std::size_t kAlign = 64;
    const std::size_t align = bytes >= huge_from ? kHugePage : kAlign;
    const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + align - 1) / align * align;
    auto* p = static_cast<unsigned char*>(std::aligned_alloc(align, rounded));
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHugePage) ::madvise(p, rounded, MADV_HUGEPAGE);
#endif
    return Pointer(p);
  }
};

}  // namespace gqe::detail
