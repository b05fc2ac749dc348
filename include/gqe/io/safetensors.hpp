#pragma once
// The safetensors format: an 8-byte little-endian header length, a JSON header naming each tensor's
// dtype, shape and byte range (relative to the end of the header), then the raw row-major data.
// Everything a file supplies is checked before use: sizes, JSON shape, duplicate names, dtypes,
// element counts against byte ranges, and that the ranges tile the data exactly. Nothing is read
// out of bounds and nothing is allocated beyond the file's own size.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/io/atomic_file.hpp"
#include "gqe/io/detail/json_text.hpp"
#include "gqe/io/mapped_file.hpp"
#include "gqe/tensor/dtype.hpp"

namespace gqe {

// ---- reading ----------------------------------------------------------------------------------

namespace detail {
inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
}  // namespace detail

struct TensorRecord {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte range inside the data area

  // Checked against the byte range when the file is read, so it cannot overflow.
  std::size_t numel() const {
    std::size_t n = 1;
    for (auto d : shape) n *= static_cast<std::size_t>(d);
    return n;
  }
  std::string shape_str() const { return detail::shape_text(shape); }
};

namespace detail {

// Reads a safetensors header event by event straight into TensorRecords. No JSON tree is built:
// a 100 MB header of nested or repeated values then costs memory in proportion to the tensors it
// describes, and nesting deeper than the format's three levels is refused as it is met.
class SafetensorsHeaderReader final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit SafetensorsHeaderReader(std::string source) : source_(std::move(source)) {}

  // Far beyond any real tensor's rank; bounds what one shape can make the reader store.
  static constexpr std::size_t kMaxRank = 64;

  std::vector<TensorRecord> tensors;         // in the order of the header
  std::map<std::string, std::size_t> index;  // name -> position in tensors
  std::map<std::string, std::string> metadata;
  // The offsets and element counts as the file gave them (64-bit), in the order of tensors.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> offsets;
  std::vector<std::uint64_t> elements;

  bool null() override { return scalar("null"); }
  bool boolean(bool v) override { return scalar(v ? "true" : "false"); }
  bool number_integer(number_integer_t v) override {
    if (v >= 0) return count(static_cast<std::uint64_t>(v));
    return scalar(std::to_string(v));
  }
  bool number_unsigned(number_unsigned_t v) override { return count(v); }
  bool number_float(number_float_t, const string_t& text) override { return scalar(printable(text, 40)); }
  bool string(string_t& v) override { return scalar("\"" + printable(v, 60) + "\"", &v); }
  bool binary(binary_t&) override { return scalar("binary data"); }

