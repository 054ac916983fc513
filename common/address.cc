#include "common/address.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace arcface::common {
namespace {

// Hex groups, ':' and '.' (an embedded IPv4 address), at least one ':'; then, optionally, a
// zone index naming the interface of a link-local address ("fe80::1%eth0").
bool IsIpv6Literal(absl::string_view host) {
  absl::string_view zone;
  if (const size_t percent = host.find('%'); percent != absl::string_view::npos) {
    zone = host.substr(percent + 1);
    host = host.substr(0, percent);
    if (zone.empty()) return false;
  }
  if (host.find(':') == absl::string_view::npos) return false;
  for (char c : host) {
    if (!absl::ascii_isxdigit(c) && c != ':' && c != '.') return false;
  }
  for (char c : zone) {
    if (!absl::ascii_isalnum(c) && c != '_' && c != '-' && c != '.') return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<HostPort> ParseHostPort(absl::string_view address, PortZero port_zero) {
  auto bad = [address](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' ", why));
  };
  constexpr absl::string_view kNoPort = "is not HOST:PORT (e.g. localhost:50051): no port";
  absl::string_view host;
  absl::string_view port_text;
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    if (close == absl::string_view::npos) return bad("has unbalanced [ ] in its host");
    host = address.substr(1, close - 1);
    const absl::string_view rest = address.substr(close + 1);
    if (rest.empty()) return bad(kNoPort);
    if (rest.front() != ':') return bad("has text between the ] of its host and the port");
    port_text = rest.substr(1);
    if (host.empty()) return bad("has no host (e.g. [::1]:50051)");
    if (!IsIpv6Literal(host)) return bad("has brackets around a host that is not an IPv6 literal");
  } else {
    const size_t colon = address.rfind(':');
    if (colon == absl::string_view::npos) return bad(kNoPort);
    host = address.substr(0, colon);
    port_text = address.substr(colon + 1);
    for (char c : host) {
      if (absl::ascii_isspace(c) || c == '/') return bad("has a host with a space or '/'");
    }
    if (host.find(':') != absl::string_view::npos) {
      return bad("has an IPv6 host without brackets; write it as [::1]:50051");
    }
    if (host.find_first_of("[]") != absl::string_view::npos) {
      return bad("has unbalanced [ ] in its host");
    }
    if (host.empty()) return bad("has no host (e.g. localhost:50051, 0.0.0.0:50051)");
  }

  const int min_port = port_zero == PortZero::kAllowed ? 0 : 1;
  int port = 0;
  bool digits = !port_text.empty() && port_text.size() <= 5;
  for (char c : port_text) digits = digits && absl::ascii_isdigit(c);
  if (digits) {
    for (char c : port_text) port = port * 10 + (c - '0');
  }
  if (!digits || port < min_port || port > 65535) {
    return bad(absl::StrCat("has no port in ", min_port, "..65535"));
  }
  return HostPort{std::string(host), port};
}

}  // namespace arcface::common
