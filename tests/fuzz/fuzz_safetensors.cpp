// Fuzzes the safetensors parser with arbitrary bytes: it must accept or throw gqe::Error, and never
// read out of bounds, leak, or allocate beyond the input's own size. Accepted files are read back.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "gqe/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = gqe::SafetensorsFile::parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz input");
    for (const auto& t : file.tensors()) {
      std::vector<float> values(t.numel());
      file.read_into(t, values.data());
    }
  } catch (const gqe::Error&) {
  }
  return 0;
}
