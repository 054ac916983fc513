#include "server/engine/onednn_net.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <oneapi/dnnl/dnnl.hpp>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/engine/int8_calibration/crops.h"
#include "server/model/shapes.h"

// GNU libgomp's, the OpenMP runtime oneDNN runs on (declared here rather than through <omp.h>,
// which under clang would be LLVM's).
extern "C" void omp_set_num_threads(int threads);

namespace arcface::engine {
namespace {

using dnnl::memory;
using dt = memory::data_type;
using tag = memory::format_tag;

constexpr double kBatchNormEps = 1e-5;
constexpr int64_t kStageWidths[4] = {64, 128, 256, 512};
constexpr int64_t kHeadSide = 7;
constexpr float kInt8Max = 127.f;

// A float tensor in plain (row-major, PyTorch) layout. The net keeps these so that the plan of
// a new batch size can reorder them into whatever layout its kernels ask for.
struct PlainTensor {
  memory::dims dims;
  std::vector<float> values;
};

struct Conv {
  PlainTensor weight;  // OIHW
  PlainTensor bias;    // O
  PlainTensor prelu;   // [1, O, 1, 1] slopes, empty when there is no PReLU after it
  int64_t stride = 1;
  int64_t pad = 1;
  std::vector<float> weight_scales;  // int8: per output channel, 127 / max |w|
};

struct Block {
  int64_t in_channels = 0;
  int64_t channels = 0;
  int64_t stride = 1;
  PlainTensor bn_scale, bn_shift;  // bn1 as y = x * scale + shift, each [1, Cin, 1, 1]
  Conv conv1, conv2;
  std::optional<Conv> downsample;
  // int8 only. Each s8 tensor holds its channel c scaled by its own factor k[c] (127 over the
  // channel's calibrated range); the factors are folded into the neighbouring weights, which
  // is exact: the convolutions zero-pad, and zero scaled stays zero; PReLU commutes with a
  // positive scale. So CalibrateAndPrepareInt8 multiplies bn1's scale and shift by k_in and divides
  // conv1's input channels by k_in and conv2's by k_mid; conv1's outputs are multiplied by
  // k_mid through its output scales.
  std::vector<float> k_mid;
};

const std::vector<float>& Tensor(const model::Checkpoint& ckpt, const std::string& key) {
  // The checkpoint was validated against ExpectedShapes when it was loaded.
  return ckpt.tensors.at(key).values;
}

PlainTensor Plain(memory::dims dims, std::vector<float> values) {
  return PlainTensor{std::move(dims), std::move(values)};
}

// Inference BatchNorm as y = x * scale + shift, in double.
std::pair<std::vector<double>, std::vector<double>> BatchNormAffine(const model::Checkpoint& ckpt,
                                                                    const std::string& prefix) {
  const auto& w = Tensor(ckpt, prefix + ".weight");
  const auto& b = Tensor(ckpt, prefix + ".bias");
  const auto& mean = Tensor(ckpt, prefix + ".running_mean");
  const auto& var = Tensor(ckpt, prefix + ".running_var");
  std::vector<double> scale(w.size()), shift(w.size());
  for (size_t c = 0; c < w.size(); ++c) {
    scale[c] = w[c] / std::sqrt(static_cast<double>(var[c]) + kBatchNormEps);
    shift[c] = b[c] - mean[c] * scale[c];
  }
  return {scale, shift};
}

// int8 weights: per output channel, 127 over the row's largest magnitude.
void SetWeightScales(Conv& conv) {
  const memory::dims& d = conv.weight.dims;
  const int64_t per_out = d[1] * d[2] * d[3];
  conv.weight_scales.assign(d[0], 1.f);
  for (int64_t o = 0; o < d[0]; ++o) {
    float max_abs = 0;
    for (int64_t i = 0; i < per_out; ++i) {
      max_abs = std::max(max_abs, std::abs(conv.weight.values[o * per_out + i]));
    }
    if (max_abs > 0) conv.weight_scales[o] = kInt8Max / max_abs;
  }
}

Conv MakeConv(const model::Checkpoint& ckpt, const std::string& prefix, int64_t stride,
              const std::string& prelu_key) {
  const model::HostTensor& w = ckpt.tensors.at(prefix + ".weight");
  Conv conv;
  conv.weight = Plain({w.shape[0], w.shape[1], w.shape[2], w.shape[3]}, w.values);
  conv.bias = Plain({w.shape[0]}, Tensor(ckpt, prefix + ".bias"));
  if (!prelu_key.empty()) conv.prelu = Plain({1, w.shape[0], 1, 1}, Tensor(ckpt, prelu_key));
  conv.stride = stride;
  conv.pad = w.shape[2] / 2;
  SetWeightScales(conv);
  return conv;
}

// `conv` with input channel c divided by k[c], its per-output-channel weight scales redone.
Conv DivideInputChannels(const Conv& conv, const std::vector<float>& k) {
  Conv out = conv;
  const memory::dims& d = conv.weight.dims;
  const int64_t area = d[2] * d[3];
  for (int64_t o = 0; o < d[0]; ++o) {
    for (int64_t c = 0; c < d[1]; ++c) {
      float* w = out.weight.values.data() + (o * d[1] + c) * area;
      for (int64_t i = 0; i < area; ++i) w[i] /= k[c];
    }
  }
  SetWeightScales(out);
  return out;
}

// The head bn2 → flatten → fc → features as one affine map of the [512, 7, 7] feature map,
// folded in double. fc's input index is c·49 + h·7 + w, i.e. a [512, 512, 7, 7] kernel.
std::pair<PlainTensor, PlainTensor> FoldHead(const model::Checkpoint& ckpt) {
  auto [s1, t1] = BatchNormAffine(ckpt, "bn2");
  auto [s2, t2] = BatchNormAffine(ckpt, "features");
  const auto& fc_w = Tensor(ckpt, "fc.weight");
  const auto& fc_b = Tensor(ckpt, "fc.bias");
  const int64_t in = 512, out = model::kEmbeddingDim, area = kHeadSide * kHeadSide;
  std::vector<float> w(fc_w.size()), b(out);
  for (int64_t o = 0; o < out; ++o) {
    double bias = fc_b[o];
    for (int64_t c = 0; c < in; ++c) {
      for (int64_t k = 0; k < area; ++k) {
        const int64_t i = (o * in + c) * area + k;
        bias += fc_w[i] * t1[c];
        w[i] = static_cast<float>(fc_w[i] * s1[c] * s2[o]);
      }
    }
    b[o] = static_cast<float>(bias * s2[o] + t2[o]);
  }
  return {Plain({out, in, kHeadSide, kHeadSide}, std::move(w)), Plain({out}, std::move(b))};
}

// The activation buffers of a plan. Each step names the slots it reads and writes; the arenas
// behind the slots are shared by all plans and grow to the largest batch.
enum Slot {
  kInput,
  kStemInput,
  kResidualA,
  kResidualB,
  kBlockIn,
  kBlockMid,
  kOutput,
  kScratchpad,  // the primitives' temporary memory (one at a time runs)
  kSlots
};

// Every primitive of a plan takes its scratchpad from the plan's arena. oneDNN's own
// (library-managed) scratchpad is per thread and belongs to the thread that created the
// primitive: the server builds the warm-up plan on a thread that then exits, and running that
// plan from the model thread crashed.
dnnl::primitive_attr PlanAttr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

struct Operand {
  int slot = -1;      // an arena, or -1 for a fixed memory (weights)
  memory::desc desc;  // the slot's layout for this step
  memory fixed;
};

struct Step {
  dnnl::primitive primitive;
  std::vector<std::pair<int, Operand>> args;
  std::string what;  // e.g. "block12.conv2" (for error messages and debugging)
  int probe = -1;    // calibration: index into the probed tensors, output is DST
  // `args` as memories on the arenas, made once per arena generation (not on every pass).
  std::unordered_map<int, memory> bound;
};

struct Plan {
  std::vector<Step> steps;
  std::array<size_t, kSlots> slot_bytes{};
  int bound_generation = -1;  // the arenas' generation the steps' memories point into
};

dt QuantizedType(Precision precision) {
  switch (precision) {
    case Precision::kBf16:
      return dt::bf16;
    case Precision::kInt8:
      return dt::s8;
    default:
      return dt::f32;
  }
}

}  // namespace

struct OnednnNet::Impl {
  Precision precision = Precision::kFp32;
  int threads = 0;
  bool winograd = false;  // fp32 only: the other precisions have no Winograd kernels
  int max_chunk = 8;
  dnnl::engine cpu{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{cpu};

  Conv stem;
  std::vector<Block> blocks;
  PlainTensor head_weight, head_bias;

  // Reordered weights, one per (tensor, layout, quantization) in use.
  std::map<const void*, std::vector<std::pair<memory::desc, memory>>> reordered;
  std::map<int, Plan> plans;
  std::array<std::vector<char>, kSlots> arenas;
  int arena_generation = 0;  // bumped whenever an arena is reallocated
  // Calibration: the largest |x| of each channel of each probed tensor.
  std::vector<std::vector<float>> probe_max;
  const std::string* running = nullptr;  // the step Execute() is in, for error messages

  memory PlainMemory(const PlainTensor& t) {
    const tag plain = t.dims.size() == 1 ? tag::a : t.dims.size() == 2 ? tag::ab : tag::abcd;
    return memory({t.dims, dt::f32, plain}, cpu, const_cast<float*>(t.values.data()));
  }

  // `t` in layout `desc`, reordered (and for s8, scaled per output channel) once.
  memory Weights(const PlainTensor& t, const memory::desc& desc, const std::vector<float>* scales) {
    auto& cached = reordered[&t];
    for (const auto& [d, m] : cached) {
      if (d == desc) return m;
    }
    memory src = PlainMemory(t);
    memory dst(desc, cpu);
    dnnl::primitive_attr attr;
    if (desc.data_type() == dt::s8 && scales) attr.set_output_scales(1 << 0, *scales);
    dnnl::reorder(dnnl::reorder::primitive_desc(cpu, src.get_desc(), cpu, desc, attr))
        .execute(stream, src, dst);
    stream.wait();
    cached.emplace_back(desc, dst);
    return dst;
  }

  Operand Fixed(memory m) { return Operand{-1, m.get_desc(), m}; }
  static Operand InSlot(int slot, const memory::desc& desc) { return Operand{slot, desc, {}}; }

  void Add(Plan& plan, const dnnl::primitive_desc_base& pd, dnnl::primitive primitive,
           std::vector<std::pair<int, Operand>> args, std::string what, int probe = -1) {
    if (pd.scratchpad_desc().get_size() > 0) {
      args.push_back({DNNL_ARG_SCRATCHPAD, InSlot(kScratchpad, pd.scratchpad_desc())});
    }
    for (const auto& [arg, operand] : args) {
      if (operand.slot >= 0) {
        plan.slot_bytes[operand.slot] =
            std::max(plan.slot_bytes[operand.slot], operand.desc.get_size());
      }
    }
    plan.steps.push_back(Step{std::move(primitive), std::move(args), std::move(what), probe, {}});
  }

  struct ConvSpec {
    const Conv* conv;
    dt src_type, weight_type, dst_type;
    bool sum = false;                  // dst += conv(src) (the residual add)
    std::vector<float> output_scales;  // int8: per output channel; empty for none
    bool int8_bias = false;            // int8: the bias in the accumulator's units
  };

  // The convolution of `spec` on an n × C × side × side input. `dst` fixes the output layout
  // (the residual a sum post-op accumulates into); an `any` layout leaves it to the kernel.
  dnnl::convolution_forward::primitive_desc ConvPd(const ConvSpec& spec, int64_t n, int64_t side,
                                                   const std::optional<memory::desc>& dst) {
    const Conv& c = *spec.conv;
    const memory::dims& w = c.weight.dims;
    const int64_t out_side = (side + 2 * c.pad - w[2]) / c.stride + 1;
    // Activations' layout: the kernels' choice (nhwc, brgconv), or with Winograd nChw16c
    // throughout, Winograd's only layout (mixing the two costs a reorder at every block).
    const tag act_tag = winograd ? tag::aBcd16b : tag::any;
    const tag t = spec.src_type == dt::s8 || w[1] == 3 ? tag::any : act_tag;
    memory::desc src({n, w[1], side, side}, spec.src_type, t);
    memory::desc out = dst ? *dst
                           : memory::desc({n, w[0], out_side, out_side}, spec.dst_type,
                                          spec.src_type == dt::s8 ? tag::any : act_tag);
    dnnl::post_ops ops;
    if (spec.sum) ops.append_sum(1.f);
    dnnl::primitive_attr attr = PlanAttr();
    attr.set_post_ops(ops);
    if (!spec.output_scales.empty()) attr.set_output_scales(1 << 1, spec.output_scales);
    auto make = [&](dnnl::algorithm alg, const memory::desc& weights) {
      dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_inference, alg, src, weights,
                                        memory::desc({w[0]}, dt::f32, tag::a), out,
                                        {c.stride, c.stride}, {c.pad, c.pad}, {c.pad, c.pad});
      return dnnl::convolution_forward::primitive_desc(d, attr, cpu);
    };
    const memory::desc any_weights(w, spec.weight_type, tag::any);
    if (winograd && w[2] == 3 && c.stride == 1) {
      try {
        return make(dnnl::algorithm::convolution_winograd, any_weights);
      } catch (const dnnl::error&) {
        // No Winograd kernel for this shape or ISA: the direct one below.
      }
    }
    return make(dnnl::algorithm::convolution_direct, any_weights);
  }

