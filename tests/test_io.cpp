// Checkpoint io: half and bfloat16 conversions against slow definitions from the IEEE formats,
// safetensors round trips for every dtype (also with unaligned data), each malformed file refused
// with a message naming what is wrong, atomic writes, config.json defaults and refusals, checkpoint
// round trips, the fixtures of tests/data, and every folder of tests/bad_checkpoints refused with
// the message its README promises.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif
#if defined(__linux__)
#include <sys/sysmacros.h>
#endif

#include "gqe/gqe.hpp"

namespace {

namespace fs = std::filesystem;
using gqe::DType;

// ---- half and bfloat16 ------------------------------------------------------------------------

// binary16 by its definition: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals (-1)^s * 2^-14 * m/1024.
double half_by_definition(std::uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(m / 1024.0, -14);
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  return sign * std::ldexp(1.0 + m / 1024.0, e - 15);
}

float float_from_bits(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

TEST(Half, EveryBitPatternDecodesAsDefinedAndEncodesBack) {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const double want = half_by_definition(h);
    const float got = gqe::half_to_float(h);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << bits;
      EXPECT_TRUE(std::isnan(gqe::half_to_float(gqe::float_to_half(got)))) << bits;
      continue;
    }
    ASSERT_EQ(static_cast<double>(got), want) << "half bits " << bits;
    ASSERT_EQ(std::signbit(got), (bits & 0x8000u) != 0) << "half bits " << bits;  // -0 stays -0
    ASSERT_EQ(gqe::float_to_half(got), h) << "half bits " << bits;
  }
}

// Every rounding boundary: halfway between two neighbouring halves (exact in float) rounds to the
// one with an even mantissa, and one float step either side rounds to the nearer one. Covers the
// subnormals, the carry into the exponent and the overflow to infinity above 65504.
TEST(Half, EveryMidpointRoundsToNearestEven) {
  for (std::uint16_t h = 0; h < 0x7c00; ++h) {
    for (const std::uint16_t sign : {std::uint16_t(0), std::uint16_t(0x8000)}) {
      const auto lo = static_cast<std::uint16_t>(sign | h), hi = static_cast<std::uint16_t>(sign | (h + 1));
      // Above the largest half, 65504, rounding goes as if to 65536, which is infinity.
      const double a = half_by_definition(lo), b = h == 0x7bff ? std::copysign(65536.0, a) : half_by_definition(hi);
      const auto mid = static_cast<float>((a + b) / 2);
      ASSERT_EQ(static_cast<double>(mid), (a + b) / 2);
      ASSERT_EQ(gqe::float_to_half(mid), (h & 1) ? hi : lo) << "between half bits " << lo << " and " << hi;
      const float toward_lo = std::nextafter(mid, static_cast<float>(a)), toward_hi = std::nextafter(mid, static_cast<float>(b));
      ASSERT_EQ(gqe::float_to_half(toward_lo), lo) << toward_lo;
      ASSERT_EQ(gqe::float_to_half(toward_hi), hi) << toward_hi;
    }
  }
}

TEST(Half, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(gqe::float_to_half(inf), 0x7c00);
  EXPECT_EQ(gqe::float_to_half(-inf), 0xfc00);
  EXPECT_EQ(gqe::float_to_half(1e10f), 0x7c00);
  EXPECT_EQ(gqe::float_to_half(65504.0f), 0x7bff);
  EXPECT_EQ(gqe::float_to_half(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(gqe::float_to_half(std::ldexp(1.0f, -25)), 0x0000);  // half of it: ties to even (zero)
  EXPECT_EQ(gqe::float_to_half(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(gqe::float_to_half(-std::ldexp(1.0f, -30)), 0x8000);  // underflow keeps the sign
  EXPECT_EQ(gqe::float_to_half(std::numeric_limits<float>::denorm_min()), 0x0000);
  const std::uint16_t nan = gqe::float_to_half(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x03ff, 0);
}

// bfloat16 is the top half of a float: decoding is exact, and encoding rounds the dropped 16 bits.
TEST(BFloat16, EveryBitPatternDecodesAsTheTopOfAFloatAndEveryMidpointRoundsToEven) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float x = float_from_bits(b << 16);
    const float got = gqe::bf16_to_float(static_cast<std::uint16_t>(b));
    if (std::isnan(x)) {
      ASSERT_TRUE(std::isnan(got));
      ASSERT_TRUE(std::isnan(gqe::bf16_to_float(gqe::float_to_bf16(x)))) << b;
      continue;
    }
    ASSERT_EQ(std::memcmp(&got, &x, 4), 0) << b;
    ASSERT_EQ(gqe::float_to_bf16(x), b) << b;
    if ((b & 0x7f80u) == 0x7f80u) continue;  // infinity: no upper neighbour
    const std::uint32_t mid = (b << 16) | 0x8000u;  // halfway to the next bfloat16 up in magnitude
    const auto up = static_cast<std::uint16_t>(b + 1);
    ASSERT_EQ(gqe::float_to_bf16(float_from_bits(mid)), (b & 1u) ? up : b) << b;
    ASSERT_EQ(gqe::float_to_bf16(float_from_bits(mid - 1)), b) << b;
    ASSERT_EQ(gqe::float_to_bf16(float_from_bits(mid + 1)), up) << b;
  }
}

TEST(BFloat16, RandomFloatsRoundToNearestEven) {
  std::mt19937 rng(6);
  std::uniform_int_distribution<std::uint32_t> bits_dist;
  for (int i = 0; i < 100000; ++i) {
    const std::uint32_t bits = bits_dist(rng);
    const float x = float_from_bits(bits);
    const std::uint16_t b = gqe::float_to_bf16(x);
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(gqe::bf16_to_float(b)));
      continue;
    }
    // The two bfloat16 neighbours of x and the closer (ties to the even mantissa).
    const std::uint32_t low = bits & 0xffff0000u, high = low + 0x10000u, rest = bits & 0xffffu;
    const std::uint32_t want = rest > 0x8000u || (rest == 0x8000u && ((low >> 16) & 1u)) ? high : low;
    EXPECT_EQ(b, static_cast<std::uint16_t>(want >> 16)) << std::hex << bits;
  }
}

// ---- safetensors files ------------------------------------------------------------------------

// A file whose header is written by hand, as docs/checkpoints.md lays it out.
std::string raw_file(const std::string& header, const std::string& data) {
  std::string s(8, '\0');
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s + header + data;
}

// The FormatError's message, or "" when the bytes parse.
std::string refusal(const std::string& bytes) {
  try {
    gqe::SafetensorsFile::parse(bytes, "test.safetensors");
  } catch (const gqe::FormatError& e) {
    return e.what();
  }
  return "";
}

// A fresh folder of its own for each test, also when ctest runs several test processes at once;
// every one is removed when the process ends.
fs::path scratch(const std::string& name) {
  struct Folders {
    std::vector<fs::path> paths;
    ~Folders() {
      for (const auto& p : paths) {
        std::error_code ignored;
        fs::remove_all(p, ignored);
      }
    }
  };
  static Folders made;
#if defined(__unix__) || defined(__APPLE__)
  const std::string process = std::to_string(::getpid());
#else
  const std::string process = "0";
#endif
  const fs::path p = fs::temp_directory_path() / ("gqe-test-io-" + process + "-" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  made.paths.push_back(p);
  return p;
}

std::string file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(Safetensors, RoundTripsEveryDtypeInTheGivenOrder) {
  const fs::path dir = scratch("roundtrip");
  const std::vector<double> values = {0.0, -1.5, 3.25, 1e-3, -65504.0, 0.1, 1e-7, -0.0};
  const std::vector<double> integers = {0, -1, 7, 2147483647, -2147483648.0, 12, 3, 4};
  std::vector<gqe::EncodedTensor> tensors;
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16})
    tensors.push_back(gqe::encode_tensor(gqe::dtype_name(t), t, {2, 4}, values.data()));
  tensors.push_back(gqe::encode_tensor("I32", DType::I32, {8}, integers.data()));
  tensors.push_back(gqe::encode_tensor("empty", DType::F32, {0, 3}, values.data()));
  tensors.push_back(gqe::encode_tensor("scalar", DType::F32, {}, values.data() + 2));
  std::swap(tensors[0], tensors[3]);  // not in name order: the writer keeps the given order
  gqe::write_safetensors(dir / "t.safetensors", tensors);

  const std::string bytes = file_bytes(dir / "t.safetensors");
  std::uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = header << 8 | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  EXPECT_EQ((8 + header) % 64, 0u);  // padded so that the data starts on a cache line
  EXPECT_EQ(bytes.find("{\"__metadata__\":{\"format\":\"pt\"}"), 8u);

  const auto file = gqe::SafetensorsFile::read(dir / "t.safetensors");
  EXPECT_EQ(file.metadata().at("format"), "pt");
  ASSERT_EQ(file.tensors().size(), tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(file.tensors()[i].name, tensors[i].name);
    EXPECT_EQ(file.tensors()[i].dtype, tensors[i].dtype);
    EXPECT_EQ(file.tensors()[i].shape, tensors[i].shape);
    EXPECT_EQ(file.raw_bytes(file.tensors()[i]), tensors[i].bytes);
    if (i > 0) {
      EXPECT_EQ(file.tensors()[i].begin, file.tensors()[i - 1].end);
    }
  }
  EXPECT_EQ(file.read_as<double>("F64"), values);
  const auto f32 = file.read_as<double>("F32"), f16 = file.read_as<double>("F16"), bf16 = file.read_as<double>("BF16");
  for (std::size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(f32[i], static_cast<double>(static_cast<float>(values[i])));
    EXPECT_EQ(f16[i], gqe::half_to_float(gqe::float_to_half(static_cast<float>(values[i]))));
    EXPECT_EQ(bf16[i], gqe::bf16_to_float(gqe::float_to_bf16(static_cast<float>(values[i]))));
  }
  EXPECT_EQ(file.read_as<std::int32_t>("I32"), (std::vector<std::int32_t>{0, -1, 7, 2147483647, -2147483647 - 1, 12, 3, 4}));
  EXPECT_EQ(file.read_as<float>("I32")[2], 7.0f);
  EXPECT_TRUE(file.read_as<float>("empty").empty());
  EXPECT_EQ(file.read_as<float>("scalar"), std::vector<float>{3.25f});
  EXPECT_EQ(file.at("F16").shape, (std::vector<std::int64_t>{2, 4}));
  // Integers are read from I32 only; floats are not truncated silently.
  EXPECT_THROW(file.read_as<std::int32_t>("F32"), gqe::FormatError);
  EXPECT_THROW(file.at("nope"), gqe::FormatError);
  // Header only: records without values.
  const auto header_only = gqe::SafetensorsFile::read(dir / "t.safetensors", true);
  EXPECT_EQ(header_only.tensors().size(), tensors.size());
  EXPECT_THROW(header_only.read_as<float>("F32"), gqe::IoError);
}