  bool start_object(std::size_t) override {
    switch (at_) {
      case At::start: at_ = At::top; return true;
      case At::top:
        if (key_ == "__metadata__") {
          at_ = At::metadata;
        } else {
          current_ = TensorRecord{};
          current_.name = key_;
          has_dtype_ = has_shape_ = has_offsets_ = false;
          at_ = At::entry;
        }
        return true;
      case At::entry: return nested("an object");
      case At::skip: ++skip_depth_; return true;
      default: return misplaced("an object");
    }
  }
  bool end_object() override {
    switch (at_) {
      case At::top: at_ = At::done; return true;
      case At::metadata: at_ = At::top; return true;
      case At::entry: finish_entry(); at_ = At::top; return true;
      case At::skip: return unskip();
      default: return true;
    }
  }
  bool start_array(std::size_t) override {
    switch (at_) {
      case At::entry:
        if (field_ == "shape") {
          at_ = At::shape;
          current_.shape.clear();
          elements_ = 1;
          return true;
        }
        if (field_ == "data_offsets") {
          at_ = At::offsets;
          offsets_.clear();
          return true;
        }
        return nested("an array");
      case At::skip: ++skip_depth_; return true;
      default: return misplaced("an array");
    }
  }
  bool end_array() override {
    if (at_ == At::skip) return unskip();
    if (at_ == At::offsets && offsets_.size() != 2)
      fail<FormatError>(tensor(), " has data_offsets with ", offsets_.size(), " values; expected [begin, end]");
    at_ = At::entry;
    return true;
  }
  bool key(string_t& k) override {
    if (at_ == At::top) {
      if (k == "__metadata__" ? std::exchange(seen_metadata_, true) : index.count(k) > 0)
        fail<FormatError>(source_, ": the header names \"", printable(k), "\" twice; expected unique names");
      key_ = k;
    } else if (at_ == At::metadata) {
      if (metadata.count(k)) fail<FormatError>(source_, ": __metadata__ names \"", printable(k), "\" twice");
      key_ = k;
    } else if (at_ == At::entry) {
      field_ = k;
      bool* seen = k == "dtype" ? &has_dtype_ : k == "shape" ? &has_shape_ : k == "data_offsets" ? &has_offsets_ : nullptr;
      if (seen && std::exchange(*seen, true)) fail<FormatError>(tensor(), " gives \"", k, "\" twice");
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    fail<FormatError>(source_, ": the header is not valid JSON (", printable(e.what(), 200), ")");
  }

 private:
  enum class At { start, top, metadata, entry, shape, offsets, skip, done };

  std::string tensor() const { return source_ + ": tensor " + printable(current_.name); }

  // A non-negative integer: a dimension, an offset, or else just a value.
  bool count(std::uint64_t v) {
    if (at_ == At::shape) {
      if (v > static_cast<std::uint64_t>(INT64_MAX) || (v != 0 && elements_ > UINT64_MAX / v))
        fail<FormatError>(tensor(), " has a shape whose element count overflows (dimension ", v, ")");
      if (current_.shape.size() >= kMaxRank)
        fail<FormatError>(tensor(), " has a shape of more than ", kMaxRank, " dimensions");
      elements_ *= v;
      current_.shape.push_back(static_cast<std::int64_t>(v));
      return true;
    }
    if (at_ == At::offsets) {
      if (offsets_.size() == 2) fail<FormatError>(tensor(), " has data_offsets with more than 2 values; expected [begin, end]");
      offsets_.push_back(v);
      return true;
    }
    return scalar(std::to_string(v));
  }

  // Any other scalar; `text` shows it in messages, `str` is set for a string.
  bool scalar(const std::string& text, const std::string* str = nullptr) {
    switch (at_) {
      case At::start: case At::done:
        fail<FormatError>(source_, ": the header is JSON but not an object");
      case At::top:
        if (key_ == "__metadata__" && text == "null") return true;  // no metadata, as the format's own reader takes it
        return misplaced(text);
      case At::metadata:
        if (!str) fail<FormatError>(source_, ": __metadata__ value of \"", printable(key_), "\" is ", text, "; expected a string");
        metadata[key_] = *str;
        return true;
      case At::entry:
        if (field_ == "dtype") {
          if (!str) fail<FormatError>(tensor(), " has dtype ", text, "; expected a string");
          const auto parsed = dtype_from_name(*str);
          if (!parsed) fail<FormatError>(tensor(), " has dtype ", printable(*str, 20), "; expected one of F32, F16, BF16, F64, I32");
          current_.dtype = *parsed;
        } else if (field_ == "shape") {
          fail<FormatError>(tensor(), " has shape ", text, "; expected an array of dimensions");
        } else if (field_ == "data_offsets") {
          fail<FormatError>(tensor(), " has data_offsets ", text, "; expected [begin, end]");
        }
        return true;  // other fields are not the reader's business
      case At::shape: fail<FormatError>(tensor(), " has shape entry ", text, "; expected a non-negative integer");
      case At::offsets: fail<FormatError>(tensor(), " has data_offsets entry ", text, "; expected a non-negative integer");
      case At::skip: return true;
    }
    return true;
  }

  // An object or array where the header allows none.
  bool misplaced(const std::string& what) {
    if (at_ == At::start) fail<FormatError>(source_, ": the header is JSON but not an object");
    if (at_ == At::top && key_ == "__metadata__")
      fail<FormatError>(source_, ": __metadata__ is ", what, "; expected an object of strings");
    if (at_ == At::top) fail<FormatError>(source_, ": tensor ", printable(key_), " is described by ", what, "; expected an object");
    if (at_ == At::metadata)
      fail<FormatError>(source_, ": __metadata__ value of \"", printable(key_), "\" is ", what, "; expected a string");
    fail<FormatError>(tensor(), " has ", what, " inside its ", at_ == At::shape ? "shape" : "data_offsets",
                      "; expected non-negative integers");
  }
  // An object or array as the value of a tensor entry's field: refused for the three fields the
  // format defines, skipped for any other.
  bool nested(const char* what) {
    if (field_ == "dtype") fail<FormatError>(tensor(), " has dtype given as ", what, "; expected a string");
    if (field_ == "shape") fail<FormatError>(tensor(), " has shape given as ", what, "; expected an array of dimensions");
    if (field_ == "data_offsets") fail<FormatError>(tensor(), " has data_offsets given as ", what, "; expected [begin, end]");
    at_ = At::skip;
    skip_depth_ = 1;
    return true;
  }
  bool unskip() {
    if (--skip_depth_ == 0) at_ = At::entry;
    return true;
  }
  void finish_entry() {
    for (const auto& [seen, field] : {std::pair{has_dtype_, "dtype"}, {has_shape_, "shape"}, {has_offsets_, "data_offsets"}})
      if (!seen) fail<FormatError>(tensor(), " has no \"", field, "\"; expected dtype, shape and data_offsets");
    current_.begin = static_cast<std::size_t>(std::min<std::uint64_t>(offsets_[0], SIZE_MAX));
    current_.end = static_cast<std::size_t>(std::min<std::uint64_t>(offsets_[1], SIZE_MAX));
    offsets.emplace_back(offsets_[0], offsets_[1]);
    elements.push_back(elements_);
    index.emplace(current_.name, tensors.size());
    tensors.push_back(std::move(current_));
  }

  std::string source_;
  At at_ = At::start;
  std::string key_, field_;
  bool seen_metadata_ = false, has_dtype_ = false, has_shape_ = false, has_offsets_ = false;
  int skip_depth_ = 0;
  TensorRecord current_;
  std::uint64_t elements_ = 1;
  std::vector<std::uint64_t> offsets_;
};

}  // namespace detail

class SafetensorsFile {
 public:
  static constexpr std::uint64_t kMaxHeaderBytes = 100000000;

