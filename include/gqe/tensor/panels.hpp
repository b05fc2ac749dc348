#pragma once
// The panel layout of a weight [out, in] (inference only, float models): the rows cut into panels
// of kPanelWidth rows, each panel stored depth-major, [in][kPanelWidth] (the panel's values at
// depth p side by side), panels one after another, the last one padded with zero rows. It is the
// layout the GEMM micro-kernel reads B in, so a product streams a panel-laid weight front to back
// and needs no packing: a decode step reads the weights as one sequential stream instead of
// kPanelWidth interleaved row streams, and 16-bit values widen with no transpose. The values are
// unchanged (same dtype, same bits): only their order differs.
//
// Rows r0 .. of a panel-laid weight start at element r0 * in, as in row-major order, when r0 is a
// multiple of kPanelWidth: a block of whole panels is a panel-laid weight of its own.
#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "gqe/tensor/dtype.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

// Rows per panel: the float micro-kernel's NR (two packets; 32 with AVX-512, 16 with AVX2, 8 with
// SSE). Eigen's packet_traits gives the packet's size without naming the SIMD type (whose
// attributes GCC would warn about dropping in a template argument).
inline constexpr Index kPanelWidth = 2 * Eigen::internal::packet_traits<float>::size;

// Rows a panel-laid weight of `rows` rows stores (a whole number of panels).
inline Index panel_rows(Index rows) { return (rows + kPanelWidth - 1) / kPanelWidth * kPanelWidth; }

// Index of element (r, p) of a panel-laid weight with `cols` values per row.
inline std::size_t panel_index(Index r, Index p, Index cols) {
  return static_cast<std::size_t>((r / kPanelWidth) * kPanelWidth * cols + p * kPanelWidth + r % kPanelWidth);
}

// Rows r0 .. of w: r0 must start a panel when w is panel-laid.
inline WeightMatrix rows_from(const WeightMatrix& w, Index r0) {
  assert(!w.panels || r0 % kPanelWidth == 0);
  return {static_cast<const unsigned char*>(w.data) + static_cast<std::size_t>(r0 * w.stride) * dtype_size(w.dtype), w.dtype, w.stride,
          w.panels};
}

namespace detail {
template <class T>
void lay_out_panels(const unsigned char* src, Index rows, Index cols, Index first_row, Index end_row, unsigned char* dst) {
  constexpr Index W = kPanelWidth, kDepthBlock = 64;  // a block of W rows x 64 values: read along rows, written in L1
  for (Index r0 = first_row; r0 < end_row; r0 += W) {
    T* panel = reinterpret_cast<T*>(dst) + r0 * cols;
    for (Index p0 = 0; p0 < cols; p0 += kDepthBlock) {
      const Index depth = std::min(kDepthBlock, cols - p0);
      for (Index r = 0; r < W; ++r) {
        T* out = panel + p0 * W + r;
        if (r0 + r >= rows) {
          for (Index p = 0; p < depth; ++p) out[p * W] = T(0);
          continue;
        }
        const unsigned char* in = src + static_cast<std::size_t>((r0 + r) * cols + p0) * sizeof(T);
        for (Index p = 0; p < depth; ++p) std::memcpy(out + p * W, in + static_cast<std::size_t>(p) * sizeof(T), sizeof(T));
      }
    }
  }
}
}  // namespace detail

// Writes rows [first_row, end_row) of the row-major matrix `src` ([rows, cols] in dtype, any
// alignment) into the panel-laid `dst` (panel_rows(rows) x cols values); first_row is a multiple
// of kPanelWidth, end_row one or `rows`, and the padding rows of the last panel are written as zeros.
inline void lay_out_panels(const void* src, DType dtype, Index rows, Index cols, Index first_row, Index end_row, void* dst) {
  assert(first_row % kPanelWidth == 0 && (end_row % kPanelWidth == 0 || end_row == rows) && end_row <= rows);
  const Index end = end_row == rows ? panel_rows(rows) : end_row;
  const auto* in = static_cast<const unsigned char*>(src);
  auto* out = static_cast<unsigned char*>(dst);
  switch (dtype_size(dtype)) {
    case 8: detail::lay_out_panels<std::uint64_t>(in, rows, cols, first_row, end, out); break;
    case 4: detail::lay_out_panels<std::uint32_t>(in, rows, cols, first_row, end, out); break;
    default: detail::lay_out_panels<std::uint16_t>(in, rows, cols, first_row, end, out); break;
  }
}

}  // namespace gqe
