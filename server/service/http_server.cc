#include "server/service/http_server.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/address.h"

namespace arcface::service {

namespace {

using Clock = std::chrono::steady_clock;

// httplib parses and answers a request head that the event loop has already received: this
// Stream reads from that buffer and collects the answer, so httplib never touches the socket
// (and never blocks on it).
class BufferedStream : public httplib::Stream {
 public:
  BufferedStream(std::string_view in, std::string* out, const std::string& remote_ip,
                 int remote_port)
      : in_(in), out_(out), remote_ip_(remote_ip), remote_port_(remote_port) {}

  bool is_readable() const override { return pos_ < in_.size(); }
  bool is_writable() const override { return true; }
  ssize_t read(char* ptr, size_t size) override {
    const size_t n = std::min(size, in_.size() - pos_);
    std::memcpy(ptr, in_.data() + pos_, n);
    pos_ += n;
    return static_cast<ssize_t>(n);
  }
  ssize_t write(const char* ptr, size_t size) override {
    out_->append(ptr, size);
    return static_cast<ssize_t>(size);
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    ip = remote_ip_;
    port = remote_port_;
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    ip.clear();
    port = 0;
  }
  // Deliberately no socket: see the class comment.
  socket_t socket() const override { return INVALID_SOCKET; }

 private:
  std::string_view in_;
  size_t pos_ = 0;
  std::string* out_;
  const std::string& remote_ip_;
  int remote_port_;
};

std::string PlainAnswer(int code, const char* reason) {
  const std::string body = absl::StrCat(reason, "\n");
  return absl::StrCat("HTTP/1.1 ", code, " ", reason,
                      "\r\nContent-Type: text/plain\r\nContent-Length: ", body.size(),
                      "\r\nConnection: close\r\n\r\n", body);
}

void CloseFd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

}  // namespace

struct HttpServer::Connection {
  enum class State {
    kReading,   // waiting for the rest of the request head
    kWriting,   // sending the answer
    kDraining,  // answer sent and our side shut down; discarding input until the client closes,
                // so unread input cannot turn the close into a reset that loses the answer
  };
  int fd = -1;
  std::string remote_ip;
  int remote_port = 0;
  State state = State::kReading;
  Clock::time_point deadline;
  std::string in;
  std::string out;
  size_t sent = 0;
};

// Only to reach process_request(), which parses and routes a request read from any Stream.
class HttpServer::Router : public httplib::Server {
 public:
  using httplib::Server::process_request;
};

HttpServer::HttpServer(std::function<std::string()> render_metrics,
                       HttpServerOptions options)
    : render_metrics_(std::move(render_metrics)),
      options_(options),
      router_(std::make_unique<Router>()) {
  router_->Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  router_->Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
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
  router_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(render_metrics_(), "text/plain; version=0.0.4; charset=utf-8");
  });
}

HttpServer::~HttpServer() { Stop(); }

absl::Status HttpServer::Start(const std::string& address) {
  absl::StatusOr<common::HostPort> parsed =
      common::ParseHostPort(address, common::PortZero::kAllowed);
  if (!parsed.ok()) return parsed.status();
  const std::string& host = parsed->host;
  const int port = parsed->port;

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const int gai = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (gai != 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", address, ": ",
                                               ::gai_strerror(gai)));
  }
  int error = 0;
  for (addrinfo* a = found; a != nullptr && listen_fd_ < 0; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      error = errno;
      continue;
    }
    // SO_REUSEADDR only: SO_REUSEPORT would let a second server share a busy port (and steal
    // half its connections) instead of failing to bind.
    const int yes = 1;
    const int no = 0;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    if (a->ai_family == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof(no));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, SOMAXCONN) == 0) {
      listen_fd_ = fd;
    } else {
      error = errno;
      ::close(fd);
    }
  }
  ::freeaddrinfo(found);
  if (listen_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", address, ": ",
                                               std::strerror(error),
                                               " (address in use or not local?)"));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) {
    CloseFd(listen_fd_);
    return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
  }
  thread_ = std::thread([this] { Loop(); });
  return absl::OkStatus();
}

void HttpServer::Stop() {
  stopping_.store(true);
  if (thread_.joinable()) {
    const uint64_t one = 1;
    // A full eventfd counter still wakes the loop, so the result does not matter.
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof(one));
    thread_.join();
  }
  CloseFd(listen_fd_);
  CloseFd(wake_fd_);
}

