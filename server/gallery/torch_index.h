// MakeTorchIndex: the VectorIndex (vector_index.h) kept as one matrix in a libtorch device's
// memory, for a server whose model runs on CUDA: a search is one matmul and one top-k there, and
// only the nq × k answers come back to the host.
//
// Contract (beyond VectorIndex's)
// - Memory: rows live in a [capacity × dim] float32 tensor on `device`; Add() doubles the
//   capacity when it is full (a new tensor, the old rows copied, then the old one freed), so
//   bytes() is the capacity's size, at most twice the rows'. Adopt() copies the vector to the
//   device and frees it.
// - Errors: out of device (or host) memory is RESOURCE_EXHAUSTED, any other libtorch error
//   INTERNAL, with libtorch's message; a failed Add() leaves the rows as they were.
//   SwapRemove() and Row() cannot report an error: if the device fails in one of them, every
//   later Add() and Search() answers INTERNAL with that failure (and Row() fills `out` with NaN),
//   never a result from a matrix in an unknown state.
// - Thread safety and blocking: as VectorIndex; Search() waits for the device's answer.
// - Only server/app links this (library arcface_gallery_torch): arcface_gallery stays free of
//   libtorch.
#ifndef ARCFACE_SERVER_GALLERY_TORCH_INDEX_H_
#define ARCFACE_SERVER_GALLERY_TORCH_INDEX_H_

#include <memory>

#include <c10/core/Device.h>

#include "server/gallery/vector_index.h"

namespace arcface::gallery {

std::unique_ptr<VectorIndex> MakeTorchIndex(c10::Device device, int dim = kDim);

}  // namespace arcface::gallery

#endif  // ARCFACE_SERVER_GALLERY_TORCH_INDEX_H_
