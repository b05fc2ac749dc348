// Checkpoint io: half and bfloat16 conversions against slow definitions from the IEEE formats,
// safetensors round trips for every dtype (also with unaligned data), each malformed file refused
// with a message naming what is wrong, atomic writes, config.json defaults and refusals, and every
// folder of tests/bad_checkpoints refused by load_checkpoint.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>

#include "gqe/gqe.hpp"

namespace {

namespace fs = std::filesystem;

// binary16 by its definition: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024.
double half_by_definition(std::uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(m / 1024.0, -14);
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  return sign * std::ldexp(1.0 + m / 1024.0, e - 15);
}

TEST(Half, EveryBitPatternDecodesAsDefinedAndEncodesBack) {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const double want = half_by_definition(h);
    const float got = gqe::half_to_float(h);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << bits;
      EXPECT_TRUE(std::isnan(gqe::half_to_float(gqe::float_to_half(got))));
      continue;
    }
    ASSERT_EQ(static_cast<double>(got), want) << "half bits " << bits;
    if (want != 0.0) {
      EXPECT_EQ(gqe::float_to_half(got), h) << "half bits " << bits;
    }
  }
}

// Rounding to nearest even, checked against the nearest representable halves found by search.
TEST(Half, EncodingRoundsToNearestEven) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-70000.0f, 70000.0f);
  for (int i = 0; i < 20000; ++i) {
    const float x = i % 2 ? dist(rng) : dist(rng) * 1e-6f;
    const std::uint16_t h = gqe::float_to_half(x);
    const double got = gqe::half_to_float(h);
    if (std::fabs(x) >= 65520.0f) {
      EXPECT_TRUE(std::isinf(got));
      continue;
    }
    // No other finite half of the same sign may be strictly closer, and on a tie the even one wins.
    for (int delta : {-1, 1}) {
      const auto other = static_cast<std::uint16_t>(h + delta);
      if ((other & 0x7c00) == 0x7c00 || ((other ^ h) & 0x8000)) continue;
      const double d_got = std::fabs(got - x), d_other = std::fabs(gqe::half_to_float(other) - x);
      EXPECT_LE(d_got, d_other) << x;
      if (d_got == d_other) {
        EXPECT_EQ(h & 1, 0) << x;
      }
    }
  }
}

TEST(BFloat16, RoundsToNearestEvenAndKeepsNaN) {
  std::mt19937 rng(6);
  std::uniform_int_distribution<std::uint32_t> bits_dist;
  for (int i = 0; i < 100000; ++i) {
    const std::uint32_t bits = bits_dist(rng);
    float x;
    std::memcpy(&x, &bits, 4);
    const std::uint16_t b = gqe::float_to_bf16(x);
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(gqe::bf16_to_float(b)));
      continue;
    }
    // Slow reference: the two bfloat16 neighbours of x and the closer (ties to even mantissa).
    const std::uint32_t low = bits & 0xffff0000u, high = low + 0x10000u;
    const std::uint32_t rest = bits & 0xffffu;
    const std::uint32_t want = rest > 0x8000u || (rest == 0x8000u && ((low >> 16) & 1u)) ? high : low;
    EXPECT_EQ(b, static_cast<std::uint16_t>(want >> 16)) << std::hex << bits;
  }
}

// A file whose header is written by hand, as the spec's layout says.
std::string raw_file(const std::string& header, const std::string& data) {
  std::string s(8, '\0');
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s + header + data;
}

std::string refusal(const std::string& bytes) {
  try {
    gqe::SafetensorsFile::parse(bytes, "test.safetensors");
  } catch (const gqe::FormatError& e) {
    return e.what();
  }
  return "";
}