TEST(Safetensors, WriterRefusesWhatItCannotWriteFaithfully) {
  const fs::path dir = scratch("writer");
  const std::vector<float> v = {1.0f, 2.5f};
  EXPECT_THROW(gqe::encode_tensor("ids", DType::I32, {2}, v.data()), gqe::InputError);  // 2.5 is no int32
  const std::vector<double> big = {3e9};
  EXPECT_THROW(gqe::encode_tensor("ids", DType::I32, {1}, big.data()), gqe::InputError);
  EXPECT_THROW(gqe::encode_tensor("w", DType::F32, {-1}, v.data()), gqe::ShapeError);
  auto a = gqe::encode_tensor("a", DType::F32, {2}, v.data());
  EXPECT_THROW(gqe::write_safetensors(dir / "x.safetensors", {a, a}), gqe::ShapeError);
  auto wrong = a;
  wrong.shape = {3};
  EXPECT_THROW(gqe::write_safetensors(dir / "x.safetensors", {wrong}), gqe::ShapeError);
  auto reserved = a;
  reserved.name = "__metadata__";
  EXPECT_THROW(gqe::write_safetensors(dir / "x.safetensors", {reserved}), gqe::ShapeError);
  EXPECT_TRUE(fs::is_empty(dir));
}

TEST(Safetensors, ReadsUnalignedData) {
  // A 2-byte F16 first puts the F32 at data offset 2 and the F64 at 6, and a header of odd length
  // puts the data area itself at an odd file offset: no value is aligned in memory.
  const float value = 2.5f;
  const double wide = -0.375;
  const std::string data = std::string("\x00\x3c", 2) + std::string(reinterpret_cast<const char*>(&value), 4) +
                           std::string(reinterpret_cast<const char*>(&wide), 8);
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"x":{"dtype":"F32","shape":[1],"data_offsets":[2,6]},)"
      R"("y":{"dtype":"F64","shape":[1],"data_offsets":[6,14]}}  )";
  ASSERT_EQ((8 + header.size()) % 2, 1u);
  const auto file = gqe::SafetensorsFile::parse(raw_file(header, data), "unaligned");
  EXPECT_EQ(file.read_as<float>("h")[0], 1.0f);
  EXPECT_EQ(file.read_as<float>("x")[0], 2.5f);
  EXPECT_EQ(file.read_as<double>("y")[0], -0.375);
}

// Read rather than mapped, a file's data lands on a 64-byte boundary whatever its header's length
// (the decode kernels stream aligned rows fastest); the values are the mapped file's.
TEST(Safetensors, ReadFilesGetTheirDataOnALineBoundary) {
  const fs::path dir = scratch("read-aligned");
  std::string data;
  for (int i = 0; i < 20; ++i) {
    const float v = 0.25f * static_cast<float>(i) - 1.0f;
    data += std::string(reinterpret_cast<const char*>(&v), 4);
  }
  for (const std::string pad : {"", " ", "         "}) {
    const std::string header = R"({"w":{"dtype":"F32","shape":[4,5],"data_offsets":[0,80]}})" + pad;
    std::ofstream(dir / "w.safetensors", std::ios::binary) << raw_file(header, data);
    const auto read = gqe::SafetensorsFile::read(dir / "w.safetensors", false, false);
    const auto mapped = gqe::SafetensorsFile::read(dir / "w.safetensors", false, true);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(read.data(read.at("w"))) % 64, 0u) << "header of " << header.size() << " bytes";
    EXPECT_EQ(read.raw_bytes(read.at("w")), data);
    EXPECT_EQ(mapped.raw_bytes(mapped.at("w")), data);
  }
  fs::remove_all(dir);
}

TEST(Safetensors, AcceptsWhatTheFormatAllows) {
  const std::string eight(8, '\0');
  // No __metadata__, unknown fields inside an entry (skipped however nested), zero-size tensors.
  EXPECT_EQ(refusal(raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":{"y":[[1],{"z":2}]}},)"
                             R"("e":{"dtype":"F16","shape":[0,5],"data_offsets":[8,8]}})",
                             eight)),
            "");
  EXPECT_EQ(refusal(raw_file("{}", "")), "");
  EXPECT_EQ(refusal(raw_file(R"({"__metadata__":{}})", "")), "");
  // A null __metadata__ is none, as the format's own reader takes it; the tensors still read.
  EXPECT_EQ(refusal(raw_file(R"({"__metadata__":null,"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight)), "");
}

struct Case {
  const char* what;
  std::string bytes;
  std::vector<std::string> says;  // each must appear in the message
};

