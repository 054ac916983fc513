// HnswIndex: approximate maximum-inner-product search (FAISS's HNSW graph over a flat copy of
// the vectors, with its inner products vectorized here) over the faces of one large gallery,
// beside its exact VectorIndex. Faces are known to it by their slot, a number Galleries gives
// each face for its life (rows move on removal, slots do not).
//
// Contract
// - Build() makes the graph from a snapshot (blocking, minutes: about 1,000 faces/s on one core
//   at 10k faces, slower as the graph outgrows the caches; Galleries runs it on a background
//   thread, serving exact search meanwhile). Add() inserts faces enrolled since.
// - Memory: its own copy of the vectors (2 KB a face) plus the graph (2·M neighbours of 4 bytes
//   a face at level 0, a little more above).
//   Removed faces stay in the graph; Galleries skips their slots in the answers (and rebuilds
//   when too many are dead), so Search() is asked for more than it needs.
// - Search(): for each of nq unit probes, up to k (slot, similarity) pairs, best first; a
//   missing result has slot -1. Approximate: recall is measured by tests/bench/gallery_bench.
// - Errors: INVALID_ARGUMENT for bad options; INTERNAL for a FAISS exception (its message).
// - Thread safety: Search() may run concurrently with Search(); Add() needs exclusive access.
#ifndef ARCFACE_SERVER_GALLERY_HNSW_INDEX_H_
#define ARCFACE_SERVER_GALLERY_HNSW_INDEX_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/gallery/gallery_store.h"

namespace arcface::gallery {

// The defaults reach recall@10 >= 0.99 on 10k random unit vectors (tests/bench/gallery_bench,
// docs/BENCHMARKS.md): M=32 with efConstruction=80 stayed near 0.95 even at efSearch=256.
struct HnswOptions {
  int m = 48;                 // graph degree (--gallery-hnsw-m)
  int ef_construction = 200;  // build-time beam
  int ef_search = 256;        // search-time beam (--gallery-hnsw-ef-search), raised to k if lower
};

class HnswIndex {
 public:
  // n unit vectors (n × dim floats) and their slots.
  static absl::StatusOr<std::unique_ptr<HnswIndex>> Build(const HnswOptions& options,
                                                          const float* units, const int64_t* slots,
                                                          size_t n, int dim = kDim);
  virtual ~HnswIndex() = default;
  virtual absl::Status Add(const float* units, const int64_t* slots, size_t n) = 0;
  virtual absl::Status Search(const float* probes, int nq, int k, float* sims,
                              int64_t* slots) const = 0;
  // Changes the search-time beam of the same graph (the bench's sweep of recall against
  // latency). Needs exclusive access, as Add(): FAISS 1.7 reads the beam from the index, not from
  // a search's parameters. INVALID_ARGUMENT when out of the options' range.
  virtual absl::Status SetEfSearch(int ef_search) = 0;
  virtual size_t size() const = 0;  // faces in the graph, dead ones included
  virtual std::string Describe() const = 0;  // "hnsw(M=32,efSearch=128)", the current beam
};

}  // namespace arcface::gallery

#endif  // ARCFACE_SERVER_GALLERY_HNSW_INDEX_H_