  // Parses a whole file held in memory (the fuzzers' entry point); `source` names it in messages.
  static SafetensorsFile parse(std::string bytes, const std::string& source) {
    SafetensorsFile file;
    file.source_ = source;
    file.bytes_ = FileBytes::hold(std::move(bytes));
    file.file_size_ = file.bytes_->size();
    file.parse_header(file.bytes_->data());
    return file;
  }

  // Opens and checks a file: the header is parsed and every tensor's byte range checked against
  // the file's size before any tensor byte is read. The values are mapped (map = true, falling
  // back to reading where mapping fails) or read into memory; with header_only they are neither
  // (the records are still checked against the file's size).
  static SafetensorsFile read(const std::filesystem::path& path, bool header_only = false, bool map = true) {
    SafetensorsFile file;
    file.source_ = path.string();
    if (!header_only) {
      // Read, the data gets a line boundary whatever the header's length (mapped, the file decides).
      file.bytes_ = FileBytes::open(path, map, map ? 0 : data_start_hint(path));
      file.file_size_ = file.bytes_->size();
      file.parse_header(file.bytes_->data());
      return file;
    }
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
      fail<IoError>(path.string(), " does not exist or is not a file; expected a safetensors file");
    file.file_size_ = static_cast<std::size_t>(std::filesystem::file_size(path, ec));
    if (ec) fail<IoError>("cannot read the size of ", path.string(), ": ", ec.message());
    std::string head = FileBytes::read_range(path, 0, std::min<std::size_t>(8, file.file_size_));
    if (head.size() == 8) {
      const std::uint64_t header = declared_header_size(reinterpret_cast<const unsigned char*>(head.data()));
      if (header <= kMaxHeaderBytes && header <= file.file_size_ - 8)
        head = FileBytes::read_range(path, 0, 8 + static_cast<std::size_t>(header));
    }
    file.parse_header(reinterpret_cast<const unsigned char*>(head.data()));  // refuses a short file or a bad length
    return file;
  }

  const std::string& source() const { return source_; }
  // In the order of the header.
  const std::vector<TensorRecord>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Whether the values are mapped from the file (rather than read into memory).
  bool mapped() const { return bytes_ && bytes_->mapped(); }
  // The whole file's length in bytes.
  std::size_t file_size() const { return file_size_; }

