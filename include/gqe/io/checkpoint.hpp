#pragma once
// A checkpoint folder: config.json and the weights with the tensor names and shapes of docs/checkpoints.md ([out,
// in] like torch), either in model.safetensors or sharded as Hugging Face writes them
// (model.safetensors.index.json naming, for every tensor, the model-0000i-of-0000K.safetensors
// that holds it; the index wins over a stray model.safetensors).
//
// Loading checks everything (config, index, every header and byte range, every tensor's presence,
// dtype and shape, nothing extra, and that what it will copy fits in memory) from the headers
// before a single weight byte is mapped or read. Then it maps the files, and a float model uses
// F32, BF16 and F16 matrices in place, straight from the mapped pages (16-bit ones stay 16-bit and
// are widened in registers by the kernels), and converts what it cannot use as stored (F64
// matrices, and the small norm vectors) into memory of its own; a double model converts everything
// but F64. Other files in the folder are not read.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "gqe/io/config_json.hpp"
#include "gqe/io/detail/json_text.hpp"
#include "gqe/io/safetensors.hpp"
#include "gqe/model/transformer.hpp"
#include "gqe/util/system_memory.hpp"

namespace gqe {

// Which matrices of a float model are re-laid into panels (tensor/panels.hpp) after loading, for
// inference: a decode step then streams them in order instead of reading many rows side by side.
// It pays most for 16-bit weights, whose rows the decode kernel would otherwise widen and
// transpose in registers (figures in docs/results.md). F32 matrices stay in place, mapped, by
// default: re-laying them costs fresh memory, half a second to a second and a half per GB at load
// on the virtual machines measured, for a faster decode (docs/gqe-run.md).
enum class PanelLayout {
  none,        // every matrix as stored (in place when mapped)
  sixteen_bit, // BF16 and F16 matrices kept 16-bit
  all,         // every matrix
};

// Every layout, in the order the command lines list them.
inline constexpr PanelLayout kPanelLayouts[] = {PanelLayout::sixteen_bit, PanelLayout::all, PanelLayout::none};

// The names of the command-line options (gqe-run --panels, gqe-bench --panels).
inline const char* panel_layout_name(PanelLayout p) {
  return p == PanelLayout::none ? "none" : p == PanelLayout::all ? "all" : "16bit";
}
inline std::optional<PanelLayout> panel_layout_from_name(const std::string& name) {
  for (PanelLayout p : kPanelLayouts)
    if (name == panel_layout_name(p)) return p;
  return std::nullopt;
}

struct LoadOptions {
  bool map = true;         // map the files; false reads them into memory
  bool keep_16bit = true;  // a float model keeps BF16/F16 matrices 16-bit; false widens them to F32
  bool owned = false;      // every weight converted into memory of the model's own (to train it)
  PanelLayout panels = PanelLayout::sixteen_bit;  // ignored with `owned` and for double models
  // Bytes the load may hold in memory of its own (weights converted, matrices in panels), checked
  // from the headers before any is allocated; 0: the machine's physical memory.
  std::uint64_t memory_budget = 0;
};

struct SaveOptions {
  DType dtype = DType::F32;    // F32, F64, F16 or BF16
  std::size_t shard_bytes = 0;  // > 0: shards of at most about this many bytes (one tensor may exceed it)
};

namespace detail {

inline constexpr const char* kSingleFile = "model.safetensors";
inline constexpr const char* kIndexFile = "model.safetensors.index.json";

inline void require_folder(const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    fail<IoError>(dir.string(), " is not a folder; expected a checkpoint folder with config.json and model.safetensors");
}

// The weight files of a checkpoint, opened and cross-checked, and where each tensor lives.
struct CheckpointFiles {
  std::vector<SafetensorsFile> files;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorRecord*>> tensors;
  // The weights' place, for messages: the one file, or the shards.
  std::string where() const { return files.size() == 1 ? files.front().source() : "the checkpoint's shards"; }
};

// A shard name from the index: a plain file name inside the folder.
inline std::string shard_name(const nlohmann::json& value, const std::string& tensor, const std::string& source) {
  if (!value.is_string())
    fail<FormatError>(source, ": weight_map entry of tensor ", printable(tensor), " is ", describe_json(value),
                      "; expected a file name");
  const std::string name = value.get<std::string>();
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos || name.find('\\') != std::string::npos)
    fail<FormatError>(source, ": tensor ", printable(tensor), " is mapped to \"", printable(name),
                      "\"; expected the name of a file beside the index");
  return name;
}

// Opens the shards an index names and checks that every tensor is in the shard the index names,
// exactly once over all shards. metadata.total_size is not read: Hugging Face's loaders take it as
// informational and writers count it differently, while every tensor's bytes are checked anyway.
inline CheckpointFiles open_sharded(const std::filesystem::path& dir, bool map, bool header_only = false) {
  const std::filesystem::path index_path = dir / kIndexFile;
  const nlohmann::json index = read_json_file(index_path, "a safetensors index", std::uintmax_t(64) << 20, 2);
  const std::string source = index_path.string();
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    fail<FormatError>(source, " has no \"weight_map\" object; expected {\"weight_map\": {tensor: shard file}}");
  std::map<std::string, std::string> owner;  // tensor -> shard
  std::set<std::string> shard_names;
  for (const auto& [tensor, value] : index["weight_map"].items()) {
    owner[tensor] = shard_name(value, tensor, source);
    shard_names.insert(owner[tensor]);
  }
  if (owner.empty()) fail<FormatError>(source, ": weight_map is empty; expected the shard file of every tensor");
  CheckpointFiles out;
  out.files.reserve(shard_names.size());
  for (const auto& name : shard_names) out.files.push_back(SafetensorsFile::read(dir / name, header_only, map));
  for (const auto& file : out.files) {
    const std::string shard = std::filesystem::path(file.source()).filename().string();
    for (const auto& t : file.tensors()) {
      const auto it = owner.find(t.name);
      if (it == owner.end() || it->second != shard)
        fail<FormatError>("tensor ", printable(t.name), " is in ", file.source(), ", which ", source, " does not name for it",
                          it == owner.end() ? " (the index does not list it)" : "");
      out.tensors[t.name] = {&file, &t};
    }
  }
  for (const auto& [tensor, shard] : owner)
    if (!out.tensors.count(tensor))
      fail<FormatError>("tensor ", printable(tensor), " is missing from ", (dir / shard).string(), ", where ", source, " places it");
  return out;
}

// The weight files, mapped or read (map), or their headers alone (header_only).
inline CheckpointFiles open_weights(const std::filesystem::path& dir, bool map, bool header_only = false) {
  require_folder(dir);
  std::error_code ec;
  if (std::filesystem::exists(dir / kIndexFile, ec)) return open_sharded(dir, map, header_only);
  CheckpointFiles out;
  out.files.push_back(SafetensorsFile::read(dir / kSingleFile, header_only, map));
  for (const auto& t : out.files.front().tensors()) out.tensors[t.name] = {&out.files.front(), &t};
  return out;
}

// Every parameter present with a float dtype and its config's shape, nothing extra: checked before
// any value is read.
template <class Scalar>
void check_tensors(const Transformer<Scalar>& model, const CheckpointFiles& files) {
  const ModelConfig& config = model.config();
  std::set<std::string> expected;
  model.for_each_parameter([&](const std::string& name, const Weight& w) {
    expected.insert(name);
    const auto it = files.tensors.find(name);
    if (it == files.tensors.end())
      fail<FormatError>("tensor ", name, " is missing from ", files.where(), "; config.json needs it with shape ", w.shape().str());
    const auto& [file, t] = it->second;
    if (!is_float(t->dtype))
      fail<FormatError>("tensor ", name, " in ", file->source(), " has dtype ", dtype_name(t->dtype), "; expected F32, F16, BF16 or F64");
    if (t->shape.size() != static_cast<std::size_t>(w.shape().rank()) || Shape::of(t->shape) != w.shape())
      fail<FormatError>("tensor ", name, " in ", file->source(), " has shape ", t->shape_str(), "; config.json implies ", w.shape().str());
  });
  for (const auto& file : files.files)  // in the files' own order
    for (const auto& t : file.tensors())
      if (!expected.count(t.name)) {
        if (t.name == "lm_head.weight" && config.tie_word_embeddings)
          fail<FormatError>("tensor lm_head.weight in ", file.source(),
                            " is not expected: config.json sets tie_word_embeddings, so the embeddings serve as lm_head");
        fail<FormatError>("tensor ", printable(t.name), " in ", file.source(), " is not part of a ",
                          to_string(config.attention_type), " model of this config; expected exactly the tensors of the checkpoint format");
      }
}

// Whether a weight stored as t is used in place (the kernels take its dtype as stored), not
// converted into memory of its own.
template <class Scalar>
bool used_in_place(const Weight& w, const TensorRecord& t, const LoadOptions& options) {
  const bool matrix = w.shape().rank() == 2 && !options.owned;
  bool in_place = matrix && t.dtype == dtype_of<Scalar>();
  if constexpr (std::is_same_v<Scalar, float>)
    in_place = in_place || (matrix && options.keep_16bit && (t.dtype == DType::BF16 || t.dtype == DType::F16));
  return in_place;
}

// Whether load_checkpoint re-lays a matrix held in `dtype` into panels.
template <class Scalar>
bool goes_into_panels(DType dtype, const LoadOptions& options) {
  return std::is_same_v<Scalar, float> && !options.owned && options.panels != PanelLayout::none &&
         (options.panels == PanelLayout::all || dtype == DType::BF16 || dtype == DType::F16);
}

// Binds one weight to its stored values: in place, or converted into memory of the weight's own.
template <class Scalar>
void bind_weight(Weight& w, const SafetensorsFile& file, const TensorRecord& t, const LoadOptions& options) {
  if (used_in_place<Scalar>(w, t, options))
    w.borrow(file.data(t), t.dtype, file.keep_alive());
  else
    file.read_into(t, w.allocate<Scalar>());
}

// Refuses, from the headers and before any weight is bound, a load whose copies alone (weights
// converted to Scalar, matrices re-laid into panels) exceed options.memory_budget or else the
// machine's physical memory: the allocations would succeed (memory is overcommitted) and the
// process be killed as they fill. Weights used in place from a mapping are the page cache's.
// Files read instead of mapped are memory of the load's own, held until it ends beside the
// converted weights; the panels then replace pages of them (given back as they are laid out).
template <class Scalar>
void check_load_fits_in_memory(Transformer<Scalar>& model, const CheckpointFiles& files, const LoadOptions& options,
                               const std::filesystem::path& dir) {
  const std::uint64_t memory = options.memory_budget > 0 ? options.memory_budget : physical_memory_bytes();
  if (memory == 0) return;
  std::map<const Weight*, const TensorRecord*> record_of;
  double converted = 0, panels = 0;
  model.for_each_parameter([&](const std::string& name, Weight& w) {
    const TensorRecord& t = *files.tensors.at(name).second;
    record_of[&w] = &t;
    if (!used_in_place<Scalar>(w, t, options)) converted += static_cast<double>(w.numel()) * sizeof(Scalar);
  });
  model.for_each_panel_candidate([&](Weight& w) {  // a converted weight's panels replace its copy
    const TensorRecord& t = *record_of.at(&w);
    if (used_in_place<Scalar>(w, t, options) && goes_into_panels<Scalar>(t.dtype, options))
      panels += static_cast<double>(w.numel()) * static_cast<double>(dtype_size(t.dtype));
  });
  double read = 0;
  if (!options.map)
    for (const auto& file : files.files) read += static_cast<double>(file.file_size());
  const double held = options.map ? panels : read;
  if (held + converted <= static_cast<double>(memory)) return;
  fail<ConfigError>(dir.string(), ": loading this model takes at least ", memory_size(held + converted), " of memory of its own (",
                    memory_size(held), options.map ? " of matrices re-laid into panels, " : " of files read into memory, ",
                    memory_size(converted), " of weights converted to ", dtype_name(dtype_of<Scalar>()), "), more than ",
                    options.memory_budget > 0 ? "the budget's " : "this machine's ", memory_size(static_cast<double>(memory)),
                    "; expected a model that fits (mapped instead of read, with panels none and 16-bit weights kept",
                    " 16-bit, the matrices stay in the file, read from disk as they are used)");
}

}  // namespace detail