  // Adds the convolution `pd` reading `src` (its slot and the layout it was written in) and
  // writing `dst_slot`; returns the output layout.
  memory::desc AddConv(Plan& plan, const ConvSpec& spec,
                       const dnnl::convolution_forward::primitive_desc& pd, int src_slot,
                       const memory::desc& src, int dst_slot, const std::string& what,
                       int probe = -1) {
    const Conv& c = *spec.conv;
    const int from = AddReorderIfNeeded(plan, src_slot, src, pd.src_desc(), what);
    const bool s8 = spec.weight_type == dt::s8;
    std::vector<std::pair<int, Operand>> args = {
        {DNNL_ARG_SRC, InSlot(from, pd.src_desc())},
        {DNNL_ARG_WEIGHTS,
         Fixed(Weights(c.weight, pd.weights_desc(), s8 ? &c.weight_scales : nullptr))},
        {DNNL_ARG_BIAS, Fixed(spec.int8_bias ? Int8Bias(c) : PlainMemory(c.bias))},
        {DNNL_ARG_DST, InSlot(dst_slot, pd.dst_desc())}};
    Add(plan, pd, dnnl::convolution_forward(pd), std::move(args), what,
        c.prelu.values.empty() ? probe : -1);
    if (!c.prelu.values.empty()) {
      // In place. oneDNN 2.6's fast convolutions take no PReLU post-op (with one, only the
      // reference convolution is left: 100× slower), so it is a pass of its own.
      dnnl::prelu_forward::desc d(dnnl::prop_kind::forward_inference, pd.dst_desc(),
                                  memory::desc(c.prelu.dims, dt::f32, tag::any));
      dnnl::prelu_forward::primitive_desc ppd(d, PlanAttr(), cpu);
      Add(plan, ppd, dnnl::prelu_forward(ppd),
          {{DNNL_ARG_SRC, InSlot(dst_slot, pd.dst_desc())},
           {DNNL_ARG_WEIGHTS, Fixed(Weights(c.prelu, ppd.weights_desc(), nullptr))},
           {DNNL_ARG_DST, InSlot(dst_slot, pd.dst_desc())}},
          what + ".prelu", probe);
    }
    return pd.dst_desc();
  }