TEST(Safetensors, RefusesMalformedFilesNamingTheProblem) {
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string eight(8, '\0');
  const auto with = [&](const std::string& header) { return raw_file(header, eight); };
  const auto entry = [&](const std::string& fields) { return with(R"({"w":{)" + fields + "}}"); };
  std::string huge = raw_file(ok, eight);
  huge[3] = 0x10;  // a 268 MB header length
  std::string deep_shape = R"({"w":{"dtype":"F32","shape":)" + std::string(50000, '[') + std::string(50000, ']') +
                           R"(,"data_offsets":[0,8]}})";
  std::string ones_65 = "1";
  for (int i = 1; i < 65; ++i) ones_65 += ",1";
  const std::vector<Case> cases = {
      {"shorter than 8 bytes", "1234567", {"7 bytes long", "at least 8"}},
      {"header beyond the file", raw_file(ok, eight).substr(0, 20), {"header length 54", "past the end"}},
      {"header over the limit", huge, {"exceeds the format's limit of 100000000"}},
      {"invalid JSON", with("{oops"), {"not valid JSON"}},
      {"trailing text", with(ok + " 1"), {"not valid JSON"}},
      {"empty header", with(""), {"not valid JSON"}},
      {"not an object", with("[1,2]"), {"not an object"}},
      {"a number", with("5"), {"not an object"}},
      {"duplicate names", with(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
       {"\"w\" twice"}},
      {"duplicate __metadata__", with(R"({"__metadata__":{},"__metadata__":{},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
       {"\"__metadata__\" twice"}},
      {"entry not an object", with(R"({"w":[1,2]})"), {"tensor w is described by an array"}},
      {"entry a string", with(R"({"w":"F32"})"), {"tensor w is described by \"F32\""}},
      {"no dtype", entry(R"("shape":[2],"data_offsets":[0,8])"), {"tensor w", "no \"dtype\""}},
      {"no shape", entry(R"("dtype":"F32","data_offsets":[0,8])"), {"tensor w", "no \"shape\""}},
      {"no offsets", entry(R"("dtype":"F32","shape":[2])"), {"tensor w", "no \"data_offsets\""}},
      {"field twice", entry(R"("dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8])"), {"tensor w", "\"dtype\" twice"}},
      {"dtype a number", entry(R"("dtype":4,"shape":[2],"data_offsets":[0,8])"), {"tensor w", "dtype 4"}},
      {"dtype an object", entry(R"("dtype":{},"shape":[2],"data_offsets":[0,8])"), {"tensor w", "dtype given as an object"}},
      {"unknown dtype", entry(R"("dtype":"F8","shape":[2],"data_offsets":[0,8])"), {"tensor w", "dtype F8"}},
      {"shape a string", entry(R"("dtype":"F32","shape":"2","data_offsets":[0,8])"), {"tensor w", "shape \"2\""}},
      {"shape of strings", entry(R"("dtype":"F32","shape":["2"],"data_offsets":[0,8])"), {"tensor w", "shape entry \"2\""}},
      {"shape of floats", entry(R"("dtype":"F32","shape":[2.0],"data_offsets":[0,8])"), {"tensor w", "shape entry 2.0"}},
      {"shape of bools", entry(R"("dtype":"F32","shape":[true],"data_offsets":[0,8])"), {"tensor w", "shape entry true"}},
      {"negative dimension", entry(R"("dtype":"F32","shape":[-2],"data_offsets":[0,8])"), {"tensor w", "-2", "non-negative"}},
      {"shape nested deep", with(deep_shape), {"tensor w", "inside its shape"}},
      {"too many dimensions", entry(R"("dtype":"F32","shape":[)" + ones_65 + R"(],"data_offsets":[0,8])"),
       {"tensor w", "more than 64 dimensions"}},
      {"count overflows", entry(R"("dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8])"),
       {"tensor w", "overflows"}},
      {"bytes overflow", entry(R"("dtype":"F64","shape":[4294967296,1073741824],"data_offsets":[0,8])"),
       {"tensor w", "has shape [4294967296, 1073741824]"}},
      {"dimension beyond int64", entry(R"("dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8])"),
       {"tensor w", "overflows"}},
      {"count against bytes", entry(R"("dtype":"F32","shape":[3],"data_offsets":[0,8])"),
       {"tensor w has shape [3] of F32 (3 elements) but 8 bytes"}},
      {"offsets a number", entry(R"("dtype":"F32","shape":[2],"data_offsets":8)"), {"tensor w", "data_offsets 8"}},
      {"one offset", entry(R"("dtype":"F32","shape":[2],"data_offsets":[8])"), {"tensor w", "1 values"}},
      {"three offsets", entry(R"("dtype":"F32","shape":[2],"data_offsets":[0,8,8])"), {"tensor w", "more than 2 values"}},
      {"negative offset", entry(R"("dtype":"F32","shape":[2],"data_offsets":[-8,0])"), {"tensor w", "data_offsets entry -8"}},
      {"offset beyond 64 bits", entry(R"("dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616])"),
       {"tensor w", "data_offsets entry 18446744073709551616"}},
      {"end before begin", entry(R"("dtype":"F32","shape":[0],"data_offsets":[8,0])"), {"tensor w", "end before they begin"}},
      {"out of range", entry(R"("dtype":"F32","shape":[2],"data_offsets":[8,16])"), {"tensor w", "outside the 8 data bytes"}},
      {"overlap", with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"),
       {"tensor b overlaps"}},
      {"gap", with(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F16","shape":[1],"data_offsets":[6,8]}})"),
       {"bytes 4 to 6 belong to no tensor (before b)"}},
      {"leading gap", entry(R"("dtype":"F32","shape":[1],"data_offsets":[4,8])"), {"bytes 0 to 4 belong to no tensor"}},
      {"bytes left over", raw_file(ok, eight + "1234"), {"cover 8 of the 12"}},
      {"metadata not an object", with(R"({"__metadata__":["pt"],"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
       {"__metadata__ is an array"}},
      {"metadata a string", with(R"({"__metadata__":"pt","w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
       {"__metadata__ is \"pt\""}},
      {"metadata value a number", with(R"({"__metadata__":{"format":1},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
       {"__metadata__ value of \"format\" is 1"}},
      {"metadata value an object", with(R"({"__metadata__":{"format":{}},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
       {"__metadata__ value of \"format\" is an object"}},
      {"metadata key twice", with(R"({"__metadata__":{"a":"x","a":"y"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
       {"__metadata__ names \"a\" twice"}},
      {"a name with a newline", with(R"({"a\nb":7})"), {"tensor a\\x0ab is described by 7"}},
  };
  for (const Case& c : cases) {
    const std::string message = refusal(c.bytes);
    ASSERT_NE(message, "") << c.what << ": accepted";
    EXPECT_EQ(message.find('\n'), std::string::npos) << c.what << ": " << message;
    EXPECT_EQ(message.rfind("test.safetensors", 0), 0u) << c.what << ": " << message;  // names the file
    for (const std::string& piece : c.says) EXPECT_NE(message.find(piece), std::string::npos) << c.what << ": " << message;
  }
  EXPECT_EQ(refusal(raw_file(ok, eight)), "");  // and the well-formed one is accepted
}

TEST(Safetensors, ReadRefusesMissingFilesAndFolders) {
  const fs::path dir = scratch("read");
  EXPECT_THROW(gqe::SafetensorsFile::read(dir / "none.safetensors"), gqe::IoError);
  EXPECT_THROW(gqe::SafetensorsFile::read(dir), gqe::IoError);
  // A truncated file is refused from its header alone, before its data is read.
  { std::ofstream(dir / "short.safetensors", std::ios::binary) << raw_file("{}", "").substr(0, 9); }
  EXPECT_THROW(gqe::SafetensorsFile::read(dir / "short.safetensors"), gqe::FormatError);
}

// ---- atomic writes ------------------------------------------------------------------------------

TEST(AtomicWrite, FailureLeavesNothingUnderTheFinalNameOrBeside) {
  const fs::path dir = scratch("atomic");
  const fs::path target = dir / "out.safetensors";
  EXPECT_THROW(gqe::write_file_atomically(target, [](std::ostream&) { throw gqe::IoError("disk full"); }), gqe::IoError);
  EXPECT_TRUE(fs::is_empty(dir));
  EXPECT_THROW(gqe::write_file_atomically(dir / "missing" / "x", [](std::ostream& o) { o << "x"; }), gqe::IoError);
  EXPECT_THROW(gqe::write_file_atomically(dir, [](std::ostream& o) { o << "x"; }), gqe::IoError);  // a folder
  EXPECT_TRUE(fs::is_empty(dir));
  // An existing file is replaced whole, never truncated first.
  gqe::write_file_atomically(target, [](std::ostream& o) { o << "first"; });
  EXPECT_THROW(gqe::write_file_atomically(target,
                                          [](std::ostream& o) {
                                            o << "partial";
                                            throw gqe::IoError("interrupted");
                                          }),
               gqe::IoError);
  EXPECT_EQ(file_bytes(target), "first");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

TEST(AtomicWrite, UnwritableFolderLeavesNoFile) {
  fs::path folder;
  fs::path made;
#if defined(__unix__) || defined(__APPLE__)
  if (::geteuid() != 0) {  // permissions bind everyone but root
    made = scratch("readonly");
    folder = made;
    fs::permissions(folder, fs::perms::owner_read | fs::perms::owner_exec);
  }
#endif
  if (folder.empty()) {
    if (!fs::is_directory("/proc/self")) GTEST_SKIP() << "no folder that even root cannot write";
    folder = "/proc";  // not even root can create a file here
  }
  const std::vector<float> v = {1.0f};
  EXPECT_THROW(gqe::write_safetensors(folder / "gqe-test.safetensors", {gqe::encode_tensor("w", DType::F32, {1}, v.data())}),
               gqe::IoError);
  EXPECT_FALSE(fs::exists(folder / "gqe-test.safetensors"));
  gqe::ModelConfig c;
  EXPECT_THROW(gqe::save_model_config(folder / "config.json", c), gqe::IoError);
  if (!made.empty()) {
    EXPECT_TRUE(fs::is_empty(made));
    fs::permissions(made, fs::perms::owner_all);
  }
}

// A name near the file system's limit (255 bytes) still gets a temporary name that fits beside it.
TEST(AtomicWrite, TemporaryNamesStayWithinTheNameLimit) {
  const fs::path dir = scratch("long-names");
  for (std::size_t length : {250u, 255u}) {
    const fs::path target = dir / (std::string(length - 12, 'n') + ".safetensors");
    gqe::write_file_atomically(target, [](std::ostream& o) { o << "long"; });
    EXPECT_EQ(file_bytes(target), "long") << length;
  }
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 2);
  // Cut at a character boundary: "é" is two bytes; the kept part of the name is whole characters.
  std::string accents;
  for (int i = 0; i < 200; ++i) accents += "\xc3\xa9";
  const std::string temp = gqe::detail::temporary_name(accents, 255);
  EXPECT_LE(temp.size(), 255u);
  const std::size_t kept = temp.find('.', 1) - 1;  // between the leading '.' and the random tag
  EXPECT_EQ(kept % 2, 0u) << temp;
  EXPECT_GT(kept, 200u);
  fs::remove_all(dir);
}

#if defined(__linux__)
// A FIFO or a device at the target path is written through, never replaced by a regular file (as
// root, replacing /dev/null would break the machine). Devices are made with mknod in a scratch
// folder, never the real ones.
TEST(AtomicWrite, WritesThroughFifosAndDevicesInsteadOfReplacingThem) {
  const fs::path dir = scratch("special");
  const fs::path fifo = dir / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  // Held open for reading (and writing, so that opening never blocks): the writer finds a reader,
  // and a writer that replaced the FIFO instead leaves nothing to read rather than a hang.
  const int end = ::open(fifo.c_str(), O_RDWR | O_NONBLOCK);
  ASSERT_GE(end, 0);
  gqe::write_file_atomically(fifo, [](std::ostream& o) { o << "through the pipe"; });
  char buffer[64] = {};
  const auto got = ::read(end, buffer, sizeof buffer);
  ::close(end);
  EXPECT_EQ(std::string(buffer, static_cast<std::size_t>(std::max<ssize_t>(got, 0))), "through the pipe");
  struct stat st {};
  ASSERT_EQ(::stat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));

  // A link keeps its place; the file it names is replaced.
  gqe::write_file_atomically(dir / "real", [](std::ostream& o) { o << "old"; });
  fs::create_symlink("real", dir / "link");
  gqe::write_file_atomically(dir / "link", [](std::ostream& o) { o << "new"; });
  EXPECT_TRUE(fs::is_symlink(dir / "link"));
  EXPECT_EQ(file_bytes(dir / "real"), "new");
  // So does a chain of links, and one whose file does not exist yet: the file is made.
  fs::create_directory(dir / "sub");
  fs::create_symlink("../link", dir / "sub" / "chain");
  gqe::write_file_atomically(dir / "sub" / "chain", [](std::ostream& o) { o << "chained"; });
  EXPECT_TRUE(fs::is_symlink(dir / "sub" / "chain"));
  EXPECT_EQ(file_bytes(dir / "real"), "chained");
  fs::create_symlink("made", dir / "dangling");
  gqe::write_file_atomically(dir / "dangling", [](std::ostream& o) { o << "made"; });
  EXPECT_TRUE(fs::is_symlink(dir / "dangling"));
  EXPECT_EQ(file_bytes(dir / "made"), "made");
  // A loop of links is refused, and nothing is written.
  fs::create_symlink("loop_b", dir / "loop_a");
  fs::create_symlink("loop_a", dir / "loop_b");
  EXPECT_THROW(gqe::write_file_atomically(dir / "loop_a", [](std::ostream& o) { o << "lost"; }), gqe::IoError);
  EXPECT_TRUE(fs::is_symlink(dir / "loop_a"));
  EXPECT_TRUE(fs::is_symlink(dir / "loop_b"));

  const fs::path null = dir / "null", full = dir / "full";
  if (::mknod(null.c_str(), S_IFCHR | 0600, makedev(1, 3)) != 0 || ::mknod(full.c_str(), S_IFCHR | 0600, makedev(1, 7)) != 0) {
    fs::remove_all(dir);
    GTEST_SKIP() << "mknod needs root (CAP_MKNOD); the FIFO and link cases above ran";
  }
  gqe::write_file_atomically(null, [](std::ostream& o) { o << "discarded"; });
  ASSERT_EQ(::stat(null.c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode)) << "the device was replaced";
  // A full device: the write fails and says why; the device stays.
  try {
    gqe::write_file_atomically(full, [](std::ostream& o) { o << std::string(1 << 16, 'x'); });
    ADD_FAILURE() << "writing to a full device succeeded";
  } catch (const gqe::IoError& e) {
    EXPECT_NE(std::string(e.what()).find("No space left on device"), std::string::npos) << e.what();
  }
  ASSERT_EQ(::stat(full.c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  // fifo, real, link, sub, dangling, made, loop_a, loop_b, null, full: nothing else made
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 10);
  fs::remove_all(dir);
}
#endif

// A folder replaced as a whole: a save that fails part-way (a full disk, a writer that forgets the
// marker that makes a copy complete) leaves the previous copy as it was and nothing beside it.
TEST(RunFolder, FailedSaveKeepsThePreviousCopyAndLeavesNothingBeside) {
  const fs::path parent = scratch("run-folder");
  const fs::path dir = parent / "run";
  const auto save = [&](const std::string& text, bool marker, bool fail) {
    gqe::replace_folder(dir, "done", [&](const fs::path& into) {
      fs::create_directories(into);
      std::ofstream(into / "data") << text;
      if (fail) throw gqe::IoError("disk full");
      if (marker) std::ofstream(into / "done") << "1";
    });
  };
  save("first", true, false);
  EXPECT_EQ(file_bytes(dir / "data"), "first");
  EXPECT_THROW(save("second", true, true), gqe::IoError);
  EXPECT_THROW(save("third", false, false), gqe::IoError);
  EXPECT_EQ(file_bytes(dir / "data"), "first");
  EXPECT_EQ(std::distance(fs::directory_iterator(parent), fs::directory_iterator()), 1);
  save("fourth", true, false);
  EXPECT_EQ(file_bytes(dir / "data"), "fourth");
  EXPECT_EQ(gqe::newest_saved_folder(dir, "done"), dir);
  EXPECT_EQ(std::distance(fs::directory_iterator(parent), fs::directory_iterator()), 1);
  fs::remove_all(parent);
}

// Messages are one line: a path or a name with a newline or an escape sequence comes out escaped.
TEST(Errors, ControlCharactersInMessagesAreEscaped) {
  const fs::path dir = scratch("newline");
  try {
    gqe::load_checkpoint<float>(dir / "a\nb\x1b[31m");
    ADD_FAILURE() << "a missing folder was loaded";
  } catch (const gqe::IoError& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    EXPECT_EQ(message.find('\x1b'), std::string::npos) << message;
    EXPECT_NE(message.find("a\\x0ab\\x1b[31m"), std::string::npos) << message;
  }
  EXPECT_STREQ(gqe::InputError("tab\there").what(), "tab\\x09here");
  fs::remove_all(dir);
}

// ---- config.json --------------------------------------------------------------------------------

gqe::ModelConfig parse(const std::string& text) { return gqe::parse_model_config_text(text, "config.json"); }

std::string config_refusal(const std::string& text) {
  try {
    parse(text);
  } catch (const gqe::Error& e) {
    return e.what();
  }
  return "";
}

const std::string kBase =
    R"("vocab_size": 32, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4)";

TEST(ConfigJson, PlainLlamaConfigGetsTheDocumentedDefaults) {
  const auto c = parse("{" + kBase + R"(, "model_type": "llama", "rope_scaling": null, "attention_bias": false,
                          "mlp_bias": null, "torch_dtype": "bfloat16", "unknown": {"deep": [1, {"x": 2}]}})");
  EXPECT_EQ(c.attention_type, gqe::AttentionType::gqa);
  EXPECT_EQ(c.vocab_size, 32);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 100);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.gqe_variant, gqe::GqeVariant::gqe);
  // Keys of the Llama family that say what gqe computes anyway load; so does RoPE's base given the
  // newer way, inside "rope_parameters".
  const auto same = parse("{" + kBase + R"(, "hidden_act": "silu", "use_rope": true, "use_sliding_window": false,
                             "sliding_window": 32768, "layer_types": ["full_attention", "full_attention"],
                             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})");
  EXPECT_EQ(same.rope_theta, 500000.0);
  EXPECT_EQ(parse("{" + kBase + R"(, "rope_theta": 500000, "rope_parameters": {"rope_theta": 500000.0, "type": "default"}})").rope_theta,
            500000.0);
  EXPECT_EQ(parse("{" + kBase + R"(, "rope_theta": 20000, "rope_parameters": {"rope_type": "default"}, "sliding_window": null})").rope_theta,
            20000.0);
}

