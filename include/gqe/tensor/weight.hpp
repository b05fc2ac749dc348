#pragma once
// A model's parameter tensor ([out, in] matrix or [n] vector, torch's layout) in the dtype it is
// kept in. Either owned (initialised, trained or converted weights: an aligned buffer, never
// zero-filled before it is written) or borrowed from a mapped checkpoint file, which it keeps
// alive: F32, BF16 and F16 weights are used in place, straight from the file's pages. For
// inference, a float model's matrix may be re-laid into panels (tensor/panels.hpp, owned, same
// dtype and bits), which the kernels stream in order.
//
// Training attaches a gradient of the same shape (Scalar, owned) to each weight: the layers'
// backward passes accumulate into it, the optimiser reads it beside the weight it updates in place.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "gqe/error.hpp"
#include "gqe/tensor/aligned_bytes.hpp"
#include "gqe/tensor/dtype.hpp"
#include "gqe/tensor/panels.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

class Weight {
 public:
  Weight() = default;
  // A weight of this shape with no storage yet (a loader binds it, or allocate() gives it some).
  explicit Weight(Shape shape) : shape_(shape) {}

  Weight(const Weight& other)
      : shape_(other.shape_), dtype_(other.dtype_), panels_(other.panels_), data_(other.data_), keep_alive_(other.keep_alive_) {
    if (other.owned_) copy_owned(other);
    if (other.grad_) {
      grad_bytes_ = other.grad_bytes_;
      grad_ = detail::AlignedBytes::allocate(grad_bytes_);
      std::memcpy(grad_.get(), other.grad_.get(), grad_bytes_);
    }
  }
  Weight& operator=(const Weight& other) {
    if (this != &other) *this = Weight(other);
    return *this;
  }
  Weight(Weight&&) noexcept = default;
  Weight& operator=(Weight&&) noexcept = default;

  const Shape& shape() const { return shape_; }
  DType dtype() const { return dtype_; }
  Index numel() const { return shape_.numel(); }
  Index rows() const { return shape_[0]; }
  Index cols() const { return shape_.rank() > 1 ? shape_[1] : 1; }
  bool bound() const { return data_ != nullptr || numel() == 0; }
  bool owned() const { return owned_ != nullptr; }
  bool panels() const { return panels_; }
  // Bytes this weight keeps in memory of its own (borrowed weights live in the mapped file).
  std::size_t owned_bytes() const { return owned_ ? bytes() : 0; }

  // Owned storage of element type T, uninitialised: the caller writes every value.
  template <class T>
  T* allocate() {
    dtype_ = dtype_of<T>();
    panels_ = false;
    owned_ = detail::AlignedBytes::allocate(bytes());
    keep_alive_.reset();
    data_ = owned_.get();
    return reinterpret_cast<T*>(owned_.get());
  }
  // Owned storage in any float dtype, filled from `values` (its bytes, in dtype).
  void allocate_bytes(DType dtype, const void* values) {
    dtype_ = dtype;
    panels_ = false;
    owned_ = detail::AlignedBytes::allocate(bytes());
    keep_alive_.reset();
    std::memcpy(owned_.get(), values, bytes());
    data_ = owned_.get();
  }
  // Borrowed storage: `data` (any alignment) stays valid while `keep_alive` does.
  void borrow(const void* data, DType dtype, std::shared_ptr<const void> keep_alive) {
    dtype_ = dtype;
    panels_ = false;
    owned_.reset();
    data_ = data;
    keep_alive_ = std::move(keep_alive);
  }

  // Re-lays a matrix out in panels, in memory of its own (same dtype and bits); `consumed(begin,
  // bytes)` is told of each run of the old storage once read (a loader releases those pages),
  // which then may no longer be read. The runs, about 2 MB each, go through
  // parallel_for(count, fn(i)), which may run them on several threads: the first touch of fresh
  // memory is much of the cost. For inference: such a weight cannot be trained. A vector, or a
  // weight already in panels, stays as it is.
  template <class Consumed, class ParallelFor>
  void lay_out_in_panels(const Consumed& consumed, const ParallelFor& parallel_for) {
    if (shape_.rank() != 2 || panels_ || !bound()) return;
    if (grad_) fail<InputError>("a weight with a gradient cannot be laid out in panels; expected an inference model");
    const Index in = cols();
    const std::size_t row_bytes = static_cast<std::size_t>(in) * dtype_size(dtype_);
    auto panels = detail::AlignedBytes::allocate(static_cast<std::size_t>(panel_rows(rows())) * row_bytes);
    const Index step = std::max<Index>(1, static_cast<Index>((std::size_t(2) << 20) / std::max<std::size_t>(row_bytes, 1)) / kPanelWidth) * kPanelWidth;
    parallel_for((rows() + step - 1) / step, [&](Index run) {
      const Index r0 = run * step, r1 = std::min(rows(), r0 + step);
      lay_out_panels(data_, dtype_, rows(), in, r0, r1, panels.get());
      consumed(static_cast<const unsigned char*>(data_) + static_cast<std::size_t>(r0) * row_bytes, static_cast<std::size_t>(r1 - r0) * row_bytes);
    });
    owned_ = std::move(panels);
    keep_alive_.reset();
    data_ = owned_.get();
    panels_ = true;
  }
  template <class Consumed>
  void lay_out_in_panels(const Consumed& consumed) {
    lay_out_in_panels(consumed, [](Index count, const auto& fn) {
      for (Index i = 0; i < count; ++i) fn(i);
    });
  }
  void lay_out_in_panels() {
    lay_out_in_panels([](const void*, std::size_t) {});
  }