  // The bias as oneDNN 2.x adds it in int8: to the integer accumulator, before the output
  // scale, so in the accumulator's units (bias · weight scale; the input's scale is folded
  // into the weights).
  std::map<const void*, std::vector<float>> int8_biases;
  memory Int8Bias(const Conv& c) {
    auto [it, added] = int8_biases.try_emplace(&c.bias, c.bias.values);
    if (added) {
      for (size_t o = 0; o < it->second.size(); ++o) it->second[o] *= c.weight_scales[o];
    }
    return memory({c.bias.dims, dt::f32, tag::a}, cpu, it->second.data());
  }

  // When a consumer wants `want` but the producer wrote `have` into `slot`, a reorder into the
  // stem-input scratch slot (used only at the start, so free later) bridges them.
  int AddReorderIfNeeded(Plan& plan, int slot, const memory::desc& have, const memory::desc& want,
                         const std::string& what) {
    if (have == want) return slot;
    const int scratch = slot == kStemInput ? kBlockIn : kStemInput;
    dnnl::reorder::primitive_desc pd(cpu, have, cpu, want, PlanAttr());
    Add(plan, pd, dnnl::reorder(pd),
        {{DNNL_ARG_FROM, InSlot(slot, have)}, {DNNL_ARG_TO, InSlot(scratch, want)}},
        what + ".reorder");
    return scratch;
  }

