#pragma once
// Grow-only scratch of plain values (packed panels, softmax states, index lists), the vector
// counterpart of ScratchMatrix: never zero-filled, so that a buffer whose every value read is first
// written costs no pass over memory when it grows, and no allocation once warm. Growing keeps no
// values. Large buffers sit on transparent huge pages (see AlignedBytes).
#include <cstddef>
#include <type_traits>

#include "gqe/tensor/aligned_bytes.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe::detail {

template <class T>
class ScratchBuffer {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_default_constructible_v<T>,
                "ScratchBuffer holds plain values, which it never constructs");

 public:
  // Room for at least n values (their contents undefined until written).
  T* reserve(Index n) {
    if (static_cast<std::size_t>(n) > capacity_) {
      storage_ = AlignedBytes::allocate(static_cast<std::size_t>(n) * sizeof(T));
      capacity_ = static_cast<std::size_t>(n);
    }
    return data();
  }
  T* data() { return reinterpret_cast<T*>(storage_.get()); }
  const T* data() const { return reinterpret_cast<const T*>(storage_.get()); }
  T& operator[](Index i) { return data()[i]; }
  const T& operator[](Index i) const { return data()[i]; }
  Index capacity() const { return static_cast<Index>(capacity_); }

 private:
  AlignedBytes::Pointer storage_;
  std::size_t capacity_ = 0;  // values
};

}  // namespace gqe::detail