// True when every tensor of the checkpoint is F64: such a model runs in double, any other in float.
inline bool checkpoint_is_double(const std::filesystem::path& dir) {
  bool any = false;
  for (const auto& file : detail::open_weights(dir, false, true).files)
    for (const auto& t : file.tensors()) {
      if (t.dtype != DType::F64) return false;
      any = true;
    }
  return any;
}

template <class Scalar>
Transformer<Scalar> load_checkpoint(const std::filesystem::path& dir, const LoadOptions& options = {}) {
  detail::require_folder(dir);
  const ModelConfig config = load_model_config(dir / "config.json");
  // Everything is checked from the headers alone, before a byte of weights is mapped or read.
  const detail::CheckpointFiles headers = detail::open_weights(dir, options.map, true);
  // A config may promise far more parameters than the files hold: refuse before building it.
  std::size_t stored = 0;
  for (const auto& [name, entry] : headers.tensors) stored += entry.second->numel();
  const auto parameters = static_cast<std::size_t>(config.parameter_count());
  constexpr std::size_t kAlwaysAffordable = std::size_t(1) << 26;
  if (parameters > stored && parameters > std::max(kAlwaysAffordable, 2 * stored))
    fail<FormatError>(headers.where(), " holds ", stored, " values but config.json implies ", parameters,
                      " parameters; expected the checkpoint of that config");
  Transformer<Scalar> model(config);
  detail::check_tensors(model, headers);
  detail::check_load_fits_in_memory(model, headers, options, dir);
  const detail::CheckpointFiles files = detail::open_weights(dir, options.map);
  detail::check_tensors(model, files);  // the files as opened now
  model.for_each_parameter([&](const std::string& name, Weight& w) {
    const auto& [file, t] = files.tensors.at(name);
    detail::bind_weight<Scalar>(w, *file, *t, options);
  });
  if constexpr (std::is_same_v<Scalar, float>) {
    if (!options.owned && options.panels != PanelLayout::none) {
      // The mapped pages a weight was read from are released as it goes into panels, so that the
      // process holds the weights about once, not twice, at any time.
      model.lay_out_in_panels([&](const Weight& w) { return detail::goes_into_panels<Scalar>(w.dtype(), options); },
                              [&](const void* begin, std::size_t bytes) {
                                for (const auto& file : files.files) file.release(begin, bytes);
                              });
    }
  }
  return model;
}