  Plan Build(int64_t n) {
    Plan plan;
    const bool int8 = precision == Precision::kInt8;
    const dt q = QuantizedType(precision);
    const memory::desc input({n, 3, model::kCropSize, model::kCropSize}, dt::f32, tag::nhwc);
    // The residual stream stays f32. Its layout is the kernels' choice, except in int8, whose
    // kernels read and write nhwc only.
    auto residual_layout = [&](int64_t channels, int64_t side) -> std::optional<memory::desc> {
      if (!int8) return std::nullopt;
      return memory::desc({n, channels, side, side}, dt::f32, tag::nhwc);
    };
    // Stem: f32 whatever the precision (3 input channels: 2 % of the work).
    ConvSpec stem_spec{&stem, dt::f32, dt::f32, dt::f32, false, {}, false};
    memory::desc x = AddConv(
        plan, stem_spec,
        ConvPd(stem_spec, n, model::kCropSize, residual_layout(kStageWidths[0], model::kCropSize)),
        kInput, input, kResidualA, "stem");
    int residual = kResidualA;
    for (size_t b = 0; b < blocks.size(); ++b) {
      const Block& blk = blocks[b];
      const std::string name = absl::StrCat("block", b);
      const int64_t side = x.dims()[2];
      ConvSpec conv1{&blk.conv1, q, q, q, false, {}, int8};
      ConvSpec conv2{&blk.conv2, q, q, dt::f32, /*sum=*/true, {}, int8};
      if (int8) {
        conv1.output_scales.resize(blk.channels);
        conv2.output_scales.resize(blk.channels);
        for (int64_t o = 0; o < blk.channels; ++o) {
          conv1.output_scales[o] = blk.k_mid[o] / blk.conv1.weight_scales[o];
          conv2.output_scales[o] = 1.f / blk.conv2.weight_scales[o];
        }
      }
      // bn1 → conv1: the BatchNorm cannot fold into conv1 (conv1 zero-pads bn1's output, not
      // its input), so it is a binary mul with an add post-op. It writes f32 in the residual's
      // layout (oneDNN 2.6's binary is fast only where input and output layouts agree) and a
      // reorder gives conv1 its layout; for int8 it writes conv1's s8 input directly.
      auto conv1_pd = ConvPd(conv1, n, side, std::nullopt);
      const memory::desc bn1_out = int8 ? conv1_pd.src_desc() : x;
      AddScaleShift(plan, blk.bn_scale, blk.bn_shift, residual, x, bn1_out, name + ".bn1",
                    Probe(2 * b));
      memory::desc u = AddConv(plan, conv1, conv1_pd, kBlockIn, bn1_out, kBlockMid, name + ".conv1",
                               Probe(2 * b + 1));
      // The shortcut: the input itself, or a strided 1×1 convolution of it (f32) into the
      // other residual arena; conv2 then adds its result into that arena.
      int out_slot = residual;
      memory::desc out_desc = x;
      if (blk.downsample) {
        out_slot = residual == kResidualA ? kResidualB : kResidualA;
        ConvSpec ds{&*blk.downsample, dt::f32, dt::f32, dt::f32, false, {}, false};
        const int64_t out_side = (side - 1) / blk.stride + 1;
        out_desc = AddConv(plan, ds, ConvPd(ds, n, side, residual_layout(blk.channels, out_side)),
                           residual, x, out_slot, name + ".downsample");
      }
      AddConv(plan, conv2, ConvPd(conv2, n, u.dims()[2], out_desc), kBlockMid, u, out_slot,
              name + ".conv2");
      residual = out_slot;
      x = out_desc;
    }
    // Head: one inner product over the [512, 7, 7] map (bn2, fc and features folded).
    const memory::desc output({n, model::kEmbeddingDim}, dt::f32, tag::nc);
    memory::desc w_any(head_weight.dims, dt::f32, tag::any);
    dnnl::inner_product_forward::desc d(dnnl::prop_kind::forward_inference, x, w_any,
                                        memory::desc(head_bias.dims, dt::f32, tag::a), output);
    dnnl::inner_product_forward::primitive_desc pd(d, PlanAttr(), cpu);
    const int src = AddReorderIfNeeded(plan, residual, x, pd.src_desc(), "head");
    Add(plan, pd, dnnl::inner_product_forward(pd),
        {{DNNL_ARG_SRC, InSlot(src, pd.src_desc())},
         {DNNL_ARG_WEIGHTS, Fixed(Weights(head_weight, pd.weights_desc(), nullptr))},
         {DNNL_ARG_BIAS, Fixed(PlainMemory(head_bias))},
         {DNNL_ARG_DST, InSlot(kOutput, output)}},
        "head");
    return plan;
  }