  // The stored values: row-major, or in panels when panels().
  const void* raw() const { return data_; }
  // The values as T; the weight must be stored as T (loaders guarantee it for vectors).
  template <class T>
  const T* data() const {
    assert(dtype_ == dtype_of<T>() && bound());
    return static_cast<const T*>(data_);
  }
  // Values that training updates in place: owned, stored as T.
  template <class T>
  T* mutable_data() {
    if (panels_) fail<InputError>("a weight laid out in panels for inference cannot be updated in place; expected one loaded to train");
    if (!owned_ || dtype_ != dtype_of<T>())
      fail<InputError>("a ", dtype_name(dtype_), owned_ ? " owned" : " borrowed", " weight cannot be updated in place; expected ",
                       dtype_name(dtype_of<T>()), " weights of the model's own (load with conversion to train)");
    return reinterpret_cast<T*>(owned_.get());
  }
  template <class T>
  TensorView<const T> view() const {
    assert(!panels_);
    return {data<T>(), shape_};
  }
  // The matrix for the kernels: rows of `cols()` values in the stored dtype (or panels).
  WeightMatrix matrix() const { return {data_, dtype_, cols(), panels_}; }
  // Row r (of a matrix) converted to T into out[0 .. cols()).
  template <class T>
  void row(Index r, T* out) const {
    assert(r >= 0 && r < rows());
    if (!panels_) {
      convert_values(static_cast<const unsigned char*>(data_) + static_cast<std::size_t>(r * cols()) * dtype_size(dtype_), dtype_,
                     static_cast<std::size_t>(cols()), out);
      return;
    }
    // A panel's row r holds every kPanelWidth-th value: gathered a run at a time, then converted.
    constexpr Index kRun = 256;
    alignas(64) unsigned char run[kRun * 8];
    for (Index p0 = 0; p0 < cols(); p0 += kRun) {
      const Index count = std::min(kRun, cols() - p0);
      gather_panel_row(r, p0, count, run);
      convert_values(run, dtype_, static_cast<std::size_t>(count), out + p0);
    }
  }
  // The stored bytes in row-major order (a copy; what a checkpoint holds).
  std::string row_major_bytes() const {
    const std::size_t row_bytes = static_cast<std::size_t>(cols()) * dtype_size(dtype_);
    if (!panels_) return std::string(static_cast<const char*>(data_), static_cast<std::size_t>(rows()) * row_bytes);
    std::string out(static_cast<std::size_t>(rows()) * row_bytes, '\0');
    for (Index r = 0; r < rows(); ++r)
      gather_panel_row(r, 0, cols(), reinterpret_cast<unsigned char*>(&out[static_cast<std::size_t>(r) * row_bytes]));
    return out;
  }

  // Gradient of the same shape (training): attached once, zeroed by the trainer each step.
  template <class T>
  void attach_grad() {
    if (panels_) fail<InputError>("a weight laid out in panels for inference cannot be trained; expected one loaded to train");
    grad_bytes_ = static_cast<std::size_t>(numel()) * sizeof(T);
    grad_ = detail::AlignedBytes::allocate(grad_bytes_);
    std::memset(grad_.get(), 0, grad_bytes_);
  }
  bool has_grad() const { return grad_ != nullptr; }
  template <class T>
  T* grad() const {
    assert(grad_ && grad_bytes_ == static_cast<std::size_t>(numel()) * sizeof(T));
    return reinterpret_cast<T*>(grad_.get());
  }
  template <class T>
  MatrixMap<T> grad_matrix() const {
    return {grad<T>(), rows(), cols()};
  }

 private:
  std::size_t bytes() const {
    const Index stored = panels_ ? panel_rows(rows()) * cols() : numel();
    return static_cast<std::size_t>(stored) * dtype_size(dtype_);
  }
  // The stored bytes of elements [p0, p0 + count) of row r of a panel-laid matrix, into out.
  void gather_panel_row(Index r, Index p0, Index count, unsigned char* out) const {
    const std::size_t size = dtype_size(dtype_);
    const auto* first = static_cast<const unsigned char*>(data_) + panel_index(r, p0, cols()) * size;
    for (Index p = 0; p < count; ++p) std::memcpy(out + static_cast<std::size_t>(p) * size, first + static_cast<std::size_t>(p * kPanelWidth) * size, size);
  }
  void copy_owned(const Weight& other) {
    owned_ = detail::AlignedBytes::allocate(bytes());
    std::memcpy(owned_.get(), other.owned_.get(), bytes());
    data_ = owned_.get();
  }

  Shape shape_{};
  DType dtype_ = DType::F32;
  bool panels_ = false;  // a matrix in the panel layout (owned)
  const void* data_ = nullptr;
  detail::AlignedBytes::Pointer owned_;
  std::shared_ptr<const void> keep_alive_;  // the mapped file of a borrowed weight
  detail::AlignedBytes::Pointer grad_;
  std::size_t grad_bytes_ = 0;
};

}  // namespace gqe