TEST(ConfigJson, ReadsEveryKeyAndWritesItBack) {
  const auto c = parse(R"({"attention_type": "gqe", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 688,
      "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 16, "gqe_top_k": 1,
      "gqe_variant": "weighted_concat", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true,
      "max_position_embeddings": 2048.0})");
  EXPECT_EQ(c.attention_type, gqe::AttentionType::gqe);
  EXPECT_EQ(c.gqe_variant, gqe::GqeVariant::weighted_concat);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 16);  // given, not hidden_size / heads
  EXPECT_EQ(c.top_k, 1);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.max_position_embeddings, 2048);  // an integral float is an integer
  EXPECT_EQ(parse("{" + kBase + R"(, "attention_type": "gqe", "gqe_top_k": 1})").gqe_variant, gqe::GqeVariant::gqe);

  const fs::path dir = scratch("config");
  gqe::save_model_config(dir / "config.json", c);
  const auto again = gqe::load_model_config(dir / "config.json");
  EXPECT_EQ(gqe::to_json(again), gqe::to_json(c));
  EXPECT_EQ(again.rms_norm_eps, c.rms_norm_eps);
  EXPECT_EQ(again.rope_theta, c.rope_theta);
  EXPECT_EQ(gqe::to_json(c)["gqe_top_k"], 1);
  const auto gqa = parse("{" + kBase + "}");
  EXPECT_FALSE(gqe::to_json(gqa).contains("gqe_top_k"));
  EXPECT_EQ(gqe::to_json(parse(gqe::to_json(gqa).dump())), gqe::to_json(gqa));
}

TEST(ConfigJson, RefusesBadValuesNamingTheKey) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {R"("attention_type": "gqe")", {"\"gqe_top_k\" is required"}},
      {R"("attention_type": "gqe", "gqe_top_k": 5, "num_key_value_heads": 2)", {"gqe_top_k is 5", "expected 1 to"}},
      {R"("attention_type": "gqe", "gqe_top_k": 0)", {"gqe_top_k is 0"}},
      {R"("attention_type": "mla")", {"attention_type is \"mla\""}},
      {R"("attention_type": "gqe\nx", "gqe_top_k": 1)", {"attention_type is \"gqe\\x0ax\""}},
      {R"("attention_type": 1)", {"\"attention_type\" is 1", "expected a string"}},
      {R"("gqe_variant": "soft")", {"gqe_variant is \"soft\""}},
      {R"("num_key_value_heads": 3)", {"num_attention_heads is 4", "multiple of num_key_value_heads"}},
      {R"("num_key_value_heads": 0)", {"num_key_value_heads is 0"}},
      {R"("head_dim": 7)", {"head_dim is 7", "even"}},
      {R"("head_dim": 0)", {"head_dim is 0"}},
      {R"("rope_scaling": {"factor": 2})", {"\"rope_scaling\"", "does not implement"}},
      {R"("rope_scaling": 0)", {"\"rope_scaling\" is 0", "does not implement"}},
      {R"("attention_bias": true)", {"\"attention_bias\" is true", "does not implement"}},
      {R"("mlp_bias": true)", {"\"mlp_bias\" is true", "does not implement"}},
      {R"("hidden_act": "gelu")", {"\"hidden_act\" is \"gelu\"", "SiLU", "expected \"silu\""}},
      {R"("use_rope": false)", {"\"use_rope\" is false", "always applies RoPE"}},
      {R"("use_rope": 1)", {"\"use_rope\" is 1", "expected true"}},  // JSON's 1 is not true
      {R"("sliding_window": 4096)", {"\"sliding_window\" is 4096", "sliding-window attention"}},
      {R"("use_sliding_window": true, "sliding_window": 4096)", {"\"use_sliding_window\" is true"}},
      {R"("layer_types": ["full_attention", "sliding_attention"])", {"\"layer_types\" gives layer 1 \"sliding_attention\""}},
      {R"("layer_types": "full_attention")", {"\"layer_types\" is \"full_attention\"", "expected a list"}},
      {R"("rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0})", {"\"rope_parameters\" sets \"factor\""}},
      {R"("rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0})", {"\"rope_type\" is \"yarn\"", "RoPE scaling"}},
      {R"("rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "rope_theta": 10000.0)",
       {"\"rope_theta\" is 10000.0 but \"rope_parameters\" gives 500000.0", "one value"}},
      {R"("rope_parameters": {"rope_theta": "1e4"})", {"\"rope_parameters\": \"rope_theta\" is \"1e4\"", "expected a number"}},
      {R"("rope_parameters": 10000)", {"\"rope_parameters\" is 10000", "expected an object"}},
      {R"("rope_parameters": {"rope_theta": -1})", {"rope_theta is -1"}},
      {R"("rope_theta": 1e13)", {"rope_theta is 1e+13", "expected a positive number up to 1e12"}},
      {R"("tie_word_embeddings": "yes")", {"\"tie_word_embeddings\" is \"yes\"", "true or false"}},
      {R"("tie_word_embeddings": 1)", {"\"tie_word_embeddings\" is 1"}},
      {R"("rms_norm_eps": "1e-5")", {"\"rms_norm_eps\" is \"1e-5\"", "expected a number"}},
      {R"("rms_norm_eps": true)", {"\"rms_norm_eps\" is true"}},
      {R"("rms_norm_eps": 0)", {"rms_norm_eps is 0"}},
      {R"("rms_norm_eps": -1e-5)", {"rms_norm_eps is -1e-05"}},
      {R"("rope_theta": -1)", {"rope_theta is -1"}},
      {R"("rope_theta": [10000])", {"\"rope_theta\" is [10000]"}},
      {R"("max_position_embeddings": 0)", {"max_position_embeddings is 0"}},
      {R"("max_position_embeddings": 1e300)", {"\"max_position_embeddings\" is 1e+300", "expected an integer"}},
      {R"("max_position_embeddings": 18446744073709551615)", {"\"max_position_embeddings\"", "fits in 64 bits"}},
      {R"("max_position_embeddings": 9223372036854775807)", {"max_position_embeddings is 9223372036854775807"}},
  };
  for (const auto& [extra, says] : cases) {
    // Later keys win in these tests only because kBase has none of them.
    const std::string message = config_refusal("{" + kBase + ", " + extra + "}");
    ASSERT_NE(message, "") << extra;
    EXPECT_EQ(message.rfind("config.json: ", 0), 0u) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    for (const auto& piece : says) EXPECT_NE(message.find(piece), std::string::npos) << extra << " -> " << message;
  }
  const std::vector<std::pair<std::string, std::string>> replaced = {
      {R"({"vocab_size": "32", "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "\"vocab_size\" is \"32\""},
      {R"({"vocab_size": 32.5, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "\"vocab_size\" is 32.5; expected an integer"},
      {R"({"vocab_size": true, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "\"vocab_size\" is true"},
      {R"({"vocab_size": null, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "\"vocab_size\" is required"},
      {R"({"hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "\"vocab_size\" is required"},
      {R"({"vocab_size": 32, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "\"hidden_size\" is required"},
      {R"({"vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "\"intermediate_size\" is required"},
      {R"({"vocab_size": 32, "hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4})",
       "\"num_hidden_layers\" is required"},
      {R"({"vocab_size": 32, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2})",
       "\"num_attention_heads\" is required"},
      {R"({"vocab_size": 32, "hidden_size": 66, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "\"head_dim\" is absent and hidden_size 66 is not a multiple of num_attention_heads 4"},
      {R"({"vocab_size": 32, "hidden_size": -64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "hidden_size is -64"},
      {R"({"vocab_size": 32, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": -1, "num_attention_heads": 4})",
       "num_hidden_layers is -1"},
      {R"({"vocab_size": 32, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 0})",
       "num_attention_heads is 0"},
      {R"({"vocab_size": 1099511627776, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "vocab_size is 1099511627776"},
  };
  for (const auto& [text, piece] : replaced) {
    const std::string message = config_refusal(text);
    EXPECT_NE(message.find(piece), std::string::npos) << text << " -> " << message;
    EXPECT_EQ(message.rfind("config.json: ", 0), 0u) << message;
  }
  EXPECT_EQ(config_refusal("{" + kBase + "}"), "");
  EXPECT_THROW(parse("{" + kBase + R"(, "num_key_value_heads": 3})"), gqe::ConfigError);
}

