// HttpServer: the plain-HTTP side of the service, for orchestrators and Prometheus.
//   GET /healthz  200 "ok" while the process runs (liveness).
//   GET /readyz   200 "ready" once the model is loaded and warm and no drain has begun, else
//                 503 with the reason (readiness).
//   GET /metrics  the Prometheus text exposition (version 0.0.4) from the render callback.
//
// Contract
// - Start() binds host:port (an IPv6 host may be bracketed, "[::]:8080"; port 0 picks a free
//   one, see port()) and serves on its own threads; a bind failure is UNAVAILABLE naming the
//   address, and an unparsable address INVALID_ARGUMENT.
// - SetReady()/SetDraining() may be called from any thread; the handlers read them atomically.
// - Stop() stops accepting and joins the threads; idempotent; the destructor calls it.
// - The render callback runs on the server's threads; it must be thread-safe.
#ifndef ARCFACE_SERVER_SERVICE_HTTP_SERVER_H_
#define ARCFACE_SERVER_SERVICE_HTTP_SERVER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace httplib {
class Server;
}

namespace arcface::service {

// Splits "host:port" / "[v6]:port"; the port must be 0..65535.
absl::Status ParseHostPort(const std::string& address, std::string* host, int* port);

class HttpServer {
 public:
  explicit HttpServer(std::function<std::string()> render_metrics);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  absl::Status Start(const std::string& address);
  void Stop();

  int port() const { return port_; }
  void SetReady(bool ready) { ready_.store(ready); }
  void SetDraining(bool draining) { draining_.store(draining); }

 private:
  std::function<std::string()> render_metrics_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<bool> ready_{false};
  std::atomic<bool> draining_{false};
  int port_ = 0;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_HTTP_SERVER_H_
