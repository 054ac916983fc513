// HttpServer: the plain-HTTP side of the service, for orchestrators and Prometheus.
//   GET /healthz  200 "ok" while the process runs (liveness).
//   GET /readyz   200 "ready" once the model is loaded and warm and no drain has begun, else
//                 503 with the reason (readiness).
//   GET /metrics  the Prometheus text exposition (version 0.0.4) from the render callback.
//
// Contract
// - Start() binds host:port (common::ParseHostPort's rule: an IPv6 host in brackets, "[::]:8080";
//   port 0 picks a free one, see port()) and serves on one thread of its own; a bind failure is UNAVAILABLE naming
//   the address, and an unparsable address INVALID_ARGUMENT.
// - Slow or abusive clients cannot starve the endpoints: one event loop does all socket I/O
//   without blocking, and a request is answered as soon as its head has arrived, whatever
//   other connections do. Per connection (HttpServerOptions):
//     * the whole request head (request line and headers) must arrive within
//       request_timeout (5 s) of the accept, however steadily its bytes trickle in: else the
//       answer is 408 and the connection is closed;
//     * a head over max_head_bytes (8 KiB) is answered 431 and the connection closed;
//     * the answer must be taken within write_timeout (5 s), else the connection is closed;
//     * one request per connection: answers say "Connection: close" (a probe or a scrape
//       costs one connect; keep-alive would only let idle sockets hold slots);
//     * at most max_connections (256) are open; a new one closes the oldest to get in, so
//       what is closed is the longest-waiting socket, not a probe done in milliseconds.
//   Request bodies are never read: every endpoint is a GET. The socket handling is ours;
//   parsing, routing and the answer's format are cpp-httplib's (Server::process_request run
//   over the received head, never over the socket).
// - SetReady()/SetDraining() may be called from any thread; the handlers read them atomically.
// - Stop() stops accepting, closes every connection and joins the thread; idempotent; the
//   destructor calls it.
// - The render callback runs on the server's thread, between socket events; it must be
//   thread-safe and quick (it delays every other connection while it runs).
#ifndef ARCFACE_SERVER_SERVICE_HTTP_SERVER_H_
#define ARCFACE_SERVER_SERVICE_HTTP_SERVER_H_

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace arcface::service {

// Per-connection bounds; see the contract above.
struct HttpServerOptions {
  // From the accept to the end of the request head, else 408 and close. > 0; default 5 s.
  absl::Duration request_timeout = absl::Seconds(5);
  // For the client to take the whole answer, else close. > 0; default 5 s.
  absl::Duration write_timeout = absl::Seconds(5);
  // The longest request head (request line and headers), else 431. >= 1; default 8 KiB.
  size_t max_head_bytes = 8 << 10;
  // Connections open at once; one more closes the oldest. >= 1; default 256.
  int max_connections = 256;
};

class HttpServer {
 public:
  explicit HttpServer(std::function<std::string()> render_metrics,
                      HttpServerOptions options = HttpServerOptions());
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  absl::Status Start(const std::string& address);
  void Stop();

  int port() const { return port_; }
  void SetReady(bool ready) { ready_.store(ready); }
  void SetDraining(bool draining) { draining_.store(draining); }

 private:
  class Router;
  struct Connection;

  // The event loop; every Connection lives in it and is touched by its thread alone.
  void Loop();
  void Accept(std::vector<std::unique_ptr<Connection>>& connections);
  // Reads what has arrived and answers once the head is complete; false when the connection
  // is to be closed.
  bool Read(Connection& c);
  // Sends what the socket takes; false when the connection is to be closed.
  bool Write(Connection& c);
  void Answer(Connection& c, std::string head);

  const std::function<std::string()> render_metrics_;
  const HttpServerOptions options_;
  std::unique_ptr<Router> router_;
  // Both owned by Start()/Stop(); the loop thread only reads them while it runs.
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // an eventfd that Stop() signals
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> ready_{false};
  std::atomic<bool> draining_{false};
  int port_ = 0;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_HTTP_SERVER_H_