// eos_token_id as Hugging Face writes it: an id, a list of ids, or null; written back in the same form.
TEST(ConfigJson, EosTokenIdIsAnIdOrAList) {
  EXPECT_TRUE(parse("{" + kBase + "}").eos_token_ids.empty());
  EXPECT_TRUE(parse("{" + kBase + R"(, "eos_token_id": null})").eos_token_ids.empty());
  EXPECT_TRUE(parse("{" + kBase + R"(, "eos_token_id": []})").eos_token_ids.empty());
  EXPECT_EQ(parse("{" + kBase + R"(, "eos_token_id": 2})").eos_token_ids, (std::vector<std::int32_t>{2}));
  EXPECT_EQ(parse("{" + kBase + R"(, "eos_token_id": 31.0})").eos_token_ids, (std::vector<std::int32_t>{31}));
  EXPECT_EQ(parse("{" + kBase + R"(, "eos_token_id": [0, 7, 31]})").eos_token_ids, (std::vector<std::int32_t>{0, 7, 31}));

  for (const char* value : {"2", "[3,5]", "[]"}) {
    const auto c = parse("{" + kBase + R"(, "eos_token_id": )" + value + "}");
    const auto j = gqe::to_json(c);
    EXPECT_EQ(gqe::to_json(parse(j.dump())), j) << value;
    if (c.eos_token_ids.empty())
      EXPECT_FALSE(j.contains("eos_token_id"));
    else
      EXPECT_EQ(j["eos_token_id"].dump(), value);
  }

  const std::vector<std::pair<std::string, std::vector<std::string>>> refused = {
      {"32", {"eos_token_id 32 is not a token of this model", "0 to vocab_size - 1 = 31"}},
      {"[1, 32]", {"eos_token_id 32 is not a token"}},
      {"-1", {"\"eos_token_id\" holds -1", "expected token ids from 0"}},
      {"[1, -2]", {"\"eos_token_id\" holds -2"}},
      {"4294967296", {"\"eos_token_id\" holds 4294967296"}},
      {"2.5", {"\"eos_token_id\" is 2.5", "expected a token id or a list of token ids"}},
      {"\"2\"", {"\"eos_token_id\" is \"2\"", "expected a token id"}},
      {"true", {"\"eos_token_id\" is true"}},
      {"[1, null]", {"\"eos_token_id\" is [1, null]"}},
      {"[[1]]", {"\"eos_token_id\" is an array of 1 values"}},
      {"{\"id\": 1}", {"\"eos_token_id\" is an object of 1 keys"}},
  };
  for (const auto& [value, says] : refused) {
    const std::string message = config_refusal("{" + kBase + R"(, "eos_token_id": )" + value + "}");
    ASSERT_NE(message, "") << value;
    EXPECT_EQ(message.rfind("config.json: ", 0), 0u) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    for (const auto& piece : says) EXPECT_NE(message.find(piece), std::string::npos) << value << " -> " << message;
  }
  gqe::ModelConfig c = parse("{" + kBase + "}");
  c.eos_token_ids = {32};
  EXPECT_THROW(c.validate(), gqe::ConfigError);
}

TEST(ConfigJson, MalformedFilesAreFormatErrorsNamingTheFile) {
  EXPECT_THROW(parse("{" + kBase), gqe::FormatError);
  EXPECT_THROW(parse(""), gqe::FormatError);
  EXPECT_THROW(parse("[1, 2]"), gqe::FormatError);
  EXPECT_THROW(parse("\"config\""), gqe::FormatError);
  const std::string twice = config_refusal("{" + kBase + R"(, "vocab_size": 33})");
  EXPECT_NE(twice.find("config.json names \"vocab_size\" twice"), std::string::npos) << twice;
  EXPECT_EQ(config_refusal("{" + kBase + R"(, "x": {"a": 1, "a": 2}})"), "");  // inside an unknown key: not read

  const fs::path dir = scratch("config-files");
  EXPECT_THROW(gqe::load_model_config(dir / "config.json"), gqe::IoError);
  EXPECT_THROW(gqe::load_model_config(dir), gqe::IoError);
  { std::ofstream(dir / "config.json") << "{\"vocab_size\": "; }
  try {
    gqe::load_model_config(dir / "config.json");
    ADD_FAILURE() << "accepted";
  } catch (const gqe::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find((dir / "config.json").string() + " is not valid JSON"), std::string::npos) << e.what();
  }
  { std::ofstream(dir / "config.json") << "[]"; }
  EXPECT_THROW(gqe::load_model_config(dir / "config.json"), gqe::FormatError);
}

// ---- checkpoints --------------------------------------------------------------------------------

gqe::ModelConfig small_config(gqe::AttentionType type, gqe::GqeVariant variant = gqe::GqeVariant::gqe, bool tied = false) {
  gqe::ModelConfig c;
  c.attention_type = type;
  c.gqe_variant = variant;
  c.vocab_size = 11;
  c.hidden_size = 6;
  c.intermediate_size = 9;
  c.num_layers = 2;
  c.num_heads = 6;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.top_k = 2;
  c.tie_word_embeddings = tied;
  return c;
}

template <class Scalar>
gqe::Transformer<Scalar> random_model(const gqe::ModelConfig& c, unsigned seed) {
  gqe::Transformer<Scalar> model(c);
  std::mt19937 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  model.for_each_parameter([&](const std::string&, gqe::Weight& w) {
    Scalar* data = w.allocate<Scalar>();
    for (gqe::Index i = 0; i < w.numel(); ++i) data[i] = static_cast<Scalar>(dist(rng));
  });
  return model;
}

template <class Scalar>
std::map<std::string, std::vector<Scalar>> weights_of(const gqe::Transformer<Scalar>& model) {
  std::map<std::string, std::vector<Scalar>> w;
  model.for_each_parameter([&](const std::string& name, const gqe::Weight& v) {  // any stored dtype, as Scalar
    w[name].resize(static_cast<std::size_t>(v.numel()));
    gqe::convert_values(v.row_major_bytes().data(), v.dtype(), w[name].size(), w[name].data());
  });
  return w;
}

std::string load_refusal(const fs::path& dir) {
  try {
    gqe::load_checkpoint<float>(dir);
  } catch (const gqe::Error& e) {
    return e.what();
  }
  return "";
}

// Rewrites dir/model.safetensors after `edit` changed its tensors.
void edit_tensors(const fs::path& dir, const std::function<void(std::vector<gqe::EncodedTensor>&)>& edit) {
  const auto file = gqe::SafetensorsFile::read(dir / "model.safetensors");
  std::vector<gqe::EncodedTensor> tensors;
  for (const auto& t : file.tensors()) tensors.push_back({t.name, t.dtype, t.shape, std::string(file.raw_bytes(t))});
  edit(tensors);
  gqe::write_safetensors(dir / "model.safetensors", tensors);
}

TEST(Checkpoint, SavesAndLoadsEveryKindOfModelExactly) {
  using gqe::AttentionType;
  using gqe::GqeVariant;
  const std::vector<gqe::ModelConfig> configs = {
      small_config(AttentionType::gqa),
      small_config(AttentionType::gqe),
      small_config(AttentionType::gqe, GqeVariant::hard_concat),
      small_config(AttentionType::gqe, GqeVariant::weighted_concat),
      small_config(AttentionType::gqe, GqeVariant::gqe, true),
  };
  unsigned seed = 1;
  for (const auto& c : configs) {
    const fs::path dir = scratch("roundtrip-model") / "nested" / "folder";  // created by save_checkpoint
    const auto model = random_model<float>(c, seed++);
    gqe::save_checkpoint(model, dir);
    const auto loaded = gqe::load_checkpoint<float>(dir);
    EXPECT_EQ(gqe::to_json(loaded.config()), gqe::to_json(c));
    const auto w = weights_of(model);
    EXPECT_EQ(weights_of(loaded), w);
    std::size_t count = 0;
    for (const auto& [name, v] : w) count += v.size();
    EXPECT_EQ(static_cast<gqe::Index>(count), c.parameter_count());
    EXPECT_EQ(w.count("lm_head.weight"), c.tie_word_embeddings ? 0u : 1u);
    EXPECT_EQ(w.count("model.layers.1.self_attn.router.weight"), c.attention_type == AttentionType::gqe ? 1u : 0u);
    EXPECT_FALSE(gqe::checkpoint_is_double(dir));
    // The file holds exactly these tensors in F32, in the model's order.
    const auto file = gqe::SafetensorsFile::read(dir / "model.safetensors");
    ASSERT_EQ(file.tensors().size(), w.size());
    for (const auto& t : file.tensors()) EXPECT_EQ(t.dtype, DType::F32) << t.name;
  }
}

