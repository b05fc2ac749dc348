#pragma once
// Grow-only scratch of plain values (packed panels, softmax states, index lists), the vector
// counterpart of ScratchMatrix: never zero-filled, so that a buffer whose every value read is first
// written costs no pass over memory when it grows, and no allocation once warm. Growing keeps no
// values. Buffers from 1 MB on sit on transparent huge pages (see AlignedBytes): scratch is a few
// buffers per thread, so rounding one up to a whole 2 MB page costs at most 1 MB, where one just
// under 2 MB (a prompt a token short of a power of two) would else fault 512 pages one by one.
#include <cassert>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "gqe/tensor/aligned_bytes.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe::detail {

template <class T>
class ScratchBuffer {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_default_constructible_v<T>,
                "ScratchBuffer holds plain values, which it never constructs");

 public:
  ScratchBuffer() = default;
  ScratchBuffer(ScratchBuffer&& other) noexcept { *this = std::move(other); }
  ScratchBuffer& operator=(ScratchBuffer&& other) noexcept {  // the moved-from buffer is left empty
    storage_ = std::move(other.storage_);
    capacity_ = std::exchange(other.capacity_, 0);
    return *this;
  }

  // Room for at least n values (their contents undefined until written).
  T* reserve(Index n) {
    assert(n >= 0);
    if (static_cast<std::size_t>(n) > capacity_) {
      storage_ = AlignedBytes::allocate(static_cast<std::size_t>(n) * sizeof(T), AlignedBytes::kHugePage / 2);
      capacity_ = static_cast<std::size_t>(n);
    }
    return data();
  }
  T* data() { return reinterpret_cast<T*>(storage_.get()); }
  const T* data() const { return reinterpret_cast<const T*>(storage_.get()); }
  T& operator[](Index i) { return data()[i]; }
  const T& operator[](Index i) const { return data()[i]; }

 private:
  AlignedBytes::Pointer storage_;
  std::size_t capacity_ = 0;  // values
};

}  // namespace gqe::detail
