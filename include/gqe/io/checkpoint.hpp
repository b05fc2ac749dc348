#pragma once
// A checkpoint folder: config.json and model.safetensors with the spec's tensor names and shapes
// ([out, in] like torch). Loading refuses a missing, extra or misshapen tensor by name; any float
// dtype converts to the model's scalar type. Other files in the folder are not read.
#include <algorithm>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "gqe/io/config_json.hpp"
#include "gqe/io/safetensors.hpp"
#include "gqe/model/transformer.hpp"

namespace gqe {

namespace detail {
inline std::filesystem::path checkpoint_file(const std::filesystem::path& dir, const char* name) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    fail<IoError>(dir.string(), " is not a folder; expected a checkpoint folder with config.json and model.safetensors");
  return dir / name;
}

}  // namespace detail

// True when every tensor of the checkpoint is F64: such a model runs in double, any other in float.
inline bool checkpoint_is_double(const std::filesystem::path& dir) {
  const SafetensorsFile file = SafetensorsFile::read(detail::checkpoint_file(dir, "model.safetensors"), true);
  if (file.tensors().empty()) return false;
  for (const auto& t : file.tensors())
    if (t.dtype != DType::F64) return false;
  return true;
}

template <class Scalar>
Transformer<Scalar> load_checkpoint(const std::filesystem::path& dir) {
  const ModelConfig config = load_model_config(detail::checkpoint_file(dir, "config.json"));
  const SafetensorsFile file = SafetensorsFile::read(detail::checkpoint_file(dir, "model.safetensors"));
  // A config may promise far more parameters than the file holds: refuse before allocating them.
  // Short of that, the model is built so that the check below names the missing tensor.
  const auto parameters = static_cast<std::size_t>(config.parameter_count());
  std::size_t stored = 0;
  for (const auto& t : file.tensors()) stored += t.numel();
  constexpr std::size_t kAlwaysAffordable = std::size_t(1) << 26;  // parameters: 256 MiB of float
  if (parameters > stored && parameters > std::max(kAlwaysAffordable, 2 * stored))
    fail<FormatError>(file.source(), " holds ", stored, " values but config.json implies ", parameters,
                      " parameters; expected the checkpoint of that config");

  Transformer<Scalar> model(config);
  std::set<std::string> expected;
  model.for_each_parameter([&](const std::string& name, TensorView<Scalar> w) {
    expected.insert(name);
    const TensorRecord* t = file.find(name);
    if (!t) fail<FormatError>("tensor ", name, " is missing from ", file.source(), "; config.json needs it with shape ", w.shape().str());
    if (!is_float(t->dtype))
      fail<FormatError>("tensor ", name, " in ", file.source(), " has dtype ", dtype_name(t->dtype), "; expected F32, F16, BF16 or F64");
    if (t->shape.size() != static_cast<std::size_t>(w.rank()) || Shape::of(t->shape) != w.shape())
      fail<FormatError>("tensor ", name, " in ", file.source(), " has shape ", t->shape_str(), "; config.json implies ",
                        w.shape().str());
    file.read_into(*t, w.data());
  });
  for (const auto& t : file.tensors())
    if (!expected.count(t.name)) {
      if (t.name == "lm_head.weight" && config.tie_word_embeddings)
        fail<FormatError>("tensor lm_head.weight in ", file.source(),
                          " is not expected: config.json sets tie_word_embeddings, so the embeddings serve as lm_head");
      fail<FormatError>("tensor ", detail::printable(t.name), " in ", file.source(), " is not part of a ",
                        to_string(config.attention_type), " model of this config; expected exactly the spec's tensors");
    }
  return model;
}

// Writes config.json and model.safetensors into dir (created if needed), each atomically; other
// files in dir are left alone. dtype: F32 (default), F64, F16 or BF16.
template <class Scalar>
void save_checkpoint(const Transformer<Scalar>& model, const std::filesystem::path& dir, DType dtype = DType::F32) {
  if (!is_float(dtype)) fail<ConfigError>("checkpoint dtype ", dtype_name(dtype), "; expected F32, F64, F16 or BF16");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail<IoError>("cannot create folder ", dir.string(), ": ", ec.message());
  std::vector<EncodedTensor> tensors;
  model.for_each_parameter([&](const std::string& name, TensorView<const Scalar> w) {
    const auto dims = w.shape().dims();
    tensors.push_back(encode_tensor(name, dtype, std::vector<std::int64_t>(dims.begin(), dims.end()), w.data()));
  });
  write_safetensors(dir / "model.safetensors", tensors);
  save_model_config(dir / "config.json", model.config());
}

}  // namespace gqe
