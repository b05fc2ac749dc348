#pragma once
// config.json <-> ModelConfig, with Hugging Face names (so plain Llama configs load, eos_token_id
// included) and the keys gqe adds: attention_type, gqe_top_k, gqe_variant. Every value is checked
// for its JSON type and range; unknown keys are ignored; features gqe does not implement are
// refused by name.
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/io/atomic_file.hpp"
#include "gqe/io/detail/json_text.hpp"
#include "gqe/model/config.hpp"

namespace gqe {
namespace detail {

// config.json keys read one at a time, each refused with its name when of the wrong type.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& json, std::string source) : json_(json), source_(std::move(source)) {}

  bool has(const char* key) const { return json_.contains(key) && !json_.at(key).is_null(); }

  Index integer(const char* key) const {
    if (!has(key)) fail<ConfigError>(source_, ": \"", key, "\" is required");
    const auto value = integer_value(json_.at(key), key);
    if (!value) fail<ConfigError>(source_, ": \"", key, "\" is ", describe_json(json_.at(key)), "; expected an integer");
    return *value;
  }
  Index integer(const char* key, Index fallback) const { return has(key) ? integer(key) : fallback; }

  double number(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    const auto& v = json_.at(key);
    if (!v.is_number()) fail<ConfigError>(source_, ": \"", key, "\" is ", describe_json(v), "; expected a number");
    return v.get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const auto& v = json_.at(key);
    if (!v.is_boolean()) fail<ConfigError>(source_, ": \"", key, "\" is ", describe_json(v), "; expected true or false");
    return v.get<bool>();
  }
  std::string string(const char* key, const char* fallback) const {
    if (!has(key)) return fallback;
    const auto& v = json_.at(key);
    if (!v.is_string()) fail<ConfigError>(source_, ": \"", key, "\" is ", describe_json(v), "; expected a string");
    return v.get<std::string>();
  }
  // Token ids, as Hugging Face writes eos_token_id: an integer or a list of integers; absent or null
  // is none. Each must fit a token id; ModelConfig::validate checks it against vocab_size.
  std::vector<std::int32_t> token_ids(const char* key) const {
    std::vector<std::int32_t> ids;
    if (!has(key)) return ids;
    const auto& v = json_.at(key);
    const auto add = [&](const nlohmann::json& item) {
      const auto id = integer_value(item, key);
      if (!id)
        fail<ConfigError>(source_, ": \"", key, "\" is ", describe_json(v), "; expected a token id or a list of token ids");
      if (*id < 0 || *id > std::numeric_limits<std::int32_t>::max())
        fail<ConfigError>(source_, ": \"", key, "\" holds ", *id, "; expected token ids from 0 to vocab_size - 1");
      ids.push_back(static_cast<std::int32_t>(*id));
    };
    if (v.is_array()) {
      for (const auto& item : v) add(item);
    } else {
      add(v);
    }
    return ids;
  }
  // Keys that name features gqe does not implement: absent, null or false only.
  void refuse_feature(const char* key, const char* feature) const {
    if (has(key) && json_.at(key) != false)
      fail<ConfigError>(source_, ": \"", key, "\" is ", describe_json(json_.at(key)), "; gqe does not implement ", feature,
                        " (expected null or false)");
  }
  // Keys that, when given, must hold the one value gqe computes with.
  void require_if_given(const char* key, const nlohmann::json& expected, const char* reason) const {
    if (has(key) && json_.at(key) != expected)
      fail<ConfigError>(source_, ": \"", key, "\" is ", describe_json(json_.at(key)), "; ", reason, " (expected ", expected.dump(), ")");
  }
  const nlohmann::json& at(const char* key) const { return json_.at(key); }
  const std::string& source() const { return source_; }

 private:
  // An integer (256.0 counts: an integer written as a float; 2.5 does not), or nothing when v is
  // not one. Refused here only when it is an integer that does not fit 64 bits.
  std::optional<Index> integer_value(const nlohmann::json& v, const char* key) const {
    if (v.is_number_integer()) {
      if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
        fail<ConfigError>(source_, ": \"", key, "\" is ", v.dump(), "; expected an integer that fits in 64 bits");
      return v.get<Index>();
    }
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return static_cast<Index>(d);
    }
    return std::nullopt;
  }

  const nlohmann::json& json_;
  std::string source_;
};

// Keys of Llama-family configs whose values change what a model computes in ways gqe does not
// implement: refused unless they say what gqe computes, so that such a model never runs silently
// wrong. (Unknown keys, which change nothing here, are ignored.)
inline void refuse_unimplemented(const ConfigReader& r) {
  r.refuse_feature("rope_scaling", "RoPE scaling");
  r.refuse_feature("attention_bias", "attention biases");
  r.refuse_feature("mlp_bias", "MLP biases");
  r.require_if_given("hidden_act", "silu", "gqe computes SwiGLU with SiLU");
  r.require_if_given("use_rope", true, "gqe always applies RoPE");
  // Qwen-style configs give a window size beside a switch that leaves it off.
  r.refuse_feature(r.has("use_sliding_window") ? "use_sliding_window" : "sliding_window", "sliding-window attention");
  if (r.has("layer_types")) {
    const auto& types = r.at("layer_types");
    if (!types.is_array()) fail<ConfigError>(r.source(), ": \"layer_types\" is ", describe_json(types), "; expected a list");
    for (std::size_t i = 0; i < types.size(); ++i)
      if (types[i] != "full_attention")
        fail<ConfigError>(r.source(), ": \"layer_types\" gives layer ", i, " ", describe_json(types[i]),
                          "; gqe runs full attention in every layer (expected \"full_attention\")");
  }
}