fs::path scratch(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("gqe-test-io-" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

TEST(Safetensors, RoundTripsEveryDtype) {
  const fs::path dir = scratch("roundtrip");
  const std::vector<double> values = {0.0, -1.5, 3.25, 1e-3, -65504.0, 0.1};
  std::vector<gqe::EncodedTensor> tensors;
  for (gqe::DType t : {gqe::DType::F64, gqe::DType::F32, gqe::DType::F16, gqe::DType::BF16, gqe::DType::I32})
    tensors.push_back(gqe::encode_tensor(gqe::dtype_name(t), t, {2, 3}, values.data()));
  gqe::write_safetensors(dir / "t.safetensors", tensors);
  const auto file = gqe::SafetensorsFile::read(dir / "t.safetensors");
  EXPECT_EQ(file.metadata().at("format"), "pt");
  ASSERT_EQ(file.tensors().size(), 5u);
  EXPECT_EQ(file.read_as<double>("F64"), values);
  for (std::size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(file.read_as<double>("F32")[i], static_cast<double>(static_cast<float>(values[i])));
    EXPECT_EQ(file.read_as<double>("F16")[i], gqe::half_to_float(gqe::float_to_half(static_cast<float>(values[i]))));
    EXPECT_EQ(file.read_as<double>("BF16")[i], gqe::bf16_to_float(gqe::float_to_bf16(static_cast<float>(values[i]))));
    EXPECT_EQ(file.read_as<std::int32_t>("I32")[i], static_cast<std::int32_t>(values[i]));
  }
  EXPECT_EQ(file.at("F16").shape, (std::vector<std::int64_t>{2, 3}));
}

TEST(Safetensors, ReadsUnalignedData) {
  // A 2-byte F16 first puts the F32 at data offset 2, and a header of odd length puts the data
  // area itself at an odd file offset: neither value is aligned in memory.
  const float value = 2.5f;
  const std::string data = std::string("\x00\x3c", 2) + std::string(reinterpret_cast<const char*>(&value), 4);
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"x":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})";
  const auto file = gqe::SafetensorsFile::parse(raw_file(header + "   ", data), "unaligned");
  EXPECT_EQ(file.read_as<float>("h")[0], 1.0f);
  EXPECT_EQ(file.read_as<float>("x")[0], 2.5f);
}

TEST(Safetensors, RefusesMalformedFilesNamingTheProblem) {
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string eight(8, '\0');
  EXPECT_NE(refusal("1234567").find("at least 8"), std::string::npos);
  EXPECT_NE(refusal(raw_file(ok, eight).substr(0, 20)).find("past the end"), std::string::npos);
  std::string huge = raw_file(ok, eight);
  huge[3] = 0x10;  // 268 MB header length
  EXPECT_NE(refusal(huge).find("limit"), std::string::npos);
  EXPECT_NE(refusal(raw_file("{oops", eight)).find("not valid JSON"), std::string::npos);
  EXPECT_NE(refusal(raw_file("[1,2]", eight)).find("not an object"), std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight))
                .find("\"w\" twice"),
            std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"w":{"dtype":"F8","shape":[2],"data_offsets":[0,8]}})", eight)).find("dtype F8"),
            std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight)).find("tensor w has shape"),
            std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", eight))
                .find("overflows"),
            std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", eight)).find("outside"),
            std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight))
                .find("overlaps"),
            std::string::npos);
  EXPECT_NE(refusal(raw_file(ok, eight + "1234")).find("cover 8 of the 12"), std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight)).find("belong to no tensor"),
            std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"__metadata__":{"format":1},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight))
                .find("__metadata__"),
            std::string::npos);
  EXPECT_NE(refusal(raw_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight)).find("non-negative"),
            std::string::npos);
  EXPECT_EQ(refusal(raw_file(ok, eight)), "");  // and the well-formed one is accepted
}

TEST(AtomicWrite, FailureLeavesNothingUnderTheFinalNameOrBeside) {
  const fs::path dir = scratch("atomic");
  const fs::path target = dir / "out.safetensors";
  EXPECT_THROW(gqe::write_file_atomically(target, [](std::ostream&) { throw gqe::IoError("disk full"); }), gqe::IoError);
  EXPECT_TRUE(fs::is_empty(dir));
  EXPECT_THROW(gqe::write_file_atomically(dir / "missing" / "x", [](std::ostream& o) { o << "x"; }), gqe::IoError);
  // An existing file is replaced whole, never truncated first.
  gqe::write_file_atomically(target, [](std::ostream& o) { o << "first"; });
  EXPECT_THROW(gqe::write_file_atomically(target, [](std::ostream& o) {
                 o << "partial";
                 throw gqe::IoError("interrupted");
               }),
               gqe::IoError);
  std::ifstream in(target);
  std::string content;
  in >> content;
  EXPECT_EQ(content, "first");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

gqe::ModelConfig parse(const std::string& text) { return gqe::parse_model_config(nlohmann::json::parse(text), "config.json"); }

std::string config_refusal(const std::string& text) {
  try {
    parse(text);
  } catch (const gqe::Error& e) {
    return e.what();
  }
  return "";
}

TEST(ConfigJson, PlainLlamaConfigGetsTheSpecDefaults) {
  const auto c = parse(R"({"vocab_size": 32, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "model_type": "llama", "rope_scaling": null, "attention_bias": false})");
  EXPECT_EQ(c.attention_type, gqe::AttentionType::gqa);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.gqe_variant, gqe::GqeVariant::gqe);
  // And to_json gives it back.
  const auto again = gqe::parse_model_config(nlohmann::json::parse(gqe::to_json(c).dump()), "round trip");
  EXPECT_EQ(gqe::to_json(again), gqe::to_json(c));
}

