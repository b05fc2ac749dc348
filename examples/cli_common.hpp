#pragma once
// What the example programs share: CLI11 error mapping (one line on stderr, exit status 2),
// prompt parsing, and the logits file of gqe-run.
#include <CLI/CLI.hpp>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "gqe/gqe.hpp"

namespace gqe::cli {

// Exit status for every input or condition the user can fix.
constexpr int kUsageError = 2;

// Runs body() after parsing; maps every failure to one line on stderr. --help and --version exit 0.
template <class Body>
int run_main(CLI::App& app, int argc, char** argv, Body&& body) {
  const std::string program = app.get_name().empty() ? "gqe" : app.get_name();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: error: %s (see --help)\n", program.c_str(), e.what());
    return kUsageError;
  }
  try {
    return body();
  } catch (const gqe::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", program.c_str(), e.what());
    return kUsageError;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: error: out of memory; expected a model and prompt that fit in memory\n", program.c_str());
    return kUsageError;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", program.c_str(), e.what());
    return 1;
  }
}

// Refuses a leading minus sign, which CLI11 would wrap around into an unsigned option.
inline CLI::Validator non_negative_integer() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos)
          return "value " + value + " is not a non-negative integer";
        return "";
      },
      "UINT");
}

// Byte-level tokens: each byte of the text is a token id 0..255.
inline std::vector<std::int32_t> bytes_to_ids(const std::string& text) {
  std::vector<std::int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

// "1,2,3" -> {1, 2, 3}. Every entry a non-negative decimal integer that fits int32.
inline std::vector<std::int32_t> parse_ids(const std::string& text) {
  std::vector<std::int32_t> ids;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    if (item.empty() || item.size() > 10 || item.find_first_not_of("0123456789") != std::string::npos)
      fail<InputError>("--prompt-ids entry ", ids.size(), " is \"", item,
                       "\"; expected comma-separated non-negative integers like 1,2,3");
    const long long value = std::stoll(item);
    if (value > std::numeric_limits<std::int32_t>::max())
      fail<InputError>("--prompt-ids entry ", ids.size(), " is ", item, "; expected a token id below 2^31");
    ids.push_back(static_cast<std::int32_t>(value));
    pos = comma + 1;
  }
  return ids;
}

// gqe-run's logits file: "logits" F32 [T, V] and, for GQE models, "expert_indices" I32 [L, T, G, k].
template <class Scalar>
void write_logits(const std::string& path, const Tensor<Scalar>& logits, const Tensor<std::int32_t>* experts) {
  const Index T = logits.dim(1), V = logits.dim(2);
  std::vector<EncodedTensor> tensors = {encode_tensor("logits", DType::F32, {T, V}, logits.data())};
  if (experts) {
    const auto dims = experts->shape().dims();
    tensors.push_back(encode_tensor("expert_indices", DType::I32, std::vector<std::int64_t>(dims.begin(), dims.end()),
                                    experts->data()));
  }
  write_safetensors(path, tensors);
}

}  // namespace gqe::cli