  int Probe(int index) { return probe_max.empty() ? -1 : index; }

  void AddScaleShift(Plan& plan, const PlainTensor& scale, const PlainTensor& shift, int src_slot,
                     const memory::desc& src, const memory::desc& dst, const std::string& what,
                     int probe) {
    // The per-channel operands in the activation's own layout (for [1, C, 1, 1] the bytes are
    // the same): oneDNN 2.6's jit binary takes a blocked input only with a blocked operand.
    const memory::desc blocked(src.dims(), dt::f32, tag::aBcd16b);
    const memory::desc per_channel(scale.dims, dt::f32, src == blocked ? tag::aBcd16b : tag::abcd);
    dnnl::post_ops ops;
    ops.append_binary(dnnl::algorithm::binary_add, per_channel);
    dnnl::primitive_attr attr = PlanAttr();
    attr.set_post_ops(ops);
    dnnl::binary::desc d(dnnl::algorithm::binary_mul, src, per_channel, dst);
    dnnl::binary::primitive_desc pd(d, attr, cpu);
    Add(plan, pd, dnnl::binary(pd),
        {{DNNL_ARG_SRC_0, InSlot(src_slot, src)},
         {DNNL_ARG_SRC_1, Fixed(memory(per_channel, cpu, const_cast<float*>(scale.values.data())))},
         {DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
          Fixed(memory(per_channel, cpu, const_cast<float*>(shift.values.data())))},
         {DNNL_ARG_DST, InSlot(kBlockIn, dst)}},
        what, probe);
  }

