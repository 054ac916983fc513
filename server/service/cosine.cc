#include "server/service/cosine.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "server/service/embedding_model.h"

namespace arcface::service {
namespace {

// The L2 norm of a row, summed in double.
double RawNorm(const float* row, int dim) {
  double ss = 0;
  for (int j = 0; j < dim; ++j) ss += double(row[j]) * row[j];
  return std::sqrt(ss);
}

}  // namespace

bool ToUnit(const float* row, int dim, float* unit) {
  const double norm = RawNorm(row, dim);
  if (!(norm > 0) || !std::isfinite(norm)) return false;
  for (int j = 0; j < dim; ++j) unit[j] = static_cast<float>(row[j] / norm);
  return true;
}

CosineBlocks::CosineBlocks(const std::vector<float>& a_unit, const std::vector<float>& b_unit,
                           int rows, int cols, int dim)
    : a_unit_(a_unit), rows_(rows), cols_(cols), dim_(dim), bt_(size_t(dim) * cols),
      out_(size_t(rows) * cols), acc_(cols) {
  // b transposed, so that the inner loop runs over j element-wise (vectorizable without
  // reassociating the sum).
  for (int j = 0; j < cols; ++j) {
    for (int k = 0; k < dim; ++k) bt_[size_t(k) * cols + j] = b_unit[size_t(j) * dim + k];
  }
}

bool CosineBlocks::ComputeSome(int64_t macs) {
  const int64_t per_row = std::max<int64_t>(1, int64_t{cols_} * dim_);
  const int end =
      next_row_ + static_cast<int>(std::min<int64_t>(rows_ - next_row_,
                                                     std::max<int64_t>(1, macs / per_row)));
  for (; next_row_ < end; ++next_row_) {
    const int i = next_row_;
    std::fill(acc_.begin(), acc_.end(), 0.0);  // double sums: cos(a, a) is 1 to float rounding
    const float* a = a_unit_.data() + size_t(i) * dim_;
    for (int k = 0; k < dim_; ++k) {
      const double ak = a[k];
      const float* b = bt_.data() + size_t(k) * cols_;
      for (int j = 0; j < cols_; ++j) acc_[j] += ak * b[j];
    }
    float* row = out_.data() + size_t(i) * cols_;
    for (int j = 0; j < cols_; ++j) row[j] = static_cast<float>(acc_[j]);
  }
  return next_row_ < rows_;
}

std::vector<float> CosineMatrix(const std::vector<float>& a_unit, const std::vector<float>& b_unit,
                                int rows, int cols, int dim) {
  CosineBlocks blocks(a_unit, b_unit, rows, cols, dim);
  while (blocks.ComputeSome(std::numeric_limits<int64_t>::max())) {
  }
  return std::move(blocks).Take();
}

}  // namespace arcface::service
