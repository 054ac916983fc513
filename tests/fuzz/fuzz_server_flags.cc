// Fuzz target: the HTTP side's and the command line's own parsing. The input is split at NUL
// bytes into an argv for ParseServerFlags (CLI11 is header-only, so it is instrumented too), and
// the whole input is also given to common::ParseHostPort, the address rule of the server's
// listening addresses and the clients' server addresses.
//
// Why not raw HTTP requests: the request parsing of the HTTP port is cpp-httplib's, linked from
// Debian's compiled library (not instrumented: libFuzzer would get no coverage to steer by, and
// cpp-httplib is fuzzed upstream in OSS-Fuzz), and our three handlers read nothing of the
// request. What is ours and takes input is the address and the flags, fuzzed here in-process.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/address.h"
#include "server/service/server_config.h"

namespace {

void Fail(const std::string& what, const std::string& input) {
  std::fprintf(stderr, "fuzz_server_flags: %s (input '%s')\n", what.c_str(), input.c_str());
  std::abort();
}

void CheckAddress(const std::string& address) {
  using arcface::common::PortZero;
  for (PortZero zero : {PortZero::kAllowed, PortZero::kRefused}) {
    const absl::StatusOr<arcface::common::HostPort> parsed =
        arcface::common::ParseHostPort(address, zero);
    if (parsed.ok()) {
      const int min_port = zero == PortZero::kAllowed ? 0 : 1;
      if (parsed->host.empty() || parsed->port < min_port || parsed->port > 65535) {
        Fail("accepted a bad address", address);
      }
    } else if (parsed.status().code() != absl::StatusCode::kInvalidArgument) {
      Fail("an error was not INVALID_ARGUMENT", address);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  CheckAddress(input);

  std::vector<std::string> args = {"arcface-server"};
  size_t start = 0;
  while (start <= input.size()) {
    size_t end = input.find('\0', start);
    if (end == std::string::npos) end = input.size();
    args.push_back(input.substr(start, end - start));
    start = end + 1;
  }
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  std::ostringstream out, err;
  const arcface::service::ParsedFlags parsed = arcface::service::ParseServerFlags(
      static_cast<int>(argv.size()), argv.data(), out, err);
  // server_config.h: 0 (help, version), 2 (a bad flag, with a message) or -1 (run).
  if (parsed.exit_code == 2) {
    if (err.str().empty()) Fail("refused without a message", input);
  } else if (parsed.exit_code == -1) {
    CheckAddress(parsed.config.listen);
    CheckAddress(parsed.config.http_listen);
  } else if (parsed.exit_code != 0) {
    Fail("unexpected exit code " + std::to_string(parsed.exit_code), input);
  }
  return 0;
}