  Plan& PlanFor(int n) {
    auto it = plans.find(n);
    if (it == plans.end()) it = plans.emplace(n, Build(n)).first;
    Plan& plan = it->second;
    for (int s = 0; s < kSlots; ++s) {
      if (arenas[s].size() < plan.slot_bytes[s]) {
        arenas[s] = std::vector<char>();
        arenas[s].resize(plan.slot_bytes[s] + 64);
        ++arena_generation;
      }
    }
    if (plan.bound_generation != arena_generation) {
      for (Step& step : plan.steps) {
        step.bound.clear();
        for (const auto& [arg, operand] : step.args) {
          step.bound.emplace(arg, operand.slot < 0
                                      ? operand.fixed
                                      : memory(operand.desc, cpu, Aligned(arenas[operand.slot])));
        }
      }
      plan.bound_generation = arena_generation;
    }
    return plan;
  }

  // Measures the activation ranges the int8 path quantizes by running the fp32 network over
  // the calibration crops (the largest magnitude of each channel at bn1's and conv1's outputs),
  // then folds them into every block's tensors (see Block) and switches the net to int8. The
  // fp32 plans and reordered weights are dropped: they belong to the unscaled tensors.
  void CalibrateAndPrepareInt8(absl::Span<const uint8_t> crops) {
    precision = Precision::kFp32;
    probe_max.assign(2 * blocks.size(), {});
    const int n = static_cast<int>(crops.size() / model::kCropBytes);
    std::vector<float> out(static_cast<size_t>(n) * model::kEmbeddingDim);
    RunChunked(crops.data(), n, out.data());
    plans.clear();
    reordered.clear();
    for (size_t b = 0; b < blocks.size(); ++b) {
      Block& blk = blocks[b];
      const std::vector<float> k_in = ChannelFactors(probe_max[2 * b]);
      blk.k_mid = ChannelFactors(probe_max[2 * b + 1]);
      for (size_t c = 0; c < k_in.size(); ++c) {
        blk.bn_scale.values[c] *= k_in[c];
        blk.bn_shift.values[c] *= k_in[c];
      }
      blk.conv1 = DivideInputChannels(blk.conv1, k_in);
      blk.conv2 = DivideInputChannels(blk.conv2, blk.k_mid);
    }
    probe_max.clear();
    precision = Precision::kInt8;
  }