TEST(Checkpoint, StoresEachFloatDtypeAndConvertsOnLoad) {
  const auto c = small_config(gqe::AttentionType::gqe);
  const auto model = random_model<double>(c, 9);
  const auto w = weights_of(model);
  const fs::path dir = scratch("dtypes");
  for (DType dtype : {DType::F64, DType::F32, DType::F16, DType::BF16}) {
    gqe::save_checkpoint(model, dir, dtype);
    EXPECT_EQ(gqe::checkpoint_is_double(dir), dtype == DType::F64) << gqe::dtype_name(dtype);
    const auto as_double = weights_of(gqe::load_checkpoint<double>(dir));
    const auto as_float = weights_of(gqe::load_checkpoint<float>(dir));
    for (const auto& [name, values] : w)
      for (std::size_t i = 0; i < values.size(); ++i) {
        const auto f = static_cast<float>(values[i]);
        const double want = dtype == DType::F64   ? values[i]
                            : dtype == DType::F32 ? f
                            : dtype == DType::F16 ? gqe::half_to_float(gqe::float_to_half(f))
                                                  : gqe::bf16_to_float(gqe::float_to_bf16(f));
        ASSERT_EQ(as_double.at(name)[i], want) << name << " " << gqe::dtype_name(dtype);
        ASSERT_EQ(as_float.at(name)[i], static_cast<float>(want)) << name << " " << gqe::dtype_name(dtype);
      }
  }
  EXPECT_THROW(gqe::save_checkpoint(model, dir, DType::I32), gqe::ConfigError);
}

TEST(Checkpoint, LeavesOtherFilesAloneAndLoadsNonFiniteWeights) {
  const auto c = small_config(gqe::AttentionType::gqa);
  auto model = random_model<float>(c, 4);
  model.for_each_parameter([](const std::string& name, gqe::Weight& w) {
    if (name == "model.norm.weight") {
      w.mutable_data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
      w.mutable_data<float>()[1] = -std::numeric_limits<float>::infinity();
    }
  });
  const fs::path dir = scratch("others");
  { std::ofstream(dir / "train_state.json") << "{\"step\": 3}"; }
  gqe::save_checkpoint(model, dir);
  gqe::save_checkpoint(model, dir);  // over an existing checkpoint
  EXPECT_EQ(file_bytes(dir / "train_state.json"), "{\"step\": 3}");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 3);  // no temporary files left
  // A NaN weight is a strange model, not a malformed file.
  const auto loaded = weights_of(gqe::load_checkpoint<float>(dir));
  EXPECT_TRUE(std::isnan(loaded.at("model.norm.weight")[0]));
  EXPECT_EQ(loaded.at("model.norm.weight")[1], -std::numeric_limits<float>::infinity());
}

TEST(Checkpoint, RefusesMissingExtraAndMisshapenTensorsByName) {
  const auto c = small_config(gqe::AttentionType::gqe);
  const auto model = random_model<float>(c, 5);
  const fs::path dir = scratch("tensors");
  const auto fresh = [&] { gqe::save_checkpoint(model, dir); };
  const auto expect = [&](const std::vector<std::string>& says) {
    const std::string message = load_refusal(dir);
    ASSERT_NE(message, "") << "accepted";
    for (const auto& piece : says) EXPECT_NE(message.find(piece), std::string::npos) << message;
  };
  const auto drop = [](const std::string& name) {
    return [name](std::vector<gqe::EncodedTensor>& t) {
      t.erase(std::remove_if(t.begin(), t.end(), [&](const auto& x) { return x.name == name; }), t.end());
    };
  };

  fresh();
  edit_tensors(dir, drop("model.layers.1.self_attn.q_shared.weight"));
  expect({"tensor model.layers.1.self_attn.q_shared.weight is missing", "[4, 6]"});

  fresh();
  edit_tensors(dir, [](auto& t) {
    const std::vector<float> v(3, 0.0f);
    t.push_back(gqe::encode_tensor("model.layers.0.self_attn.q_proj.bias", DType::F32, {3}, v.data()));
  });
  expect({"tensor model.layers.0.self_attn.q_proj.bias", "not part of a gqe model"});

  fresh();
  edit_tensors(dir, [](auto& t) {
    for (auto& x : t)
      if (x.name == "model.layers.0.mlp.down_proj.weight") x.shape = {9, 6};  // [I, d] instead of [d, I]
  });
  expect({"tensor model.layers.0.mlp.down_proj.weight", "has shape [9, 6]", "config.json implies [6, 9]"});

  fresh();
  edit_tensors(dir, [](auto& t) {
    for (auto& x : t)
      if (x.name == "model.norm.weight") x.shape = {1, 6};
  });
  expect({"tensor model.norm.weight", "[1, 6]", "[6]"});

  fresh();
  edit_tensors(dir, [](auto& t) {
    for (auto& x : t)
      if (x.name == "model.norm.weight") {
        x.dtype = DType::I32;  // same byte count as F32
      }
  });
  expect({"tensor model.norm.weight", "dtype I32"});

  // Tied: lm_head.weight must be absent.
  const auto tied_config = small_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, true);
  gqe::save_checkpoint(random_model<float>(tied_config, 6), dir);
  edit_tensors(dir, [](auto& t) {
    const std::vector<float> v(66, 0.0f);
    t.push_back(gqe::encode_tensor("lm_head.weight", DType::F32, {11, 6}, v.data()));
  });
  expect({"lm_head.weight", "tie_word_embeddings"});

  // Untied: lm_head.weight must be present.
  fresh();
  edit_tensors(dir, drop("lm_head.weight"));
  expect({"tensor lm_head.weight is missing", "[11, 6]"});

  // Not a folder, or a folder without the files.
  EXPECT_THROW(gqe::load_checkpoint<float>(dir / "model.safetensors"), gqe::IoError);
  EXPECT_THROW(gqe::load_checkpoint<float>(dir / "nothing"), gqe::IoError);
  fs::remove(dir / "config.json");
  EXPECT_THROW(gqe::load_checkpoint<float>(dir), gqe::IoError);
}

// Logits [T, V] of a fixed prompt, as the model computes them.
template <class Scalar>
std::vector<Scalar> logits_of(const gqe::Transformer<Scalar>& model) {
  const std::vector<std::int32_t> prompt = {1, 5, 2, 9, 0, 3, 3, 7};
  std::vector<gqe::KVCache<Scalar>> caches{model.new_cache()};
  const auto logits = model.prefill(gqe::TensorView<const std::int32_t>(prompt.data(), gqe::Shape{1, 8}), caches);
  return std::vector<Scalar>(logits.data(), logits.data() + logits.numel());
}

// Shards as Hugging Face writes them load to exactly the single file's model: the same weights, the
// same logits bit for bit. Saving again in the other layout leaves no stale file of the first.
TEST(Checkpoint, ShardedFoldersLoadExactlyAsTheSingleFile) {
  const auto c = small_config(gqe::AttentionType::gqe);
  const auto model = random_model<float>(c, 21);
  const fs::path single = scratch("single"), sharded = scratch("sharded");
  gqe::save_checkpoint(model, single);
  gqe::save_checkpoint(model, sharded, gqe::SaveOptions{DType::F32, 700});
  EXPECT_FALSE(fs::exists(sharded / "model.safetensors"));
  const auto index = nlohmann::json::parse(file_bytes(sharded / "model.safetensors.index.json"));
  std::set<std::string> shards;
  for (const auto& [tensor, shard] : index.at("weight_map").items()) shards.insert(shard.get<std::string>());
  ASSERT_GE(shards.size(), 3u);
  for (std::size_t i = 1; i <= shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i, shards.size());
    EXPECT_TRUE(shards.count(name)) << name;
  }
  std::size_t total = 0;
  for (const auto& [name, values] : weights_of(model)) total += 4 * values.size();
  EXPECT_EQ(index.at("metadata").at("total_size").get<std::size_t>(), total);
  const auto a = gqe::load_checkpoint<float>(single), b = gqe::load_checkpoint<float>(sharded);
  EXPECT_EQ(weights_of(b), weights_of(a));
  EXPECT_EQ(logits_of(b), logits_of(a));
  EXPECT_FALSE(gqe::checkpoint_is_double(sharded));
  // The other layout over it: the old files go, other files stay.
  { std::ofstream(sharded / "notes.txt") << "mine"; }
  gqe::save_checkpoint(model, sharded);
  for (const auto& shard : shards) EXPECT_FALSE(fs::exists(sharded / shard)) << shard;
  EXPECT_FALSE(fs::exists(sharded / "model.safetensors.index.json"));
  EXPECT_EQ(file_bytes(sharded / "notes.txt"), "mine");
  EXPECT_EQ(logits_of(gqe::load_checkpoint<float>(sharded)), logits_of(a));
  // BF16 shards keep their 16-bit values; double models read shards too.
  gqe::save_checkpoint(model, sharded, gqe::SaveOptions{DType::BF16, 500});
  EXPECT_EQ(weights_of(gqe::load_checkpoint<double>(sharded)), weights_of(gqe::load_checkpoint<double>(sharded)));
  EXPECT_FALSE(fs::exists(sharded / "model.safetensors"));
}