TEST(ConfigJson, RefusesBadValuesNamingTheKey) {
  const std::string base = R"("vocab_size": 32, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4)";
  EXPECT_NE(config_refusal("{" + base + R"(, "attention_type": "gqe"})").find("gqe_top_k"), std::string::npos);
  EXPECT_NE(config_refusal("{" + base + R"(, "attention_type": "gqe", "gqe_top_k": 5, "num_key_value_heads": 2})").find("gqe_top_k is 5"),
            std::string::npos);
  EXPECT_NE(config_refusal("{" + base + R"(, "num_key_value_heads": 3})").find("num_attention_heads is 4"), std::string::npos);
  EXPECT_NE(config_refusal("{" + base + R"(, "head_dim": 7})").find("head_dim is 7"), std::string::npos);
  EXPECT_NE(config_refusal("{" + base + R"(, "rope_scaling": {"factor": 2}})").find("rope_scaling"), std::string::npos);
  EXPECT_NE(config_refusal("{" + base + R"(, "mlp_bias": true})").find("mlp_bias"), std::string::npos);
  EXPECT_NE(config_refusal(R"({"vocab_size": "32", "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})")
                .find("\"vocab_size\" is \"32\""),
            std::string::npos);
  EXPECT_NE(config_refusal(R"({"vocab_size": 32.5, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})")
                .find("expected an integer"),
            std::string::npos);
  EXPECT_NE(config_refusal(R"({"hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})")
                .find("\"vocab_size\" is required"),
            std::string::npos);
  EXPECT_NE(config_refusal(R"({"vocab_size": 32, "hidden_size": 66, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4})")
                .find("head_dim"),
            std::string::npos);
  EXPECT_NE(config_refusal("{" + base + R"(, "tie_word_embeddings": "yes"})").find("tie_word_embeddings"), std::string::npos);
  EXPECT_NE(config_refusal("{" + base + R"(, "num_hidden_layers": -1})").find("num_hidden_layers is -1"), std::string::npos);
  EXPECT_EQ(config_refusal("{" + base + "}"), "");
}

TEST(Checkpoint, EveryMalformedCheckpointIsRefusedWithAGqeError) {
  int folders = 0;
  for (const auto& entry : fs::directory_iterator(fs::path(GQE_TEST_DATA_DIR) / ".." / "bad_checkpoints")) {
    if (!entry.is_directory()) continue;
    ++folders;
    EXPECT_THROW(gqe::load_checkpoint<float>(entry.path()), gqe::Error) << entry.path();
  }
  EXPECT_GE(folders, 30);
}

TEST(Checkpoint, SavesAtomicallyBesideOtherFilesAndRefusesIntegerDtypes) {
  gqe::ModelConfig c;
  c.vocab_size = 11;
  c.hidden_size = 6;
  c.intermediate_size = 9;
  c.num_layers = 1;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 4;
  gqe::Transformer<float> model(c);
  float x = 0.5f;
  model.for_each_parameter([&](const std::string&, gqe::TensorView<float> w) {
    for (gqe::Index i = 0; i < w.numel(); ++i) w.data()[i] = x += 0.25f;
  });
  const fs::path dir = scratch("checkpoint");
  { std::ofstream(dir / "train_state.json") << "{}"; }
  gqe::save_checkpoint(model, dir);
  EXPECT_TRUE(fs::exists(dir / "train_state.json"));
  const auto loaded = gqe::load_checkpoint<float>(dir);
  std::vector<float> a, b;
  model.for_each_parameter([&](const std::string&, gqe::TensorView<const float> w) { a.insert(a.end(), w.data(), w.data() + w.numel()); });
  loaded.for_each_parameter([&](const std::string&, gqe::TensorView<const float> w) { b.insert(b.end(), w.data(), w.data() + w.numel()); });
  EXPECT_EQ(a, b);
  EXPECT_EQ(static_cast<gqe::Index>(a.size()), c.parameter_count());
  EXPECT_FALSE(gqe::checkpoint_is_double(dir));
  EXPECT_THROW(gqe::save_checkpoint(model, dir, gqe::DType::I32), gqe::ConfigError);
}

}  // namespace
