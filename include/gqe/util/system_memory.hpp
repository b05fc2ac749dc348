#pragma once
// The machine's physical memory: work that could never fit is refused before it is allocated.
// (Linux overcommits: a far too large allocation often succeeds, and the process is killed, or the
// machine thrashes, only once the pages are touched.)
#include <cstdint>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace gqe {

// Bytes of physical memory, or 0 where the system does not say.
inline std::uint64_t physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
#endif
  return 0;
}

}  // namespace gqe