  const TensorRecord* find(const std::string& name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  const TensorRecord& at(const std::string& name) const {
    if (const TensorRecord* t = find(name)) return *t;
    fail<FormatError>("tensor ", detail::printable(name), " is missing from ", source_);
  }

  // The record's bytes as stored (little-endian, row-major, any alignment), valid while the file
  // (or a copy of keep_alive()) lives.
  const unsigned char* data(const TensorRecord& t) const { return data_begin() + t.begin; }
  std::string_view raw_bytes(const TensorRecord& t) const {
    return {reinterpret_cast<const char*>(data(t)), t.end - t.begin};
  }
  // Gives the mapped pages within [begin, begin + bytes) back (FileBytes::release): for values
  // that have been copied elsewhere and will not be read from here again.
  void release(const void* begin, std::size_t bytes) const {
    if (bytes_) bytes_->release(begin, bytes);
  }
  // Keeps the values alive (weights borrowed from the file hold it).
  std::shared_ptr<const void> keep_alive() const {
    require_values();
    return bytes_;
  }

  // The record's values converted to Scalar, written to out[0 .. numel). Float types take any
  // dtype (F16 and BF16 widen exactly); integer types take I32 only.
  template <class Scalar>
  void read_into(const TensorRecord& t, Scalar* out) const {
    static_assert(std::is_arithmetic_v<Scalar>, "read_into converts to a number type");
    if constexpr (std::is_integral_v<Scalar>) {
      if (t.dtype != DType::I32)
        fail<FormatError>("tensor ", detail::printable(t.name), " in ", source_, " has dtype ", dtype_name(t.dtype),
                          "; expected I32 for integer values");
    }
    convert_values(data(t), t.dtype, t.numel(), out);
  }
  template <class Scalar>
  std::vector<Scalar> read_as(const std::string& name) const {
    const TensorRecord& t = at(name);
    std::vector<Scalar> values(t.numel());
    read_into(t, values.data());
    return values;
  }

 private:
  void require_values() const {
    if (!bytes_) fail<IoError>(source_, " was read for its header only; its values are not loaded");
  }
  const unsigned char* data_begin() const {
    require_values();
    return bytes_->data() + 8 + header_size_;
  }
  static std::uint64_t declared_header_size(const unsigned char* bytes) {
    std::uint64_t header = 0;
    for (int i = 7; i >= 0; --i) header = (header << 8) | bytes[i];
    return header;
  }

  // `bytes` holds at least the length and the header (when the length is sane); file_size_ is
  // the whole file's.
  void parse_header(const unsigned char* bytes) {
    if (file_size_ < 8)
      fail<FormatError>(source_, " is ", file_size_, " bytes long; expected at least 8 (the header length)");
    const std::uint64_t header = declared_header_size(bytes);
    if (header > kMaxHeaderBytes)
      fail<FormatError>(source_, ": header length ", header, " exceeds the format's limit of ", kMaxHeaderBytes, " bytes");
    if (header > file_size_ - 8)
      fail<FormatError>(source_, ": header length ", header, " runs past the end of the file (", file_size_ - 8,
                        " bytes after the length); the file may be truncated");
    header_size_ = static_cast<std::size_t>(header);
    detail::SafetensorsHeaderReader reader(source_);
    const char* text = reinterpret_cast<const char*>(bytes) + 8;
    detail::require_plain_json(text, header_size_, source_ + ": the header");
    if (!nlohmann::json::sax_parse(text, text + header_size_, &reader))
      fail<FormatError>(source_, ": the header is not valid JSON");
    const std::uint64_t data_size = file_size_ - 8 - header_size_;

    for (std::size_t i = 0; i < reader.tensors.size(); ++i) {
      const TensorRecord& t = reader.tensors[i];
      const auto [begin, end] = reader.offsets[i];
      const std::uint64_t elements = reader.elements[i];
      const std::string what = source_ + ": tensor " + detail::printable(t.name);
      if (end < begin) fail<FormatError>(what, " has data_offsets [", begin, ", ", end, "] that end before they begin");
      if (end > data_size)
        fail<FormatError>(what, " has data_offsets [", begin, ", ", end, "] outside the ", data_size, " data bytes");
      if (elements > UINT64_MAX / dtype_size(t.dtype) || elements * dtype_size(t.dtype) != end - begin)
        fail<FormatError>(what, " has shape ", t.shape_str(), " of ", dtype_name(t.dtype), " (", elements,
                          " elements) but ", end - begin, " bytes in data_offsets");
    }

    // The byte ranges must tile the data area exactly: no overlap, no gap, nothing left over.
    std::vector<const TensorRecord*> order;
    for (const auto& t : reader.tensors) order.push_back(&t);
    std::sort(order.begin(), order.end(),
              [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
    std::size_t covered = 0;
    for (const TensorRecord* t : order) {
      if (t->begin < covered)
        fail<FormatError>(source_, ": tensor ", detail::printable(t->name), " overlaps another tensor's bytes (from ",
                          t->begin, ")");
      if (t->begin > covered)
        fail<FormatError>(source_, ": bytes ", covered, " to ", t->begin, " belong to no tensor (before ",
                          detail::printable(t->name), ")");
      covered = t->end;
    }
    if (covered != data_size)
      fail<FormatError>(source_, ": the tensors cover ", covered, " of the ", data_size, " data bytes; expected all of them");
    tensors_ = std::move(reader.tensors);
    index_ = std::move(reader.index);
    metadata_ = std::move(reader.metadata);
  }

  std::string source_;
  // Where the data would start by the file's first 8 bytes (only an alignment hint: the header is
  // checked when parsed); 0 when they cannot be read.
  static std::size_t data_start_hint(const std::filesystem::path& path) {
    unsigned char head[8] = {};
    std::ifstream in(path, std::ios::binary);
    if (!in.read(reinterpret_cast<char*>(head), 8)) return 0;
    return static_cast<std::size_t>((8 + declared_header_size(head)) % 64);
  }

  std::shared_ptr<const FileBytes> bytes_;  // the whole file; null when read for its header only
  std::size_t file_size_ = 0;               // of the whole file
  std::size_t header_size_ = 0;
  std::vector<TensorRecord> tensors_;
  std::map<std::string, std::size_t> index_;
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

namespace detail {
inline std::size_t checked_numel(const std::string& name, const std::vector<std::int64_t>& shape) {
  std::size_t n = 1;
  for (auto d : shape) {
    if (d < 0) fail<ShapeError>("tensor ", printable(name), " has dimension ", d, "; expected >= 0");
    if (d != 0 && n > SIZE_MAX / 8 / static_cast<std::size_t>(d))
      fail<ShapeError>("tensor ", printable(name), " has too many elements to write");
    n *= static_cast<std::size_t>(d);
  }
  return n;
}
}  // namespace detail

// Encodes shape's element count of values in dtype: F16 and BF16 round to nearest even; I32 takes
// integral values within its range only (expert indices, token ids), anything else is refused.
template <class Scalar>
EncodedTensor encode_tensor(std::string name, DType dtype, std::vector<std::int64_t> shape, const Scalar* values) {
  const std::size_t n = detail::checked_numel(name, shape);
  EncodedTensor t{std::move(name), dtype, std::move(shape), std::string(n * dtype_size(dtype), '\0')};
  char* out = t.bytes.data();
  for (std::size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::F64: { const double v = static_cast<double>(values[i]); std::memcpy(out + 8 * i, &v, 8); break; }
      case DType::F32: { const float v = static_cast<float>(values[i]); std::memcpy(out + 4 * i, &v, 4); break; }
      case DType::I32: {
        const auto wide = static_cast<double>(values[i]);  // exact for every int32 and every float
        if (!(wide >= -2147483648.0 && wide <= 2147483647.0) || wide != std::floor(wide))
          fail<InputError>("tensor ", detail::printable(t.name), " value ", values[i], " at ", i,
                           " cannot be stored as I32; expected an integer within 32 bits");
        const auto v = static_cast<std::int32_t>(wide);
        std::memcpy(out + 4 * i, &v, 4);
        break;
      }
      case DType::F16: { const auto v = float_to_half(static_cast<float>(values[i])); std::memcpy(out + 2 * i, &v, 2); break; }
      case DType::BF16: { const auto v = float_to_bf16(static_cast<float>(values[i])); std::memcpy(out + 2 * i, &v, 2); break; }
    }
  }
  return t;
}

// Writes the tensors, in the given order, with "__metadata__": {"format": "pt"} so that Hugging
// Face tools accept the file; atomically (see write_file_atomically). The header is padded with
// spaces so that the data starts on a 64-byte boundary (the format asks for 8): mapped, a tensor
// whose predecessors' sizes are multiples of 64 bytes then starts on a cache line, which the
// decode kernels stream fastest.
inline void write_safetensors(const std::filesystem::path& path, const std::vector<EncodedTensor>& tensors) {
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  std::size_t offset = 0;
  std::set<std::string> names;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__" || !names.insert(t.name).second)
      fail<ShapeError>("tensor name ", detail::printable(t.name), " is reserved or given twice; expected unique names");
    const std::size_t expected = detail::checked_numel(t.name, t.shape) * dtype_size(t.dtype);
    if (t.bytes.size() != expected)
      fail<ShapeError>("tensor ", detail::printable(t.name), " of shape ", detail::shape_text(t.shape), " holds ",
                       t.bytes.size(), " bytes; expected ", expected, " for ", dtype_name(t.dtype));
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // a name that is not valid UTF-8
    fail<ShapeError>("cannot write ", path.string(), ": ", e.what());
  }
  text.append((64 - (8 + text.size()) % 64) % 64, ' ');
  write_file_atomically(path, [&](std::ostream& out) {
    const std::uint64_t length = text.size();
    char prefix[8];
    for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((length >> (8 * i)) & 0xffu);
    out.write(prefix, 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& t : tensors) out.write(t.bytes.data(), static_cast<std::streamsize>(t.bytes.size()));
  });
}

}  // namespace gqe