// RoPE's base. Newer Hugging Face configs keep RoPE's settings in one object, "rope_parameters":
// {"rope_type": "default", "rope_theta": 10000.0}; plain RoPE is read from there too, and any other
// type or setting is refused as RoPE scaling is.
inline double rope_theta_of(const ConfigReader& r) {
  const double top = r.number("rope_theta", 10000.0);
  if (!r.has("rope_parameters")) return top;
  const auto& p = r.at("rope_parameters");
  const std::string where = r.source() + ": \"rope_parameters\"";
  if (!p.is_object())
    fail<ConfigError>(where, " is ", describe_json(p), "; expected an object such as {\"rope_type\": \"default\", \"rope_theta\": 10000.0}");
  for (const auto& [key, value] : p.items())
    if (key != "rope_type" && key != "type" && key != "rope_theta" && !value.is_null())
      fail<ConfigError>(where, " sets \"", printable(key), "\"; gqe implements plain RoPE, set by rope_theta alone");
  const ConfigReader inner(p, where);
  for (const char* key : {"rope_type", "type"})
    if (inner.has(key) && inner.string(key, "") != "default")
      fail<ConfigError>(where, ": \"", key, "\" is ", describe_json(p.at(key)), "; gqe does not implement RoPE scaling (expected \"default\")");
  const double theta = inner.number("rope_theta", top);
  if (r.has("rope_theta") && theta != top)
    fail<ConfigError>(r.source(), ": \"rope_theta\" is ", r.at("rope_theta").dump(), " but \"rope_parameters\" gives ",
                      p.at("rope_theta").dump(), "; expected one value");
  return theta;
}

}  // namespace detail

// A ModelConfig from parsed config.json, checked by ModelConfig::validate; `source` names the file
// in messages. A value of the wrong JSON type is refused naming its key, never converted.
inline ModelConfig parse_model_config(const nlohmann::json& json, const std::string& source = "config.json") {
  if (!json.is_object()) fail<FormatError>(source, " is JSON but not an object; expected {\"vocab_size\": ..., ...}");
  const detail::ConfigReader r(json, source);
  detail::refuse_unimplemented(r);
  ModelConfig c;
  try {
    // printable(): an unknown name is quoted in the message, which must stay one line.
    c.attention_type = attention_type_from_string(detail::printable(r.string("attention_type", "gqa")));
    c.gqe_variant = gqe_variant_from_string(detail::printable(r.string("gqe_variant", "gqe")));
    c.vocab_size = r.integer("vocab_size");
    c.hidden_size = r.integer("hidden_size");
    c.intermediate_size = r.integer("intermediate_size");
    c.num_layers = r.integer("num_hidden_layers");
    c.num_heads = r.integer("num_attention_heads");
    c.num_kv_heads = r.integer("num_key_value_heads", c.num_heads);
    if (r.has("head_dim")) {
      c.head_dim = r.integer("head_dim");
    } else {  // Hugging Face's default, defined only when the heads divide the hidden size
      check_size("hidden_size", c.hidden_size, Limits::max_hidden);
      check_size("num_attention_heads", c.num_heads, Limits::max_heads);
      if (c.hidden_size % c.num_heads != 0)
        fail<ConfigError>("\"head_dim\" is absent and hidden_size ", c.hidden_size, " is not a multiple of num_attention_heads ",
                          c.num_heads, "; expected head_dim to be given");
      c.head_dim = c.hidden_size / c.num_heads;
    }
    c.top_k = c.attention_type == AttentionType::gqe ? r.integer("gqe_top_k") : r.integer("gqe_top_k", 1);
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
    c.rope_theta = detail::rope_theta_of(r);
    c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
    c.max_position_embeddings = r.integer("max_position_embeddings", 4096);
    c.eos_token_ids = r.token_ids("eos_token_id");
    c.validate();
  } catch (const ConfigError& e) {
    const std::string message = e.what();
    if (message.rfind(source + ": ", 0) == 0) throw;  // already names the file
    fail<ConfigError>(source, ": ", message);
  }
  return c;
}

// config.json's text: FormatError when it is not JSON or names a key twice, else parse_model_config.
inline ModelConfig parse_model_config_text(const std::string& text, const std::string& source = "config.json") {
  return parse_model_config(detail::parse_json_unique_keys(text, source), source);
}

inline ModelConfig load_model_config(const std::filesystem::path& path) {
  // Configs are a few hundred bytes; far more is not a config, and is not worth reading whole.
  constexpr std::uintmax_t kMaxBytes = std::uintmax_t(16) << 20;
  return parse_model_config(detail::read_json_file(path, "the model's config.json", kMaxBytes), path.string());
}

// Hugging Face keys first, so that a gqa checkpoint reads as a Llama model there.
inline nlohmann::ordered_json to_json(const ModelConfig& c) {
  const bool routed = c.attention_type == AttentionType::gqe;
  nlohmann::ordered_json j;
  j["architectures"] = {routed ? "GQEForCausalLM" : "LlamaForCausalLM"};
  j["model_type"] = routed ? "gqe" : "llama";
  j["attention_type"] = to_string(c.attention_type);
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  if (routed) {
    j["gqe_top_k"] = c.top_k;
    j["gqe_variant"] = to_string(c.gqe_variant);
  }
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["max_position_embeddings"] = c.max_position_embeddings;
  if (c.eos_token_ids.size() == 1)
    j["eos_token_id"] = c.eos_token_ids.front();
  else if (!c.eos_token_ids.empty())
    j["eos_token_id"] = c.eos_token_ids;
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  return j;
}

inline void save_model_config(const std::filesystem::path& path, const ModelConfig& c) {
  const std::string text = to_json(c).dump(2) + "\n";
  write_file_atomically(path, [&](std::ostream& out) { out << text; });
}

}  // namespace gqe
