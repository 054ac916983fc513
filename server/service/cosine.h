// Cosine maths of Compare: embeddings made unit-length, and the similarity matrix of two sets of
// unit vectors, computed a block of rows at a time.
//
// Contract
// - Ownership: see each function; nothing keeps a caller's buffer past a call except
//   CosineBlocks, which borrows `a_unit` until its last ComputeSome().
// - Blocking: CPU-bound and synchronous. A CosineBlocks step costs about the multiply-adds
//   asked for, so that a large matrix can take turns on the preprocessing pool.
// - Errors: none; ToUnit() says false for a vector that has no direction.
// - Thread safety: the functions are pure; one CosineBlocks is used by one thread at a time.
#ifndef ARCFACE_SERVER_SERVICE_COSINE_H_
#define ARCFACE_SERVER_SERVICE_COSINE_H_

#include <cstdint>
#include <utility>
#include <vector>

namespace arcface::service {

// Writes row / |row| into unit[0..dim); false when the norm is zero (or not finite).
bool ToUnit(const float* row, int dim, float* unit);

// The cosine similarity matrix of unit-length rows (rows × dim and cols × dim, row-major):
// similarities[i * cols + j] = dot(a_i, b_j), computed a block of rows at a time so that a large
// matrix takes turns on the pool with other calls' work and stops when its call is abandoned.
// Exposed for tests.
class CosineBlocks {
 public:
  // `a_unit` is borrowed until the last ComputeSome(); `b_unit` is copied (transposed).
  CosineBlocks(const std::vector<float>& a_unit, const std::vector<float>& b_unit, int rows,
               int cols, int dim);
  // Computes the next rows, about `macs` multiply-adds (at least one row); true while rows remain.
  bool ComputeSome(int64_t macs);
  int rows_done() const { return next_row_; }
  // The matrix; every row must be done.
  std::vector<float> Take() && { return std::move(out_); }

 private:
  const std::vector<float>& a_unit_;
  const int rows_, cols_, dim_;
  std::vector<float> bt_;  // b transposed: dim × cols
  std::vector<float> out_;
  std::vector<double> acc_;
  int next_row_ = 0;
};

// The whole matrix at once.
std::vector<float> CosineMatrix(const std::vector<float>& a_unit, const std::vector<float>& b_unit,
                                int rows, int cols, int dim);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_COSINE_H_
