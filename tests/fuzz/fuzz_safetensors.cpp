// Fuzzes the safetensors parser with arbitrary bytes: it must accept or throw gqe::Error, and never
// read out of bounds, leak, or allocate beyond a small multiple of the input's size. The values of
// an accepted file are read back, as floats and, for I32, as integers.
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
      if (file.raw_bytes(t).size() != t.numel() * gqe::dtype_size(t.dtype)) __builtin_trap();
      if (t.dtype == gqe::DType::I32) (void)file.read_as<std::int32_t>(t.name);
    }
  } catch (const gqe::Error&) {
  }
  return 0;
}
