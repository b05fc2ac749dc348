// Fuzzes config.json parsing with arbitrary text: a ModelConfig or gqe::Error, nothing else.
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

#include "gqe/io/config_json.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return 0;
  try {
    const gqe::ModelConfig config = gqe::parse_model_config(json, "fuzz input");
    (void)gqe::to_json(config).dump();
  } catch (const gqe::Error&) {
  }
  return 0;
}
