// ParseHostPort: the one rule for "host:port" in this project, for the server's listening
// addresses (--listen, --http-listen) and the clients' server addresses alike.
//
// Why here: the server and the clients never depend on each other, and proto/ holds only the
// generated API; common/ is the small library both may use (see files.h).
//
// The rule
// - "HOST:PORT" where HOST is a name ("localhost"), an IPv4 literal ("10.0.0.2"), or an IPv6
//   literal in brackets ("[::1]", "[::]"); an IPv6 literal without brackets ("::1:80") is
//   refused, since its last group cannot be told apart from a port.
// - HOST is not empty and holds no whitespace, brackets (outside the IPv6 form) or '/'.
// - PORT is decimal digits only, 1..65535; 0 too where `port_zero` allows it (a listening
//   socket: any free port).
// - Errors: INVALID_ARGUMENT whose message quotes the address and says what is wrong.
// Pure and thread-safe.
#ifndef ARCFACE_COMMON_ADDRESS_H_
#define ARCFACE_COMMON_ADDRESS_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace arcface::common {

struct HostPort {
  std::string host;  // without the brackets of an IPv6 literal: "::1"
  int port = 0;
};

enum class PortZero {
  kRefused,  // an address to connect to
  kAllowed,  // an address to listen on, where 0 asks for any free port
};

absl::StatusOr<HostPort> ParseHostPort(absl::string_view address, PortZero port_zero);

}  // namespace arcface::common

#endif  // ARCFACE_COMMON_ADDRESS_H_