  // 127 over each channel's quantization range. The range is the geometric mean of the
  // channel's own calibrated range and the tensor's widest (per-channel resolution for narrow
  // channels, but not ranges so tight that an input unlike the calibration faces saturates
  // them), with headroom 1.5. Both choices were measured on the goldens (docs/PERFORMANCE.md):
  // per-tensor ranges lost resolution (worst 0.9888), per-channel ones saturated on salt-and-
  // pepper noise (0.8985). A channel that (nearly) never moved on the calibration crops gets at
  // least a twentieth of the widest range, so its factor does not shrink its weights into the
  // rounding of the weights' own quantization.
  static std::vector<float> ChannelFactors(const std::vector<float>& max_abs) {
    constexpr float kHeadroom = 1.5f;
    constexpr float kFloor = 0.05f;
    const float widest = std::max(*std::max_element(max_abs.begin(), max_abs.end()), 1e-6f);
    std::vector<float> k(max_abs.size());
    for (size_t c = 0; c < k.size(); ++c) {
      const float own = std::max(max_abs[c], kFloor * widest);
      k[c] = kInt8Max / (kHeadroom * std::sqrt(own * widest));
    }
    return k;
  }

  // Per-channel max |x| of an f32 activation, through a copy in nhwc (channels innermost).
  void RecordChannelMax(memory out, std::vector<float>& max_abs) {
    const memory::dims dims = out.get_desc().dims();
    memory plain({dims, dt::f32, tag::nhwc}, cpu);
    dnnl::reorder(out, plain).execute(stream, out, plain);
    stream.wait();
    const size_t channels = static_cast<size_t>(dims[1]);
    max_abs.resize(channels, 0.f);
    const float* v = static_cast<const float*>(plain.get_data_handle());
    const size_t count = plain.get_desc().get_size() / sizeof(float);
    for (size_t i = 0; i < count; ++i)
      max_abs[i % channels] = std::max(max_abs[i % channels], std::abs(v[i]));
  }

  static void* Aligned(std::vector<char>& arena) {
    // oneDNN's kernels prefer 64-byte aligned buffers; the arena has 64 spare bytes.
    const uintptr_t p = reinterpret_cast<uintptr_t>(arena.data());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
  }

  // A batch of up to max_chunk faces runs as it is. A larger one runs in chunks of exactly
  // max_chunk, the last one padded: a second plan in turn with the first (13 as 8 + 5) costs
  // more than the padding, because each plan's Winograd weights have their own layout and the
  // two sets evict each other from the caches (offline, 15 faces as 8 + 7 ran at 24 faces/s,
  // 8 alone at 32).
  void RunChunked(const uint8_t* crops, int n, float* embeddings) {
    if (n <= max_chunk) {
      Execute(crops, n, n, embeddings);
      return;
    }
    for (int first = 0; first < n; first += max_chunk) {
      Execute(crops + static_cast<size_t>(first) * model::kCropBytes,
              std::min(max_chunk, n - first), max_chunk,
              embeddings + static_cast<size_t>(first) * model::kEmbeddingDim);
    }
  }

