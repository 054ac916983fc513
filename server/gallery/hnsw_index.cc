// Placeholder until the HNSW index lands (branch gallery-search).
#include "server/gallery/hnsw_index.h"

namespace arcface::gallery {

absl::StatusOr<std::unique_ptr<HnswIndex>> HnswIndex::Build(const HnswOptions&, const float*,
                                                            const int64_t*, size_t) {
  return absl::UnimplementedError("the HNSW index is not built yet");
}

}  // namespace arcface::gallery
