#include "server/service/http_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace arcface::service {

absl::Status ParseHostPort(const std::string& address, std::string* host, int* port) {
  std::string h;
  std::string p;
  if (!address.empty() && address[0] == '[') {
    size_t close = address.find(']');
    if (close == std::string::npos || close + 1 >= address.size() || address[close + 1] != ':') {
      return absl::InvalidArgumentError(
          absl::StrCat("address '", address, "' is not [host]:port"));
    }
    h = address.substr(1, close - 1);
    p = address.substr(close + 2);
  } else {
    size_t colon = address.rfind(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("address '", address, "' is not host:port"));
    }
    h = address.substr(0, colon);
    p = address.substr(colon + 1);
  }
  int value = -1;
  if (h.empty() || !absl::SimpleAtoi(p, &value) || value < 0 || value > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("address '", address, "' is not host:port with a port in 0..65535"));
  }
  *host = h;
  *port = value;
  return absl::OkStatus();
}

HttpServer::HttpServer(std::function<std::string()> render_metrics)
    : render_metrics_(std::move(render_metrics)), server_(std::make_unique<httplib::Server>()) {}

HttpServer::~HttpServer() { Stop(); }

absl::Status HttpServer::Start(const std::string& address) {
  std::string host;
  int port = 0;
  absl::Status parsed = ParseHostPort(address, &host, &port);
  if (!parsed.ok()) return parsed;

  server_->Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  server_->Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
    if (draining_.load()) {
      res.status = 503;
      res.set_content("draining\n", "text/plain");
    } else if (!ready_.load()) {
      res.status = 503;
      res.set_content("loading\n", "text/plain");
    } else {
      res.set_content("ready\n", "text/plain");
    }
  });
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(render_metrics_(), "text/plain; version=0.0.4; charset=utf-8");
  });

  // httplib sets SO_REUSEPORT by default, which would let a second server share a busy port
  // (and steal half its connections) instead of failing to bind.
  server_->set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  if (port == 0) {
    port_ = server_->bind_to_any_port(host);
  } else {
    port_ = server_->bind_to_port(host, port) ? port : -1;
  }
  if (port_ <= 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for HTTP on ", address, " (address in use or not local?)"));
  }
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return absl::OkStatus();
}

void HttpServer::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace arcface::service
