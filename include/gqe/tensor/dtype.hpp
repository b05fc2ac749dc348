#pragma once
// The element types a checkpoint may store (safetensors' names) and the exact conversions between
// them: binary16 (F16) and bfloat16 (BF16) widen to float without rounding; float narrows to them
// with round-to-nearest-even.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>

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

// The DType of a C++ element type.
template <class T>
constexpr DType dtype_of() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, std::int32_t>,
                "dtype_of: float, double or int32_t");
  if constexpr (std::is_same_v<T, float>) return DType::F32;
  if constexpr (std::is_same_v<T, double>) return DType::F64;
  return DType::I32;
}

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

// A matrix of stored values, as the kernels read a weight: row-major in a float dtype, `stride`
// elements between rows, any alignment; or, with `panels`, in the panel layout of
// tensor/panels.hpp (float models' inference), `stride` then being the row length.
struct WeightMatrix {
  const void* data = nullptr;
  DType dtype = DType::F32;
  std::ptrdiff_t stride = 0;
  bool panels = false;
};

// out[0 .. count) = the values stored at `data` in dtype (any alignment), converted to Out; F16 and
// BF16 widen exactly. Plain loops over bytes, which compilers vectorise.
template <class Out>
void convert_values(const void* data, DType dtype, std::size_t count, Out* out) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  if (count == 0) return;  // an empty tensor's pointers may be null, which memcpy must not see
  if (dtype == dtype_of<Out>()) {
    std::memcpy(out, bytes, count * sizeof(Out));
    return;
  }
  const auto each = [&](auto stored, auto decode) {
    using Stored = decltype(stored);
    for (std::size_t i = 0; i < count; ++i) {
      Stored v;
      std::memcpy(&v, bytes + sizeof(Stored) * i, sizeof(Stored));
      out[i] = static_cast<Out>(decode(v));
    }
  };
  switch (dtype) {
    case DType::F32: each(float{}, [](float v) { return v; }); break;
    case DType::F64: each(double{}, [](double v) { return v; }); break;
    case DType::BF16: each(std::uint16_t{}, bf16_to_float); break;
    case DType::F16: each(std::uint16_t{}, half_to_float); break;
    case DType::I32: each(std::int32_t{}, [](std::int32_t v) { return v; }); break;
  }
}

}  // namespace gqe
