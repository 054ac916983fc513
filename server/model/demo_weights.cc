#include "server/model/demo_weights.h"

#include <cmath>
#include <numeric>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/model/sha256.h"

namespace arcface::model {
namespace {

// splitmix64: tiny, fast, and its output is fixed by its definition (unlike the standard
// library's distributions), so demo weights are the same everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double Uniform() { return ((Next() >> 11) + 0.5) * 0x1.0p-53; }  // (0, 1)
  // Box–Muller; one value per call keeps the sequence simple to reason about.
  double Normal() { return std::sqrt(-2 * std::log(Uniform())) * std::cos(2 * M_PI * Uniform()); }

 private:
  uint64_t state_;
};

}  // namespace

Checkpoint MakeDemoCheckpoint(uint64_t seed, const std::array<int, 4>& blocks) {
  Checkpoint ckpt;
  ckpt.blocks = blocks;
  const int depth = 2 + 2 * std::accumulate(blocks.begin(), blocks.end(), 0);
  ckpt.arch = absl::StrCat("r", depth);
  ckpt.format = "demo";
  ckpt.path = absl::StrCat("<demo weights, seed ", seed, ">");
  const std::string identity =
      absl::StrCat("arcface demo weights v1; seed ", seed, "; blocks ", absl::StrJoin(blocks, ","));
  ckpt.sha256 = *Sha256Hex(identity);

  Rng rng(seed);
  for (const auto& [name, shape] : ExpectedShapes(blocks)) {
    HostTensor t;
    t.shape = shape;
    const int64_t numel = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
    const int64_t fan_in = shape.size() > 1 ? numel / shape[0] : 1;
    double mean = 0, std = 0;
    if (absl::EndsWith(name, "running_var") || (absl::EndsWith(name, ".weight") && shape.size() == 1 &&
                                                !absl::StrContains(name, "prelu"))) {
      mean = 1;  // BN scale and variance
    } else if (absl::StrContains(name, "prelu")) {
      mean = 0.25;
    } else if (shape.size() > 1) {
      // He initialisation; the residual branch's last conv is damped so the sum of 24+ blocks
      // stays O(1).
      std = std::sqrt(2.0 / fan_in) * (absl::StrContains(name, "conv2") ? 0.2 : 1.0);
      if (name == "fc.weight") std = 1.0 / std::sqrt(static_cast<double>(fan_in));
    }
    t.values.resize(numel);
    for (float& v : t.values) v = static_cast<float>(mean + (std > 0 ? std * rng.Normal() : 0.0));
    ckpt.tensors.emplace(name, std::move(t));
  }
  return ckpt;
}

}  // namespace arcface::model
