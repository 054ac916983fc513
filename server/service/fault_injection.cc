#include "server/service/fault_injection.h"

#include <stdexcept>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

namespace arcface::service {
namespace {

std::atomic<FaultInjector*> installed{nullptr};

absl::Status BadRule(absl::string_view rule, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("rule '", rule, "': ", why));
}

bool ParseOrdinal(absl::string_view text, int64_t* n) {
  return absl::SimpleAtoi(text, n) && *n >= 1;
}

}  // namespace

absl::StatusOr<std::unique_ptr<FaultInjector>> FaultInjector::Parse(absl::string_view spec) {
  std::unique_ptr<FaultInjector> f(new FaultInjector());
  f->spec_ = std::string(spec);
  const std::vector<absl::string_view> rules = absl::StrSplit(spec, ',', absl::SkipWhitespace());
  if (rules.empty()) return absl::InvalidArgumentError("no rule (e.g. fail-batch=2)");
  for (absl::string_view rule : rules) {
    const std::pair<absl::string_view, absl::string_view> kv =
        absl::StrSplit(rule, absl::MaxSplits('=', 1));
    const absl::string_view key = kv.first;
    int64_t n = 0;
    if (key == "stall-batch") {
      const std::pair<absl::string_view, absl::string_view> nd =
          absl::StrSplit(kv.second, absl::MaxSplits(':', 1));
      absl::Duration d;
      if (!ParseOrdinal(nd.first, &n) || !absl::ParseDuration(nd.second, &d) ||
          d <= absl::ZeroDuration() || d > absl::Hours(1)) {
        return BadRule(rule, "expected stall-batch=N:DURATION, N >= 1, 0 < DURATION <= 1h");
      }
      f->stall_batches_[n] = d;
      continue;
    }
    if (!ParseOrdinal(kv.second, &n)) return BadRule(rule, "expected KEY=N with N >= 1");
    if (key == "fail-batch") {
      f->fail_batches_.insert(n);
    } else if (key == "throw-batch") {
      f->throw_batches_.insert(n);
    } else if (key == "fail-face") {
      f->fail_faces_.insert(n);
    } else {
      return BadRule(rule, "unknown; expected fail-batch, throw-batch, stall-batch or fail-face");
    }
  }
  return f;
}

absl::Status FaultInjector::BeforeBatch() {
  const int64_t n = batches_.fetch_add(1) + 1;
  if (fail_batches_.count(n) != 0) {
    return absl::InternalError(absl::StrCat("injected fault: batch ", n, " failed"));
  }
  if (throw_batches_.count(n) != 0) {
    throw std::runtime_error(absl::StrCat("injected fault: batch ", n, " threw"));
  }
  if (auto it = stall_batches_.find(n); it != stall_batches_.end()) absl::SleepFor(it->second);
  return absl::OkStatus();
}

absl::Status FaultInjector::BeforeFace() {
  FaultInjector* f = installed.load(std::memory_order_acquire);
  if (f == nullptr) return absl::OkStatus();
  const int64_t n = f->faces_.fetch_add(1) + 1;
  if (f->fail_faces_.count(n) != 0) {
    return absl::InternalError(absl::StrCat("injected fault: preprocessing of face ", n,
                                            " (of the process) failed"));
  }
  return absl::OkStatus();
}

void FaultInjector::Install(FaultInjector* injector) {
  installed.store(injector, std::memory_order_release);
}

}  // namespace arcface::service