  // Runs n crops through the plan of `plan_size` >= n faces; the rows past n are zeros (rows
  // never influence each other) and their outputs are dropped.
  void Execute(const uint8_t* crops, int n, int plan_size, float* embeddings) {
    if (threads > 0) omp_set_num_threads(threads);
    Plan& plan = PlanFor(plan_size);
    // (x − 127.5) / 127.5 into nhwc f32: the crops' own HWC order, so a flat loop (0.1 ms for
    // 8 crops, not worth a parallel region).
    float* input = static_cast<float*>(Aligned(arenas[kInput]));
    const size_t count = static_cast<size_t>(n) * model::kCropBytes;
    for (size_t i = 0; i < count; ++i) input[i] = (static_cast<float>(crops[i]) - 127.5f) / 127.5f;
    std::fill(input + count, input + static_cast<size_t>(plan_size) * model::kCropBytes, 0.f);
    for (const Step& step : plan.steps) {
      running = &step.what;
      step.primitive.execute(stream, step.bound);
      if (step.probe >= 0) RecordChannelMax(step.bound.at(DNNL_ARG_DST), probe_max[step.probe]);
    }
    stream.wait();
    std::memcpy(embeddings, Aligned(arenas[kOutput]),
                static_cast<size_t>(n) * model::kEmbeddingDim * sizeof(float));
  }
};

OnednnNet::OnednnNet(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
OnednnNet::~OnednnNet() = default;

bool OnednnNet::winograd() const { return impl_->winograd; }

std::string CpuLacksFor(Precision precision) {
  __builtin_cpu_init();
  switch (precision) {
    case Precision::kFp32:
      return "";
    case Precision::kBf16:
      return __builtin_cpu_supports("avx512bf16")
                 ? ""
                 : "this CPU has no AVX512-BF16 (bf16 needs it on the CPU)";
    case Precision::kInt8:
      return __builtin_cpu_supports("avx512bw")
                 ? ""
                 : "this CPU has no AVX-512 (int8 needs AVX512-BW at least)";
    case Precision::kFp16:
      return "fp16 is not supported on the CPU; use fp32, bf16 or int8";
  }
  return "unknown precision";
}

absl::StatusOr<std::unique_ptr<OnednnNet>> OnednnNet::Create(const model::Checkpoint& checkpoint,
                                                             const Options& options) {
  if (std::string lacks = CpuLacksFor(options.precision); !lacks.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("precision ", PrecisionName(options.precision), ": ", lacks));
  }
  auto impl = std::make_unique<Impl>();
  impl->precision = options.precision;
  impl->threads = options.threads;
  impl->winograd = options.winograd && options.precision == Precision::kFp32;
  impl->max_chunk = std::max(1, options.max_chunk);
  try {
    impl->stem = MakeConv(checkpoint, "conv1", 1, "prelu.weight");
    int64_t in_channels = kStageWidths[0];
    for (int stage = 0; stage < 4; ++stage) {
      for (int i = 0; i < checkpoint.blocks[stage]; ++i) {
        const std::string p = absl::StrCat("layer", stage + 1, ".", i);
        Block blk;
        blk.in_channels = i == 0 ? in_channels : kStageWidths[stage];
        blk.channels = kStageWidths[stage];
        blk.stride = i == 0 ? 2 : 1;
        auto [scale, shift] = BatchNormAffine(checkpoint, p + ".bn1");
        blk.bn_scale =
            Plain({1, blk.in_channels, 1, 1}, std::vector<float>(scale.begin(), scale.end()));
        blk.bn_shift =
            Plain({1, blk.in_channels, 1, 1}, std::vector<float>(shift.begin(), shift.end()));
        blk.conv1 = MakeConv(checkpoint, p + ".conv1", 1, p + ".prelu.weight");
        blk.conv2 = MakeConv(checkpoint, p + ".conv2", blk.stride, "");
        if (i == 0) blk.downsample = MakeConv(checkpoint, p + ".downsample", blk.stride, "");
        impl->blocks.push_back(std::move(blk));
      }
      in_channels = kStageWidths[stage];
    }
    std::tie(impl->head_weight, impl->head_bias) = FoldHead(checkpoint);
    if (options.precision == Precision::kInt8)
      impl->CalibrateAndPrepareInt8(Int8CalibrationCrops());
    if (options.warmup_batch > 0) {
      std::vector<uint8_t> zeros(model::kCropBytes * options.warmup_batch, 0);
      std::vector<float> out(model::kEmbeddingDim * options.warmup_batch);
      impl->RunChunked(zeros.data(), options.warmup_batch, out.data());
    }
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat(
        "oneDNN could not build the ", PrecisionName(options.precision), " network: ", e.what()));
  }
  return std::unique_ptr<OnednnNet>(new OnednnNet(std::move(impl)));
}

absl::Status OnednnNet::Run(const uint8_t* crops, int n, float* embeddings) {
  try {
    impl_->running = nullptr;
    impl_->RunChunked(crops, n, embeddings);
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("oneDNN forward pass of batch ", n, " failed",
                                            impl_->running ? " at " + *impl_->running : "", ": ",
                                            e.what()));
  }
  return absl::OkStatus();
}

}  // namespace arcface::engine