// A weight's values encoded in `dtype` for writing.
inline EncodedTensor encode_weight(const std::string& name, const Weight& w, DType dtype) {
  const auto dims = w.shape().dims();
  const std::vector<std::int64_t> shape(dims.begin(), dims.end());
  if (w.dtype() == dtype) return EncodedTensor{name, dtype, shape, w.row_major_bytes()};
  if (w.dtype() == DType::F64) return encode_tensor(name, dtype, shape, w.data<double>());  // a double model's: never in panels
  const std::string stored = w.row_major_bytes();
  std::vector<float> values(static_cast<std::size_t>(w.numel()));
  convert_values(stored.data(), w.dtype(), values.size(), values.data());
  return encode_tensor(name, dtype, shape, values.data());
}

namespace detail {

// The model's tensors encoded in `dtype`, in its parameter order, cut into shards of about
// shard_bytes (one shard when 0).
template <class Scalar>
std::vector<std::vector<EncodedTensor>> encode_shards(const Transformer<Scalar>& model, DType dtype, std::size_t shard_bytes) {
  std::vector<std::vector<EncodedTensor>> shards(1);
  std::size_t bytes = 0;
  model.for_each_parameter([&](const std::string& name, const Weight& w) {
    EncodedTensor t = encode_weight(name, w, dtype);
    if (shard_bytes > 0 && bytes > 0 && bytes + t.bytes.size() > shard_bytes) {
      shards.emplace_back();
      bytes = 0;
    }
    bytes += t.bytes.size();
    shards.back().push_back(std::move(t));
  });
  return shards;
}

// The shard files an existing index in dir names (none when there is none or it cannot be read:
// they are not ours to guess).
inline std::set<std::string> indexed_shards(const std::filesystem::path& dir) {
  std::set<std::string> names;
  std::error_code ec;
  if (!std::filesystem::exists(dir / kIndexFile, ec)) return names;
  try {
    const auto index = read_json_file(dir / kIndexFile, "a safetensors index", std::uintmax_t(64) << 20, 2);
    for (const auto& [tensor, value] : index.at("weight_map").items()) names.insert(shard_name(value, tensor, ""));
  } catch (const std::exception&) {
    names.clear();
  }
  return names;
}

// Writes the shards and their index (last: it publishes them); returns the shard names.
inline std::set<std::string> write_shards(const std::filesystem::path& dir, const std::vector<std::vector<EncodedTensor>>& shards) {
  nlohmann::ordered_json index;
  std::size_t total = 0;
  std::set<std::string> written;
  for (std::size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    write_safetensors(dir / name, shards[i]);
    written.insert(name);
    for (const auto& t : shards[i]) {
      index["weight_map"][t.name] = name;
      total += t.bytes.size();
    }
  }
  index["metadata"] = {{"total_size", total}};
  const std::string text = index.dump(2) + "\n";
  write_file_atomically(dir / kIndexFile, [&](std::ostream& out) { out << text; });
  return written;
}

}  // namespace detail