TEST(Checkpoint, ShardedFoldersAreCheckedTensorByTensor) {
  const auto c = small_config(gqe::AttentionType::gqa);
  const auto model = random_model<float>(c, 22);
  const fs::path dir = scratch("shard-checks");
  const fs::path index_path = dir / "model.safetensors.index.json";
  const auto fresh = [&] { gqe::save_checkpoint(model, dir, gqe::SaveOptions{DType::F32, 300}); };
  const auto index = [&] { return nlohmann::ordered_json::parse(file_bytes(index_path)); };
  const auto write_index = [&](const nlohmann::ordered_json& j) { std::ofstream(index_path) << j.dump(1); };
  const auto expect = [&](const std::vector<std::string>& says) {
    const std::string message = load_refusal(dir);
    ASSERT_NE(message, "") << "accepted";
    for (const auto& piece : says) EXPECT_NE(message.find(piece), std::string::npos) << message;
  };
  // Each edit of a shard: rewrite shard `name` after `edit` changed its tensors.
  const auto edit_shard = [&](const std::string& name, const std::function<void(std::vector<gqe::EncodedTensor>&)>& edit) {
    const auto file = gqe::SafetensorsFile::read(dir / name);
    std::vector<gqe::EncodedTensor> tensors;
    for (const auto& t : file.tensors()) tensors.push_back({t.name, t.dtype, t.shape, std::string(file.raw_bytes(t))});
    edit(tensors);
    gqe::write_safetensors(dir / name, tensors);
  };

  fresh();
  const std::string first = index()["weight_map"]["model.embed_tokens.weight"];
  const std::string norm_shard = index()["weight_map"]["model.norm.weight"];
  ASSERT_NE(first, norm_shard);
  // A tensor missing from the shard the index names.
  edit_shard(norm_shard, [](auto& t) { t.erase(std::remove_if(t.begin(), t.end(), [](const auto& x) { return x.name == "model.norm.weight"; }), t.end()); });
  expect({"tensor model.norm.weight is missing from", norm_shard});
  // The same tensor also in a shard the index does not name for it.
  fresh();
  edit_shard(first, [](auto& t) {
    const std::vector<float> v(6, 1.0f);
    t.push_back(gqe::encode_tensor("model.norm.weight", DType::F32, {6}, v.data()));
  });
  expect({"tensor model.norm.weight", first, "does not name for it"});
  // A tensor in a shard and not in the index at all.
  fresh();
  edit_shard(first, [](auto& t) {
    const std::vector<float> v(3, 0.0f);
    t.push_back(gqe::encode_tensor("model.extra", DType::F32, {3}, v.data()));
  });
  expect({"tensor model.extra", "the index does not list it"});
  // Listed twice in the index.
  fresh();
  {
    std::string text = file_bytes(index_path);
    const auto at = text.find("\"model.norm.weight\"");
    ASSERT_NE(at, std::string::npos);
    text.insert(at, "\"model.norm.weight\": \"" + first + "\",\n");
    std::ofstream(index_path) << text;
  }
  expect({"names \"model.norm.weight\" twice"});
  // A tensor gone from both its shard and the index: refused by its name, not by any byte count.
  fresh();
  edit_shard(norm_shard, [](auto& t) { t.erase(std::remove_if(t.begin(), t.end(), [](const auto& x) { return x.name == "model.norm.weight"; }), t.end()); });
  auto j = index();
  j["weight_map"].erase("model.norm.weight");
  write_index(j);
  expect({"tensor model.norm.weight is missing from the checkpoint's shards"});
  // total_size is informational, as in Hugging Face's loaders: whatever it holds, the same model.
  for (const nlohmann::ordered_json& total : {nlohmann::ordered_json(12), nlohmann::ordered_json(1.5), nlohmann::ordered_json("x")}) {
    fresh();
    j = index();
    j["metadata"]["total_size"] = total;
    write_index(j);
    EXPECT_EQ(logits_of(gqe::load_checkpoint<float>(dir)), logits_of(model)) << total.dump();
  }
  // An empty weight_map, a shard path outside the folder, no weight_map.
  fresh();
  write_index(nlohmann::ordered_json{{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::ordered_json::object()}});
  expect({"weight_map is empty"});
  fresh();
  j = index();
  j["weight_map"]["model.norm.weight"] = "../model-00001-of-00002.safetensors";
  write_index(j);
  expect({"model.norm.weight", "expected the name of a file beside the index"});
  fresh();
  write_index(nlohmann::ordered_json{{"metadata", {{"total_size", 1}}}});
  expect({"no \"weight_map\""});
  // The index wins over a stray single file, however broken.
  fresh();
  std::ofstream(dir / "model.safetensors") << "not safetensors";
  EXPECT_EQ(logits_of(gqe::load_checkpoint<float>(dir)), logits_of(model));
}

// A mapped checkpoint's F32, BF16 and F16 matrices are used in place: the model owns only its norm
// vectors. Reading instead of mapping, or widening 16-bit weights at load, gives the same bits.
TEST(Checkpoint, MapsWeightsAndKeepsSixteenBitOnes) {
  const auto c = small_config(gqe::AttentionType::gqe);
  const auto model = random_model<float>(c, 23);
  const fs::path dir = scratch("mapped");
  const std::size_t norms = static_cast<std::size_t>((2 * c.num_layers + 1) * c.hidden_size) * sizeof(float);
  for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    SCOPED_TRACE(gqe::dtype_name(dtype));
    gqe::save_checkpoint(model, dir, dtype);
    const auto mapped = gqe::load_checkpoint<float>(dir, gqe::LoadOptions{true, true, false, gqe::PanelLayout::none});
    EXPECT_EQ(mapped.owned_bytes(), norms);
    mapped.for_each_parameter([&](const std::string& name, const gqe::Weight& w) {
      EXPECT_EQ(w.dtype(), w.shape().rank() == 2 ? dtype : DType::F32) << name;
    });
    const auto read = gqe::load_checkpoint<float>(dir, gqe::LoadOptions{false, true, false});
    const auto widened = gqe::load_checkpoint<float>(dir, gqe::LoadOptions{true, false, false});
    const auto owned = gqe::load_checkpoint<float>(dir, gqe::LoadOptions{true, true, true});
    EXPECT_EQ(owned.owned_bytes(), static_cast<std::size_t>(c.parameter_count()) * sizeof(float));
    const auto want = logits_of(mapped);
    EXPECT_EQ(logits_of(read), want);
    EXPECT_EQ(logits_of(widened), want);
    EXPECT_EQ(logits_of(owned), want);
    EXPECT_EQ(weights_of(widened), weights_of(mapped));
    // A mapped model saves back as any dtype (converted from what it holds).
    const fs::path copy = scratch("mapped-copy");
    gqe::save_checkpoint(mapped, copy, DType::F32);
    EXPECT_EQ(logits_of(gqe::load_checkpoint<float>(copy)), want);
  }
}

// Logits [T, V] of the same prompt fed one token at a time (decode steps).
std::vector<float> decoded_logits_of(const gqe::Transformer<float>& model) {
  const std::vector<std::int32_t> prompt = {1, 5, 2, 9, 0, 3, 3, 7};
  std::vector<gqe::KVCache<float>> caches{model.new_cache()};
  std::vector<float> out;
  for (const std::int32_t token : prompt) {
    const auto logits = model.decode(gqe::TensorView<const std::int32_t>(&token, gqe::Shape{1}), caches);
    out.insert(out.end(), logits.data(), logits.data() + logits.numel());
  }
  return out;
}

// Panels (LoadOptions::panels) change the order of a float model's weights in memory, not their
// values: prefill and decode give the in-place model's bits, for both attention types, tied
// embeddings, and a GQE q_proj whose experts' rows are whole panels (d_h = kPanelWidth) or not.
// By default only 16-bit matrices go into panels. The pages they came from are released, mapped
// or read, and nothing still in use is lost with them. The model saves back the very tensors it
// was loaded from, and refuses to be trained.
TEST(Checkpoint, PanelLaidWeightsGiveTheInPlaceBits) {
  if (std::string(gqe::backend::kName) != "eigen")
    GTEST_SKIP() << "F32 weights in place go to the " << gqe::backend::kName << " backend, panels to the library's kernels";
  std::vector<gqe::ModelConfig> configs = {small_config(gqe::AttentionType::gqa), small_config(gqe::AttentionType::gqe),
                                           small_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, true)};
  gqe::ModelConfig whole_panels = small_config(gqe::AttentionType::gqe);  // also large enough to release whole pages
  whole_panels.head_dim = gqe::kPanelWidth;
  whole_panels.hidden_size = 96;
  whole_panels.intermediate_size = 200;
  configs.push_back(whole_panels);
  const fs::path dir = scratch("panels"), copy = scratch("panels-copy");
  for (const auto& c : configs)
    for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      SCOPED_TRACE(std::string(gqe::to_string(c.attention_type)) + " d_h " + std::to_string(c.head_dim) + (c.tie_word_embeddings ? " tied " : " ") +
                   gqe::dtype_name(dtype));
      gqe::save_checkpoint(random_model<float>(c, 37), dir, dtype);
      const auto in_place = gqe::load_checkpoint<float>(dir, gqe::LoadOptions{true, true, false, gqe::PanelLayout::none});
      const auto all = gqe::load_checkpoint<float>(dir, gqe::LoadOptions{true, true, false, gqe::PanelLayout::all});
      const auto by_default = gqe::load_checkpoint<float>(dir);
      const auto read = gqe::load_checkpoint<float>(dir, gqe::LoadOptions{false, true, false, gqe::PanelLayout::all});
      std::size_t laid_out = 0;
      all.for_each_parameter([&](const std::string& name, const gqe::Weight& w) {
        const bool expected = w.shape().rank() == 2 && (name != "model.embed_tokens.weight" || c.tie_word_embeddings) &&
                              (name.find("q_proj") == std::string::npos || c.attention_type == gqe::AttentionType::gqa ||
                               c.head_dim % gqe::kPanelWidth == 0);
        EXPECT_EQ(w.panels(), expected) << name;
        laid_out += w.panels() ? 1 : 0;
      });
      EXPECT_GT(laid_out, 0u);
      by_default.for_each_parameter([&](const std::string& name, const gqe::Weight& w) {
        if (w.panels()) {
          EXPECT_NE(dtype, DType::F32) << name;
        }
      });
      const auto want = logits_of(in_place), want_decoded = decoded_logits_of(in_place);
      for (const auto* m : {&all, &by_default, &read}) {
        EXPECT_EQ(logits_of(*m), want);
        EXPECT_EQ(decoded_logits_of(*m), want_decoded);
      }
      gqe::save_checkpoint(all, copy, dtype);
      const auto original = gqe::SafetensorsFile::read(dir / "model.safetensors");
      const auto saved = gqe::SafetensorsFile::read(copy / "model.safetensors");
      for (const auto& t : original.tensors()) EXPECT_EQ(saved.raw_bytes(saved.at(t.name)), original.raw_bytes(t)) << t.name;
      gqe::Transformer<float> trainee = all;
      trainee.for_each_parameter([&](const std::string& name, gqe::Weight& w) {
        if (w.panels()) {
          EXPECT_THROW(w.attach_grad<float>(), gqe::InputError) << name;
        }
      });
    }
}

