// Work splitting shared by the CPU ops: all tensors of a call are treated as one concatenated
// range of elements, cut into equal chunks, so that many small tensors spread over the threads
// as evenly as one large tensor does.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace badam {
namespace cpu {

class ConcatenatedChunks {
 public:
  // Large enough that a thread's start-up cost (microseconds) is small next to a chunk's memory
  // traffic, small enough that a block of a million elements still spreads over every core.
  static constexpr int64_t kChunkElems = int64_t{1} << 15;

  // numels[k] is the element count of tensor k (zero allowed).
  explicit ConcatenatedChunks(const std::vector<int64_t>& numels) : offsets_(numels.size() + 1, 0) {
    for (size_t k = 0; k < numels.size(); ++k) offsets_[k + 1] = offsets_[k] + numels[k];
  }

  int64_t num_chunks() const { return (offsets_.back() + kChunkElems - 1) / kChunkElems; }

  // Calls fn(chunk, tensor, begin, end) for each non-empty piece [begin, end) (element indices of
  // tensor `tensor`) of every chunk, chunks in parallel, pieces of one chunk in tensor order.
  template <class Fn>
  void parallel_for_each_piece(const Fn& fn) const {
    at::parallel_for(0, num_chunks(), 1, [&](int64_t first_chunk, int64_t last_chunk) {
      for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
        const int64_t lo = chunk * kChunkElems;
        const int64_t hi = std::min(lo + kChunkElems, offsets_.back());
        // The last tensor starting at or before lo is the one holding element lo.
        size_t k = static_cast<size_t>(std::upper_bound(offsets_.begin(), offsets_.end(), lo) - offsets_.begin()) - 1;
        for (; k + 1 < offsets_.size() && offsets_[k] < hi; ++k) {
          const int64_t begin = std::max(lo, offsets_[k]) - offsets_[k];
          const int64_t end = std::min(hi, offsets_[k + 1]) - offsets_[k];
          if (end > begin) fn(chunk, k, begin, end);
        }
      }
    });
  }

 private:
  std::vector<int64_t> offsets_;  // offsets_[k]: position of tensor k's first element
};

}  // namespace cpu
}  // namespace badam