// Writes config.json and the weights into dir (created if needed), every file atomically, the
// weights in one file or (options.shard_bytes > 0) in shards with their index, which is written
// last. The files of the other layout left from an earlier save are removed once the new ones are
// complete; other files in dir are left alone.
template <class Scalar>
void save_checkpoint(const Transformer<Scalar>& model, const std::filesystem::path& dir, const SaveOptions& options) {
  namespace fs = std::filesystem;
  if (!is_float(options.dtype))
    fail<ConfigError>("checkpoint dtype ", dtype_name(options.dtype), "; expected F32, F64, F16 or BF16");
  model.for_each_parameter([](const std::string& name, const Weight& w) {  // before any folder is made
    if (!w.bound()) fail<InputError>("weight ", name, " has no values; expected a loaded or initialised model");
  });
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail<IoError>("cannot create folder ", dir.string(), ": ", ec.message());
  const auto shards = detail::encode_shards(model, options.dtype, options.shard_bytes);
  const std::set<std::string> old_shards = detail::indexed_shards(dir);
  std::set<std::string> written;
  if (options.shard_bytes == 0) {
    write_safetensors(dir / detail::kSingleFile, shards.front());
    fs::remove(dir / detail::kIndexFile, ec);
  } else {
    written = detail::write_shards(dir, shards);
    fs::remove(dir / detail::kSingleFile, ec);
  }
  for (const auto& name : old_shards)
    if (!written.count(name)) fs::remove(dir / name, ec);
  save_model_config(dir / "config.json", model.config());
}

template <class Scalar>
void save_checkpoint(const Transformer<Scalar>& model, const std::filesystem::path& dir, DType dtype = DType::F32) {
  save_checkpoint(model, dir, SaveOptions{dtype, 0});
}

}  // namespace gqe