// What a load holds in memory of its own, counted here from the file by the documented rules: norm
// vectors (and every weight a float model cannot use as stored) converted to float; matrices used
// in place that go into panels at their stored size (the embeddings only as a tied lm_head, a GQE
// q_proj only when its experts' rows are whole panels); read instead of mapped, the whole file and
// the converted weights (the panels replace pages of the file). The loader refuses a budget one
// byte short of it before allocating, loads within it, and its real copies are no smaller.
TEST(Checkpoint, LoadsBeyondTheMemoryBudgetAreRefusedBeforeAllocating) {
  std::vector<gqe::ModelConfig> configs = {small_config(gqe::AttentionType::gqa), small_config(gqe::AttentionType::gqe),
                                           small_config(gqe::AttentionType::gqe, gqe::GqeVariant::gqe, true)};
  gqe::ModelConfig whole_panels = small_config(gqe::AttentionType::gqe);
  whole_panels.head_dim = gqe::kPanelWidth;
  configs.push_back(whole_panels);
  const fs::path dir = scratch("budget");
  for (const auto& c : configs)
    for (DType dtype : {DType::F32, DType::BF16})
      for (gqe::PanelLayout panels : gqe::kPanelLayouts)
        for (bool keep_16bit : {true, false})
          for (bool map : {true, false}) {
            SCOPED_TRACE(std::string(gqe::to_string(c.attention_type)) + (c.tie_word_embeddings ? " tied " : " ") +
                         gqe::dtype_name(dtype) + " panels " + gqe::panel_layout_name(panels) + (keep_16bit ? "" : " widened") +
                         (map ? "" : " read"));
            gqe::save_checkpoint(random_model<float>(c, 41), dir, dtype);
            double expected = 0, converted = 0;
            const auto file = gqe::SafetensorsFile::read(dir / "model.safetensors", true);
            if (!map) expected = static_cast<double>(fs::file_size(dir / "model.safetensors"));
            for (const auto& t : file.tensors()) {
              const double values = static_cast<double>(t.numel());
              const bool sixteen = t.dtype == DType::BF16 || t.dtype == DType::F16;
              const bool in_place = t.shape.size() == 2 && (t.dtype == DType::F32 || (sixteen && keep_16bit));
              const bool candidate = t.name != "model.embed_tokens.weight" || c.tie_word_embeddings;
              const bool whole = t.name.find("q_proj") == std::string::npos || c.attention_type == gqe::AttentionType::gqa ||
                                 c.head_dim % gqe::kPanelWidth == 0;
              const bool laid_out = panels == gqe::PanelLayout::all || (panels == gqe::PanelLayout::sixteen_bit && sixteen);
              if (!in_place)
                converted += values * sizeof(float);
              else if (map && candidate && whole && laid_out)
                expected += values * static_cast<double>(gqe::dtype_size(t.dtype));
            }
            expected += converted;
            gqe::LoadOptions options{map, keep_16bit, false, panels};
            options.memory_budget = static_cast<std::uint64_t>(expected) - 1;
            try {
              gqe::load_checkpoint<float>(dir, options);
              ADD_FAILURE() << "a budget of " << options.memory_budget << " bytes was not refused";
            } catch (const gqe::ConfigError& e) {
              EXPECT_NE(std::string(e.what()).find("loading this model takes at least"), std::string::npos) << e.what();
              EXPECT_NE(std::string(e.what()).find("more than the budget's"), std::string::npos) << e.what();
            }
            options.memory_budget = static_cast<std::uint64_t>(expected);
            const auto model = gqe::load_checkpoint<float>(dir, options);
            EXPECT_GE(static_cast<double>(model.owned_bytes()), map ? expected : converted);
          }
}

// Without a budget the machine's physical memory is the limit. A checkpoint whose matrices hold
// more than it (a sparse file: no disk is used) is refused from its headers, before it is mapped:
// by default (panels), widened, and read instead of mapped.
TEST(Checkpoint, ACheckpointBeyondTheMachinesMemoryIsRefusedFromItsHeaders) {
  const std::uint64_t memory = gqe::physical_memory_bytes();
  ASSERT_GT(memory, 0u);
  const fs::path dir = scratch("beyond-memory");
  fs::create_directories(dir);
  // The file system must make sparse files: probed with 64 MiB before the real size is asked for.
  {
    const fs::path probe = dir / "probe";
    std::ofstream(probe) << "x";
    fs::resize_file(probe, std::uintmax_t(64) << 20);
    struct stat st {};
    ASSERT_EQ(::stat(probe.c_str(), &st), 0);
    const bool sparse = static_cast<std::uintmax_t>(st.st_blocks) * 512 < (std::uintmax_t(1) << 20);
    fs::remove(probe);
    if (!sparse) GTEST_SKIP() << dir << " does not hold sparse files; this test would write the model's bytes";
  }
  // A BF16 GQA model whose MLP matrices (2 GiB each at d = 4096, intermediate 2^18) exceed the
  // memory by a quarter.
  gqe::ModelConfig c;
  c.attention_type = gqe::AttentionType::gqa;
  c.vocab_size = 16;
  c.hidden_size = 4096;
  c.intermediate_size = 1 << 18;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.max_position_embeddings = 64;
  const double layer_bytes = 2.0 * 3 * 4096 * (1 << 18);
  c.num_layers = static_cast<gqe::Index>(std::ceil(1.25 * static_cast<double>(memory) / layer_bytes));
  if (c.num_layers > gqe::Limits::max_layers) GTEST_SKIP() << "a machine of " << memory << " bytes needs more layers than a model may have";
  gqe::write_file_atomically(dir / "config.json", [&](std::ostream& out) { out << gqe::to_json(c).dump(1); });
  nlohmann::ordered_json header;
  std::uint64_t offset = 0;
  gqe::Transformer<float>(c).for_each_parameter([&](const std::string& name, const gqe::Weight& w) {
    const auto dims = w.shape().dims();
    const std::uint64_t bytes = static_cast<std::uint64_t>(w.numel()) * 2;
    header[name] = {{"dtype", "BF16"}, {"shape", std::vector<std::int64_t>(dims.begin(), dims.end())},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  });
  const std::string text = header.dump();
  {
    std::ofstream out(dir / "model.safetensors", std::ios::binary);
    const std::uint64_t length = text.size();  // little-endian on the machines gqe runs on
    out.write(reinterpret_cast<const char*>(&length), 8);
    out << text;
  }
  fs::resize_file(dir / "model.safetensors", 8 + text.size() + offset);
  const auto refusal = [&](const gqe::LoadOptions& options) -> std::string {
    try {
      gqe::load_checkpoint<float>(dir, options);
    } catch (const gqe::Error& e) {
      return e.what();
    }
    return "loaded";
  };
  std::string message = refusal({});
  EXPECT_NE(message.find("matrices re-laid into panels"), std::string::npos) << message;
  EXPECT_NE(message.find("this machine's"), std::string::npos) << message;
  message = refusal(gqe::LoadOptions{true, false, false, gqe::PanelLayout::none});
  EXPECT_NE(message.find("weights converted to F32"), std::string::npos) << message;
  message = refusal(gqe::LoadOptions{false, true, false, gqe::PanelLayout::none});
  EXPECT_NE(message.find("of files read into memory"), std::string::npos) << message;
  try {  // the file alone, read
    gqe::SafetensorsFile::read(dir / "model.safetensors", false, false);
    ADD_FAILURE() << "a file larger than the memory was read";
  } catch (const gqe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("of memory, and was to be read"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

// The fixtures of tests/data load in float and in double, hold the config's parameters, and save
// back in their own dtype bit for bit.
TEST(Checkpoint, LoadsEveryFixture) {
  int folders = 0;
  for (const auto& entry : fs::directory_iterator(GQE_TEST_DATA_DIR)) {
    const fs::path dir = entry.path();
    if (!fs::exists(dir / "config.json") || !fs::exists(dir / "model.safetensors")) continue;
    ++folders;
    const auto stored = gqe::SafetensorsFile::read(dir / "model.safetensors");
    const DType dtype = stored.tensors().at(0).dtype;
    const auto model = gqe::load_checkpoint<double>(dir);
    const auto in_float = gqe::load_checkpoint<float>(dir);
    EXPECT_EQ(gqe::checkpoint_is_double(dir), dtype == DType::F64) << dir;
    std::size_t count = 0;
    for (const auto& [name, v] : weights_of(model)) count += v.size();
    EXPECT_EQ(static_cast<gqe::Index>(count), model.config().parameter_count()) << dir;
    const fs::path copy = scratch("fixture-copy");
    gqe::save_checkpoint(model, copy, dtype);
    const auto again = gqe::SafetensorsFile::read(copy / "model.safetensors");
    for (const auto& t : stored.tensors()) {
      const gqe::TensorRecord& u = again.at(t.name);
      EXPECT_EQ(u.shape, t.shape) << t.name;
      EXPECT_EQ(again.raw_bytes(u), stored.raw_bytes(t)) << dir << " " << t.name;
    }
    EXPECT_EQ(again.tensors().size(), stored.tensors().size()) << dir;
    (void)in_float;
  }
  if (folders == 0) GTEST_SKIP() << "no fixtures in " << GQE_TEST_DATA_DIR;
}

// Every folder of tests/bad_checkpoints is refused with a gqe::Error whose one-line message contains
// what the folder's row of README.md says; the README lists every folder and no other.
TEST(Checkpoint, EveryMalformedCheckpointIsRefusedAsItsReadmeSays) {
  const fs::path root = fs::path(GQE_TEST_DATA_DIR) / ".." / "bad_checkpoints";
  std::ifstream readme(root / "README.md");
  ASSERT_TRUE(readme) << "no README.md in " << root;
  std::map<std::string, std::vector<std::string>> says;
  for (std::string line; std::getline(readme, line);) {
    if (line.rfind("| ", 0) != 0 || line.rfind("| folder", 0) == 0) continue;
    const std::string name = line.substr(2, line.find(' ', 2) - 2);
    const std::string last = line.substr(line.rfind('|', line.size() - 2));
    auto& pieces = says[name];
    for (std::size_t open = last.find('`'); open != std::string::npos; open = last.find('`', open)) {
      const std::size_t close = last.find('`', open + 1);
      pieces.push_back(last.substr(open + 1, close - open - 1));
      open = close + 1;
    }
  }
  int folders = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    if (!entry.is_directory()) continue;
    ++folders;
    const std::string name = entry.path().filename().string();
    SCOPED_TRACE(name);
    std::string message;
    EXPECT_THROW(
        {
          try {
            gqe::load_checkpoint<float>(entry.path());
          } catch (const gqe::Error& e) {
            message = e.what();
            throw;
          }
        },
        gqe::Error);
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    ASSERT_TRUE(says.count(name)) << "README.md has no row for " << name;
    EXPECT_FALSE(says[name].empty());
    for (const auto& piece : says[name]) EXPECT_NE(message.find(piece), std::string::npos) << "`" << piece << "` in: " << message;
    says.erase(name);
  }
  EXPECT_GE(folders, 30);
  for (const auto& [name, pieces] : says) ADD_FAILURE() << "README.md lists " << name << ", which has no folder";
}

}  // namespace
