// ONNX weights reader: the initializers of an InsightFace IResNet ONNX export (w600k_r50.onnx,
// glintr100.onnx, or any torch.onnx export of the unfused IResNet with BN folded into the
// convolutions), mapped onto the fused-BN checkpoint keys of docs/MODEL.md.
//
// Contract
// - ParseOnnxModel only decodes the protobuf (files up to 2 GiB, protobuf's own limit); it
//   fails on bytes that are not a ModelProto with a non-empty graph, which is how the loader
//   tells ONNX from other formats.
// - ExtractOnnxWeights maps BatchNormalization inputs by their PyTorch names
//   (`<prefix>.weight|bias|running_mean|running_var`, eps must be 1e-5), the single Gemm's
//   weight and bias to `fc.*` (a transB=0 weight is transposed), and Conv weights/biases and
//   PRelu slopes by graph position: stem conv, then per block conv1, conv2 and, on block 0,
//   the 1×1 downsample (found by its kernel, wherever it sits inside the block); PRelus: stem,
//   then one per block, slopes [C,1,1] or [C] → [C]. Block counts come from the BN names.
//   Checked: node counts (Conv, PRelu, BatchNormalization, Gemm, Add), that no other op
//   could change the computation (only Flatten and shape/identity ops may appear besides),
//   conv kernels/strides/pads/groups, BN eps and eval mode, every shape, and that each float
//   initializer is used exactly once (integer shape constants may stay). External data,
//   sparse initializers and non-float weights are refused. Only FLOAT, FLOAT16 and BFLOAT16
//   initializers (raw_data little-endian, or float_data / int32_data) are read.
// - It does not check finiteness (the caller validates values for every format alike).
// - Errors: INVALID_ARGUMENT naming the node and initializer and the key it would fill
//   (ExtractOnnxWeights's messages start with "ONNX: "); the file name is added by the
//   caller. Never throws.
// - ExtractOnnxWeights frees each initializer's bytes in `*model` as it converts them, to keep
//   the peak memory of a large file near two copies of the weights.
// - Thread-safe (no shared state).
#ifndef ARCFACE_SERVER_MODEL_ONNX_WEIGHTS_H_
#define ARCFACE_SERVER_MODEL_ONNX_WEIGHTS_H_

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/model/checkpoint.h"

namespace arcface::onnx {
class ModelProto;  // server/model/onnx_weights.pb.h
}  // namespace arcface::onnx

namespace arcface::model {

absl::StatusOr<std::unique_ptr<onnx::ModelProto>> ParseOnnxModel(absl::string_view bytes);

absl::StatusOr<std::map<std::string, HostTensor>> ExtractOnnxWeights(onnx::ModelProto* model);

}  // namespace arcface::model

#endif  // ARCFACE_SERVER_MODEL_ONNX_WEIGHTS_H_
