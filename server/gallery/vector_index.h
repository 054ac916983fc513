// VectorIndex: exact maximum-inner-product search over one gallery's unit vectors, kept as rows
// 0..size()-1, each of the index's dimension (fixed when it is made: the gallery's model's, 512
// for ArcFace, 128 for dlib; kDim below stands for it). Galleries (galleries.h) maps rows to faces;
// an index knows only vectors.
//
// Contract
// - Rows: Add() appends; SwapRemove(r) moves the last row into row r (unless r is the last) and
//   drops the last, so rows stay dense and a removal costs one row's copy.
// - Search(): for each of `nq` probes (unit vectors, row-major), the k rows of highest inner
//   product, in descending order; k <= size(). Ties may come in any order. Exact: the same
//   answer as a brute-force scan, up to float rounding of the dot products.
// - Errors: Add() may fail with RESOURCE_EXHAUSTED (device memory); Search() with INTERNAL for a
//   failure of the library below (the reason in the message). Nothing is half-applied.
// - Thread safety: Search() and Row() may run concurrently with each other; Add() and
//   SwapRemove() need exclusive access (the caller's lock).
// - Blocking: Search() uses the calling thread and FAISS's OpenMP threads (or the device).
#ifndef ARCFACE_SERVER_GALLERY_VECTOR_INDEX_H_
#define ARCFACE_SERVER_GALLERY_VECTOR_INDEX_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/gallery/gallery_store.h"

namespace arcface::gallery {

class VectorIndex {
 public:
  virtual ~VectorIndex() = default;
  // "flat" (FAISS on the CPU), "torch:cuda:0".
  virtual std::string Describe() const = 0;
  virtual size_t size() const = 0;
  // Appends n rows of kDim floats.
  virtual absl::Status Add(const float* units, size_t n) = 0;
  // Appends the rows of `units` (size a multiple of kDim), taking the vector when it can (a
  // gallery's first load then holds its matrix once, not twice).
  virtual absl::Status Adopt(std::vector<float> units) = 0;
  virtual void SwapRemove(size_t row) = 0;
  // sims and rows: nq × k each.
  virtual absl::Status Search(const float* probes, int nq, int k, float* sims,
                              int64_t* rows) const = 0;
  // Row r's vector into out[0..kDim).
  virtual void Row(size_t row, float* out) const = 0;
  // Bytes of memory the vectors take (host or device).
  virtual size_t bytes() const = 0;
};

// Exact search with FAISS on the CPU (faiss::knn_inner_product over a row-major matrix) of
// `dim`-long rows.
std::unique_ptr<VectorIndex> MakeFlatIndex(int dim = kDim);

// Makes a new, empty index of `dim`-long rows for a gallery (the flat index, or the device
// matrix on CUDA).
using VectorIndexFactory = std::function<std::unique_ptr<VectorIndex>(int dim)>;

}  // namespace arcface::gallery

#endif  // ARCFACE_SERVER_GALLERY_VECTOR_INDEX_H_