void HttpServer::Loop() {
  std::vector<std::unique_ptr<Connection>> connections;  // oldest first
  std::vector<pollfd> polled;
  while (!stopping_.load()) {
    const Clock::time_point now = Clock::now();
    Clock::time_point next = Clock::time_point::max();
    for (std::unique_ptr<Connection>& c : connections) {
      if (now >= c->deadline) {
        if (c->state == Connection::State::kReading) {
          // Best effort: a client this slow is not waited for.
          const std::string answer = PlainAnswer(408, "Request Timeout");
          ::send(c->fd, answer.data(), answer.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        CloseFd(c->fd);
      } else {
        next = std::min(next, c->deadline);
      }
    }
    connections.erase(std::remove_if(connections.begin(), connections.end(),
                                     [](const auto& c) { return c->fd < 0; }),
                      connections.end());

    polled.clear();
    polled.push_back({wake_fd_, POLLIN, 0});
    polled.push_back({listen_fd_, POLLIN, 0});
    for (const std::unique_ptr<Connection>& c : connections) {
      polled.push_back(
          {c->fd, static_cast<short>(c->state == Connection::State::kWriting ? POLLOUT : POLLIN),
           0});
    }
    int timeout_ms = -1;
    if (next != Clock::time_point::max()) {
      timeout_ms = static_cast<int>(
          std::chrono::ceil<std::chrono::milliseconds>(next - now).count());
    }
    if (::poll(polled.data(), polled.size(), timeout_ms) < 0) {
      // EINTR, or ENOMEM, which may pass: retry rather than stop serving the probes.
      if (errno != EINTR) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (polled[0].revents != 0) break;  // Stop()

    for (size_t i = 0; i < connections.size(); ++i) {
      Connection& c = *connections[i];
      const short revents = polled[i + 2].revents;
      if (revents == 0) continue;
      bool keep = false;
      if (revents & POLLNVAL) {
        keep = false;
      } else if (c.state == Connection::State::kWriting) {
        keep = (revents & POLLOUT) != 0 && Write(c);
      } else {
        keep = Read(c);
      }
      if (!keep) CloseFd(c.fd);
    }
    connections.erase(std::remove_if(connections.begin(), connections.end(),
                                     [](const auto& c) { return c->fd < 0; }),
                      connections.end());
    if (polled[1].revents != 0) Accept(connections);
  }
  for (std::unique_ptr<Connection>& c : connections) CloseFd(c->fd);
}

void HttpServer::Accept(std::vector<std::unique_ptr<Connection>>& connections) {
  for (;;) {
    sockaddr_storage peer{};
    socklen_t peer_len = sizeof(peer);
    const int fd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &peer_len,
                             SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if ((errno == EMFILE || errno == ENFILE) && !connections.empty()) {
        CloseFd(connections.front()->fd);
        connections.erase(connections.begin());
        continue;
      }
      return;  // EAGAIN: all accepted; else a connection that failed before we took it
    }
    if (static_cast<int>(connections.size()) >= options_.max_connections) {
      CloseFd(connections.front()->fd);
      connections.erase(connections.begin());
    }
    auto c = std::make_unique<Connection>();
    c->fd = fd;
    c->deadline = Clock::now() + absl::ToChronoNanoseconds(options_.request_timeout);
    char ip[INET6_ADDRSTRLEN] = "";
    if (peer.ss_family == AF_INET6) {
      const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&peer);
      ::inet_ntop(AF_INET6, &v6->sin6_addr, ip, sizeof(ip));
      c->remote_port = ntohs(v6->sin6_port);
    } else if (peer.ss_family == AF_INET) {
      const auto* v4 = reinterpret_cast<const sockaddr_in*>(&peer);
      ::inet_ntop(AF_INET, &v4->sin_addr, ip, sizeof(ip));
      c->remote_port = ntohs(v4->sin_port);
    }
    c->remote_ip = ip;
    connections.push_back(std::move(c));
  }
}

bool HttpServer::Read(Connection& c) {
  bool peer_closed = false;
  char buffer[4096];
  for (;;) {
    const ssize_t n = ::recv(c.fd, buffer, sizeof(buffer), 0);
    if (n > 0) {
      // Input after the head is discarded unread: nothing here takes a body.
      if (c.state == Connection::State::kReading && c.in.size() <= options_.max_head_bytes) {
        c.in.append(buffer, static_cast<size_t>(n));
      }
      continue;
    }
    if (n == 0) {
      peer_closed = true;
    } else if (errno == EINTR) {
      continue;
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return false;
    }
    break;
  }
  if (c.state == Connection::State::kDraining) return !peer_closed;

  const size_t end = c.in.find("\r\n\r\n");
  if (end != std::string::npos && end + 4 <= options_.max_head_bytes) {
    c.in.resize(end + 4);
    Answer(c, std::move(c.in));
    return Write(c);
  }
  if (c.in.size() > options_.max_head_bytes) {
    c.out = PlainAnswer(431, "Request Header Fields Too Large");
    c.state = Connection::State::kWriting;
    c.deadline = Clock::now() + absl::ToChronoNanoseconds(options_.write_timeout);
    return Write(c);
  }
  return !peer_closed;
}

void HttpServer::Answer(Connection& c, std::string head) {
  BufferedStream stream(head, &c.out, c.remote_ip, c.remote_port);
  bool connection_closed = false;
  router_->process_request(stream, /*close_connection=*/true, connection_closed, nullptr);
  c.state = Connection::State::kWriting;
  c.deadline = Clock::now() + absl::ToChronoNanoseconds(options_.write_timeout);
}

bool HttpServer::Write(Connection& c) {
  while (c.sent < c.out.size()) {
    const ssize_t n = ::send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
    if (n > 0) {
      c.sent += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    }
  }
  ::shutdown(c.fd, SHUT_WR);
  c.state = Connection::State::kDraining;
  c.out = std::string();
  return true;
}

}  // namespace arcface::service
