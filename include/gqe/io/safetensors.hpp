#pragma once
// The safetensors format: an 8-byte little-endian header length, a JSON header naming each tensor's
// dtype, shape and byte range (relative to the end of the header), then the raw row-major data.
// Everything a file supplies is checked before use: sizes, JSON shape, duplicate names, dtypes,
// element counts against byte ranges, and that the ranges tile the data exactly. Nothing is read
// out of bounds and nothing is allocated beyond the file's own size.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/io/atomic_file.hpp"

namespace gqe {

enum class DType { F64, F32, F16, BF16, I32 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
  }
  return "?";
}
inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
  }
  return 0;
}
inline std::optional<DType> dtype_from_name(const std::string& s) {
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I32})
    if (s == dtype_name(t)) return t;
  return std::nullopt;
}
inline bool is_float(DType t) { return t != DType::I32; }

// ---- half and bfloat16 ------------------------------------------------------------------------

inline float bits_to_float(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline std::uint32_t float_to_bits(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

// IEEE binary16 -> float, exact (every half is a float).
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// float -> IEEE binary16, round to nearest even; overflow to infinity, NaN stays NaN.
inline std::uint16_t float_to_half(float f) {
  const std::uint32_t x = float_to_bits(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const float magnitude = std::fabs(f);
  if (std::isnan(f)) return static_cast<std::uint16_t>(sign | 0x7e00u);
  if (magnitude >= 65520.0f) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (magnitude < 0x1.0p-14f)  // subnormal half: a multiple of 2^-24 (1024 rounds up to the first normal)
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(std::nearbyint(magnitude * 0x1.0p24f)));
  const std::uint32_t exponent = ((x >> 23) & 0xffu) - 127 + 15, mantissa = x & 0x7fffffu;
  std::uint32_t half = (exponent << 10) | (mantissa >> 13);
  const std::uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // a carry moves into the exponent
  return static_cast<std::uint16_t>(sign | half);
}

inline float bf16_to_float(std::uint16_t b) { return bits_to_float(static_cast<std::uint32_t>(b) << 16); }

// float -> bfloat16, round to nearest even; NaN stays NaN.
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t x = float_to_bits(f);
  if (std::isnan(f)) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>((x + rounding) >> 16);
}

// ---- reading ----------------------------------------------------------------------------------

struct TensorRecord {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte range inside the data area

  std::size_t numel() const {
    std::size_t n = 1;
    for (auto d : shape) n *= static_cast<std::size_t>(d);
    return n;
  }
  std::string shape_str() const {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

class SafetensorsFile {
 public:
  static constexpr std::uint64_t kMaxHeaderBytes = 100000000;

  // Parses a whole file held in memory; `source` names it in error messages.
  static SafetensorsFile parse(std::string bytes, const std::string& source) {
    SafetensorsFile file;
    file.source_ = source;
    file.file_size_ = bytes.size();
    file.bytes_ = std::move(bytes);
    file.parse_header();
    return file;
  }

  // Reads and checks a file; with header_only, only its header is read (the tensors' records are
  // checked against the file's size, but their values cannot be read).
  static SafetensorsFile read(const std::filesystem::path& path, bool header_only = false) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
      fail<IoError>(path.string(), " does not exist or is not a file; expected a safetensors file");
    std::ifstream in(path, std::ios::binary);
    if (!in) fail<IoError>("cannot open ", path.string());
    const auto size = static_cast<std::size_t>(std::filesystem::file_size(path, ec));
    if (ec) fail<IoError>("cannot read the size of ", path.string(), ": ", ec.message());
    std::size_t wanted = size;
    if (header_only && size >= 8) {
      unsigned char prefix[8];
      if (!in.read(reinterpret_cast<char*>(prefix), 8)) fail<IoError>("cannot read ", path.string());
      std::uint64_t header = 0;
      for (int i = 7; i >= 0; --i) header = (header << 8) | prefix[i];
      wanted = 8 + static_cast<std::size_t>(std::min<std::uint64_t>(header, std::min<std::uint64_t>(kMaxHeaderBytes, size - 8)));
      in.seekg(0);
    }
    std::string bytes(wanted, '\0');
    if (!in.read(bytes.data(), static_cast<std::streamsize>(wanted))) fail<IoError>("cannot read ", path.string());
    SafetensorsFile file;
    file.source_ = path.string();
    file.bytes_ = std::move(bytes);
    file.file_size_ = size;
    file.parse_header();
    return file;
  }

  const std::string& source() const { return source_; }
  const std::vector<TensorRecord>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  const TensorRecord* find(const std::string& name) const {
    for (const auto& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }
  const TensorRecord& at(const std::string& name) const {
    if (const TensorRecord* t = find(name)) return *t;
    fail<FormatError>("tensor ", name, " is missing from ", source_);
  }

  // The record's values converted to Scalar, written to out[0 .. numel).
  template <class Scalar>
  void read_into(const TensorRecord& t, Scalar* out) const {
    if (bytes_.size() != file_size_) fail<IoError>(source_, " was read for its header only; its values are not loaded");
    const unsigned char* p = data_begin() + t.begin;  // any alignment: values are copied out
    const std::size_t n = t.numel();
    for (std::size_t i = 0; i < n; ++i) {
      switch (t.dtype) {
        case DType::F64: { double v; std::memcpy(&v, p + 8 * i, 8); out[i] = static_cast<Scalar>(v); break; }
        case DType::F32: { float v; std::memcpy(&v, p + 4 * i, 4); out[i] = static_cast<Scalar>(v); break; }
        case DType::I32: { std::int32_t v; std::memcpy(&v, p + 4 * i, 4); out[i] = static_cast<Scalar>(v); break; }
        case DType::F16: { std::uint16_t v; std::memcpy(&v, p + 2 * i, 2); out[i] = static_cast<Scalar>(half_to_float(v)); break; }
        case DType::BF16: { std::uint16_t v; std::memcpy(&v, p + 2 * i, 2); out[i] = static_cast<Scalar>(bf16_to_float(v)); break; }
      }
    }
  }
  template <class Scalar>
  std::vector<Scalar> read_as(const std::string& name) const {
    const TensorRecord& t = at(name);
    std::vector<Scalar> values(t.numel());
    read_into(t, values.data());
    return values;
  }

 private:
  const unsigned char* data_begin() const {
    return reinterpret_cast<const unsigned char*>(bytes_.data()) + 8 + header_size_;
  }

  // Rejects duplicate keys at any depth while nlohmann parses (it would keep the last silently).
  static nlohmann::json parse_json(const std::string& text, const std::string& source) {
    std::vector<std::set<std::string>> keys;
    const nlohmann::json::parser_callback_t check = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      using E = nlohmann::json::parse_event_t;
      if (event == E::object_start) keys.emplace_back();
      if (event == E::object_end && !keys.empty()) keys.pop_back();
      if (event == E::key && !keys.empty() && !keys.back().insert(parsed.get<std::string>()).second)
        fail<FormatError>(source, ": the header names \"", parsed.get<std::string>(), "\" twice; expected unique names");
      return true;
    };
    try {
      return nlohmann::json::parse(text, check);
    } catch (const nlohmann::json::exception& e) {
      fail<FormatError>(source, ": the header is not valid JSON (", e.what(), ")");
    }
  }

  static std::uint64_t to_count(const nlohmann::json& v, const std::string& what) {
    if (!v.is_number_integer() || (v.is_number_integer() && !v.is_number_unsigned() && v.get<std::int64_t>() < 0))
      fail<FormatError>(what, " is ", v.dump(), "; expected a non-negative integer");
    return v.get<std::uint64_t>();
  }

  void parse_header() {
    if (file_size_ < 8)
      fail<FormatError>(source_, " is ", file_size_, " bytes long; expected at least 8 (the header length)");
    std::uint64_t header = 0;
    for (int i = 7; i >= 0; --i) header = (header << 8) | static_cast<unsigned char>(bytes_[static_cast<std::size_t>(i)]);
    if (header > kMaxHeaderBytes)
      fail<FormatError>(source_, ": header length ", header, " exceeds the format's limit of ", kMaxHeaderBytes, " bytes");
    if (header > file_size_ - 8)
      fail<FormatError>(source_, ": header length ", header, " runs past the end of the file (", file_size_ - 8,
                        " bytes after the length); the file may be truncated");
    header_size_ = static_cast<std::size_t>(header);
    const nlohmann::json json = parse_json(bytes_.substr(8, header_size_), source_);
    if (!json.is_object()) fail<FormatError>(source_, ": the header is JSON but not an object");
    const std::uint64_t data_size = file_size_ - 8 - header_size_;

    for (const auto& [name, entry] : json.items()) {
      const std::string what = source_ + ": tensor " + name;
      if (name == "__metadata__") {
        if (!entry.is_object()) fail<FormatError>(source_, ": __metadata__ is not an object of strings");
        for (const auto& [key, value] : entry.items()) {
          if (!value.is_string()) fail<FormatError>(source_, ": __metadata__ value of \"", key, "\" is not a string");
          metadata_[key] = value.get<std::string>();
        }
        continue;
      }
      if (!entry.is_object()) fail<FormatError>(what, " is described by ", entry.type_name(), "; expected an object");
      for (const char* field : {"dtype", "shape", "data_offsets"})
        if (!entry.contains(field)) fail<FormatError>(what, " has no \"", field, "\"");
      TensorRecord t;
      t.name = name;
      const auto& dtype = entry.at("dtype");
      if (!dtype.is_string()) fail<FormatError>(what, " has dtype ", dtype.dump(), "; expected a string");
      const auto parsed = dtype_from_name(dtype.get<std::string>());
      if (!parsed)
        fail<FormatError>(what, " has dtype ", dtype.get<std::string>(), "; expected one of F32, F16, BF16, F64, I32");
      t.dtype = *parsed;
      const auto& shape = entry.at("shape");
      if (!shape.is_array()) fail<FormatError>(what, " has shape ", shape.dump(), "; expected an array");
      std::uint64_t count = 1;
      for (const auto& d : shape) {
        const std::uint64_t dim = to_count(d, what + " shape entry");
        if (dim > static_cast<std::uint64_t>(INT64_MAX) || (dim && count > UINT64_MAX / dim))
          fail<FormatError>(what, " has shape ", shape.dump(), " whose element count overflows");
        count *= dim;
        t.shape.push_back(static_cast<std::int64_t>(dim));
      }
      const auto& offsets = entry.at("data_offsets");
      if (!offsets.is_array() || offsets.size() != 2)
        fail<FormatError>(what, " has data_offsets ", offsets.dump(), "; expected [begin, end]");
      const std::uint64_t begin = to_count(offsets[0], what + " data_offsets"), end = to_count(offsets[1], what + " data_offsets");
      if (end < begin) fail<FormatError>(what, " has data_offsets [", begin, ", ", end, "] that end before they begin");
      if (end > data_size)
        fail<FormatError>(what, " has data_offsets [", begin, ", ", end, "] outside the ", data_size, " data bytes");
      if (count > UINT64_MAX / dtype_size(t.dtype) || count * dtype_size(t.dtype) != end - begin)
        fail<FormatError>(what, " has shape ", shape.dump(), " of ", dtype_name(t.dtype), " (", count,
                          " elements) but ", end - begin, " bytes in data_offsets");
      t.begin = static_cast<std::size_t>(begin);
      t.end = static_cast<std::size_t>(end);
      tensors_.push_back(std::move(t));
    }

    // The byte ranges must tile the data area exactly: no overlap, no gap, nothing left over.
    std::vector<const TensorRecord*> order;
    for (const auto& t : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
    std::size_t covered = 0;
    for (const TensorRecord* t : order) {
      if (t->begin < covered)
        fail<FormatError>(source_, ": tensor ", t->name, " overlaps another tensor's bytes (from ", t->begin, ")");
      if (t->begin > covered)
        fail<FormatError>(source_, ": bytes ", covered, " to ", t->begin, " belong to no tensor (before ", t->name, ")");
      covered = t->end;
    }
    if (covered != data_size)
      fail<FormatError>(source_, ": the tensors cover ", covered, " of the ", data_size, " data bytes; expected all of them");
  }

  std::string source_;
  std::string bytes_;          // the whole file, or its length and header only
  std::size_t file_size_ = 0;  // of the whole file
  std::size_t header_size_ = 0;
  std::vector<TensorRecord> tensors_;
  std::map<std::string, std::string> metadata_;
};

// ---- writing ----------------------------------------------------------------------------------

// A tensor ready to be written: its values already encoded in `dtype`.
struct EncodedTensor {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::string bytes;
};

// Encodes n values in dtype (F16/BF16 rounded to nearest even).
template <class Scalar>
EncodedTensor encode_tensor(std::string name, DType dtype, std::vector<std::int64_t> shape, const Scalar* values) {
  std::size_t n = 1;
  for (auto d : shape) n *= static_cast<std::size_t>(d);
  EncodedTensor t{std::move(name), dtype, std::move(shape), std::string(n * dtype_size(dtype), '\0')};
  char* out = t.bytes.data();
  for (std::size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::F64: { const double v = static_cast<double>(values[i]); std::memcpy(out + 8 * i, &v, 8); break; }
      case DType::F32: { const float v = static_cast<float>(values[i]); std::memcpy(out + 4 * i, &v, 4); break; }
      case DType::I32: { const auto v = static_cast<std::int32_t>(values[i]); std::memcpy(out + 4 * i, &v, 4); break; }
      case DType::F16: { const auto v = float_to_half(static_cast<float>(values[i])); std::memcpy(out + 2 * i, &v, 2); break; }
      case DType::BF16: { const auto v = float_to_bf16(static_cast<float>(values[i])); std::memcpy(out + 2 * i, &v, 2); break; }
    }
  }
  return t;
}

// Writes the tensors, in the given order, with "__metadata__": {"format": "pt"} so that Hugging
// Face tools accept the file; atomically (see write_file_atomically).
inline void write_safetensors(const std::filesystem::path& path, const std::vector<EncodedTensor>& tensors) {
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  std::size_t offset = 0;
  std::set<std::string> names;
  for (const auto& t : tensors) {
    if (!names.insert(t.name).second) fail<FormatError>("tensor ", t.name, " is given twice; expected unique names");
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  write_file_atomically(path, [&](std::ostream& out) {
    std::uint64_t length = text.size();
    char prefix[8];
    for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((length >> (8 * i)) & 0xffu);
    out.write(prefix, 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& t : tensors) out.write(t.bytes.data(), static_cast<std::streamsize>(t.bytes.size()));
  });
}

}  // namespace gqe
