#include "client/cpp/policies.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/address.h"

namespace arcface::client {

absl::Status ValidateRetryPolicy(const RetryPolicy& p) {
  if (p.max_attempts < 1 || p.max_attempts > 100) {
    return absl::InvalidArgumentError(
        absl::StrCat("retry max_attempts must be in 1..100, got ", p.max_attempts));
  }
  if (p.initial_backoff <= absl::ZeroDuration() || p.max_backoff < p.initial_backoff) {
    return absl::InvalidArgumentError(absl::StrCat(
        "retry backoff: need 0 < initial (", absl::FormatDuration(p.initial_backoff),
        ") <= max (", absl::FormatDuration(p.max_backoff), ")"));
  }
  if (!(p.multiplier >= 1.0) || !std::isfinite(p.multiplier)) {
    return absl::InvalidArgumentError(
        absl::StrCat("retry multiplier must be >= 1, got ", p.multiplier));
  }
  if (!(p.jitter >= 0.0 && p.jitter < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("retry jitter must be in [0, 1), got ", p.jitter));
  }
  return absl::OkStatus();
}

absl::Duration BackoffDelay(const RetryPolicy& p, int retry, double u) {
  const double initial = absl::ToDoubleSeconds(p.initial_backoff);
  const double cap = absl::ToDoubleSeconds(p.max_backoff);
  // Capped before it can overflow: multiplier^k grows past any cap within ~60 steps.
  double base = initial;
  for (int i = 1; i < retry && base < cap; ++i) base *= p.multiplier;
  base = std::min(base, cap);
  const double factor = 1.0 + p.jitter * (2.0 * std::clamp(u, 0.0, 1.0) - 1.0);
  return absl::Seconds(base * factor);
}

absl::StatusOr<std::vector<std::pair<size_t, size_t>>> SplitIntoRequests(
    const std::vector<size_t>& face_bytes, int max_faces, uint64_t max_message_bytes) {
  if (max_faces < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max faces per request must be >= 1, got ",
                                                   max_faces));
  }
  const uint64_t budget = max_message_bytes == 0 ? UINT64_MAX
                          : max_message_bytes > kRequestOverheadBytes
                              ? max_message_bytes - kRequestOverheadBytes
                              : 0;
  std::vector<std::pair<size_t, size_t>> out;
  size_t begin = 0;
  uint64_t used = 0;
  for (size_t i = 0; i < face_bytes.size(); ++i) {
    const uint64_t size = uint64_t{face_bytes[i]} + kPerFaceOverheadBytes;
    if (size > budget) {
      return absl::InvalidArgumentError(absl::StrCat(
          "face ", i, " is ", face_bytes[i], " bytes, more than the server accepts in one "
          "message (", max_message_bytes, " bytes, its --max-message-bytes)"));
    }
    if (i > begin && (i - begin >= size_t(max_faces) || used + size > budget)) {
      out.emplace_back(begin, i);
      begin = i;
      used = 0;
    }
    used += size;
  }
  if (begin < face_bytes.size()) out.emplace_back(begin, face_bytes.size());
  return out;
}

absl::StatusOr<std::vector<std::string>> ParseAddressList(const std::string& list) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(list, ',')) {
    std::string address(absl::StripAsciiWhitespace(part));
    if (address.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", list, "': an empty address in the list"));
    }
    absl::StatusOr<common::HostPort> parsed =
        common::ParseHostPort(address, common::PortZero::kRefused);
    if (!parsed.ok()) return parsed.status();
    out.push_back(std::move(address));
  }
  return out;
}

absl::StatusOr<std::string> StaticTarget(const std::vector<std::string>& ip_addresses) {
  if (ip_addresses.empty()) return absl::InvalidArgumentError("no server address");
  const bool v6 = ip_addresses.front().front() == '[';
  std::string target = v6 ? "ipv6:" : "ipv4:";
  for (size_t i = 0; i < ip_addresses.size(); ++i) {
    const std::string& a = ip_addresses[i];
    if ((a.front() == '[') != v6) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot mix IPv4 and IPv6 servers in one list (", ip_addresses.front(), ", ", a,
          "); give addresses of one family"));
    }
    absl::StrAppend(&target, i ? "," : "", a);
  }
  return target;
}

}  // namespace arcface::client
