// The pure decisions of the C++ client, apart from any channel so that tests can pin them down:
// the retry backoff schedule, how a list of faces is split into requests, and how a list of
// server addresses becomes one gRPC target.
//
// Contract
// - Pure functions of their arguments (randomness is passed in as a number); thread-safe.
// - Errors are absl::Status values whose message names the offending address or face.
#ifndef ARCFACE_CLIENT_CPP_POLICIES_H_
#define ARCFACE_CLIENT_CPP_POLICIES_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace arcface::client {

// Retries of calls that failed with UNAVAILABLE (server down, restarting, still loading its
// model, or draining). No other code is ever retried: INVALID_ARGUMENT would fail again, and
// DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED retried blindly would add load where there is too much.
struct RetryPolicy {
  int max_attempts = 5;  // attempts in all, the first included; 1 disables retries
  absl::Duration initial_backoff = absl::Milliseconds(200);
  absl::Duration max_backoff = absl::Seconds(5);
  double multiplier = 2.0;
  double jitter = 0.2;  // each delay is scaled by a uniform factor in [1 - jitter, 1 + jitter]
};

absl::Status ValidateRetryPolicy(const RetryPolicy& policy);

// The wait before retry number `retry` (1 = the first retry):
// min(initial * multiplier^(retry-1), max) * (1 + jitter * (2u - 1)), with u in [0, 1) drawn by
// the caller. Spreads the retries of many clients so that a restarted server is not hit by all
// of them at the same instant.
absl::Duration BackoffDelay(const RetryPolicy& policy, int retry, double u);

// Splits faces (their serialized sizes, in order) into consecutive requests [begin, end) of at
// most `max_faces` faces whose EmbedRequest stays within `max_message_bytes` (0: no size limit).
// A face that alone exceeds the limit is INVALID_ARGUMENT naming its index.
absl::StatusOr<std::vector<std::pair<size_t, size_t>>> SplitIntoRequests(
    const std::vector<size_t>& face_bytes, int max_faces, uint64_t max_message_bytes);

// Bytes an EmbedRequest spends beyond its faces' own sizes (field tags, lengths, normalize,
// request_id), as an upper bound used by SplitIntoRequests.
constexpr size_t kRequestOverheadBytes = 256;
constexpr size_t kPerFaceOverheadBytes = 11;  // tag + length varint of one repeated Face

// "host:port[,host:port...]" → the addresses, trimmed; INVALID_ARGUMENT naming a bad one.
// Each follows common::ParseHostPort's rule (common/address.h) with ports 1..65535: names, IPv4
// literals, or bracketed IPv6 literals ("[::1]:50051").
absl::StatusOr<std::vector<std::string>> ParseAddressList(const std::string& list);

// The gRPC target for resolved addresses (IP literals with ports): "ipv4:a:p,b:q" or
// "ipv6:[a]:p,[b]:q". All must be of one family: INVALID_ARGUMENT otherwise.
absl::StatusOr<std::string> StaticTarget(const std::vector<std::string>& ip_addresses);

}  // namespace arcface::client

#endif  // ARCFACE_CLIENT_CPP_POLICIES_H_
