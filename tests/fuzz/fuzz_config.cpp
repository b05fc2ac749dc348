// Fuzzes config.json reading with arbitrary text, through the same entry point as
// load_model_config: a ModelConfig or a gqe::Error, nothing else (no nlohmann exception escapes).
#include <cstddef>
#include <cstdint>
#include <string>

#include "gqe/io/config_json.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const gqe::ModelConfig config =
        gqe::parse_model_config_text(std::string(reinterpret_cast<const char*>(data), size), "fuzz input");
    // What was accepted must write and read back to the same config.
    const std::string text = gqe::to_json(config).dump();
    if (gqe::to_json(gqe::parse_model_config_text(text, "round trip")).dump() != text) __builtin_trap();
  } catch (const gqe::Error&) {
  }
  return 0;
}
