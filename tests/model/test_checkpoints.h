// Test helpers: build IResNet checkpoints in memory and write them as safetensors or ONNX, so
// the loader tests need no downloaded weights.
//
// Contract: plain functions without shared state; file-writing failures are reported as gtest
// failures of the calling test.
#ifndef ARCFACE_TESTS_MODEL_TEST_CHECKPOINTS_H_
#define ARCFACE_TESTS_MODEL_TEST_CHECKPOINTS_H_

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "server/model/checkpoint.h"
#include "server/model/onnx_weights.pb.h"

namespace arcface::model::test_util {

// How MakeTensors picks values.
enum class Values {
  kAnyFloat,    // 24 significant bits: only float32 storage keeps them exactly
  kExact16,     // k/128, |k| <= 127: exact in float16 and bfloat16 too
  kZero,
};

// Every key of ExpectedShapes(blocks), filled deterministically (running_var > 0).
std::map<std::string, HostTensor> MakeTensors(const std::array<int, 4>& blocks, Values values);

// One safetensors header entry with its raw little-endian bytes.
struct RawEntry {
  std::string name;
  std::string dtype;  // "F32", "F16", "BF16", "I64", ...
  std::vector<int64_t> shape;
  std::string data;
};

// float32 → float16 / bfloat16 bits; the value must be exactly representable (asserted).
uint16_t FloatToHalfExact(float value);
uint16_t FloatToBFloat16Exact(float value);

// Encodes tensors in `dtype` ("F32", "F16" or "BF16").
std::vector<RawEntry> ToEntries(const std::map<std::string, HostTensor>& tensors,
                                const std::string& dtype);

// Lays entries out back to back in the given order and returns the whole file: 8-byte
// length, JSON header (with `__metadata__` when `metadata` is non-empty), data.
std::string EncodeSafetensors(const std::vector<RawEntry>& entries,
                              const std::map<std::string, std::string>& metadata = {});

// A file from a header text and a data region, for malformed headers.
std::string EncodeRaw(const std::string& header, const std::string& data);

// Options for BuildOnnx; the defaults mimic torch 1.13's export (see the .cc).
struct OnnxOptions {
  bool downsample_before_conv1 = false;  // emit block 0's 1×1 conv first
  bool float_data = false;               // float_data instead of raw_data
  bool float16 = false;                  // FLOAT16 initializers (values must be exact)
  bool flat_prelu = false;               // PRelu slopes as [C] instead of [C,1,1]
  bool transpose_fc = false;             // Gemm transB=0 with fc.weight stored [in, out]
};

// A ModelProto laid out as torch.onnx exports InsightFace's unfused IResNet in eval mode: BN
// folded into convs (numeric initializer names), block bn1 / bn2 / features kept as
// BatchNormalization with PyTorch names, PRelu slopes [C,1,1], fc as Gemm transB=1.
onnx::ModelProto BuildOnnx(const std::map<std::string, HostTensor>& tensors,
                           const std::array<int, 4>& blocks, const OnnxOptions& options = {});

// A fresh path under the test temp directory (the file is not created).
std::string TempPath(const std::string& name);
void WriteFile(const std::string& path, const std::string& bytes);

}  // namespace arcface::model::test_util

#endif  // ARCFACE_TESTS_MODEL_TEST_CHECKPOINTS_H_
