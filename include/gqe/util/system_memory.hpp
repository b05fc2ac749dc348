#pragma once
// The machine's physical memory: work that could never fit is refused before it is allocated.
// (Linux overcommits: a far too large allocation often succeeds, and the process is killed, or the
// machine thrashes, only once the pages are touched.)
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

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

// A size for messages, rounded up to a tenth of its unit: "770.3 GiB", "12.5 MiB", "5120 bytes".
inline std::string memory_size(double bytes) {
  const auto up = [&](double unit) { return std::ceil(bytes / unit * 10) / 10; };
  std::ostringstream out;
  if (bytes >= double(1 << 30))
    out << up(double(1 << 30)) << " GiB";
  else if (bytes >= double(1 << 20))
    out << up(double(1 << 20)) << " MiB";
  else
    out << std::ceil(bytes) << " bytes";
  return out.str();
}

}  // namespace gqe
