// Demo weights: a seeded random checkpoint in the exact key layout, for running the real
// pipeline where no trained weights can be had. Its embeddings are NOT meaningful; everything
// that reports a model labels it as demo weights.
//
// Contract
// - Deterministic: the same seed and blocks give bit-identical tensors on every machine (own
//   generator, no std::normal_distribution whose output is implementation-defined).
// - Scales keep activations O(1) through the network, so different crops give clearly
//   different embeddings.
// - sha256 is the SHA-256 of a description of the generator's inputs (there is no file);
//   format is "demo". Pure function; thread-safe; takes about a second for r50.
#ifndef ARCFACE_SERVER_MODEL_DEMO_WEIGHTS_H_
#define ARCFACE_SERVER_MODEL_DEMO_WEIGHTS_H_

#include <array>
#include <cstdint>

#include "server/model/checkpoint.h"

namespace arcface::model {

inline constexpr std::array<int, 4> kR50Blocks = {3, 4, 14, 3};

Checkpoint MakeDemoCheckpoint(uint64_t seed = 0, const std::array<int, 4>& blocks = kR50Blocks);

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_DEMO_WEIGHTS_H_
