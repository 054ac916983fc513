// Server in-process: a failed phase returns its exit status after stopping what it started (so
// the ports are free again), and a Server whose stop came early still goes through SERVING and
// drains to 0. Each phase's behaviour in a real process (signals, logs, health, the watchdog)
// is the integration suites' (tests/integration: test_startup_failures, test_flags, test_drain,
// test_faults).
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "server/app/server.h"
#include "server/service/server_config.h"

namespace arcface::app {
namespace {

// A socket listening on 127.0.0.1:`port` (0: a free one); port() is 0 when it could not bind.
class Listener {
 public:
  explicit Listener(int port = 0) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    socklen_t len = sizeof(addr);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), len) == 0 && ::listen(fd_, 1) == 0 &&
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
      port_ = ntohs(addr.sin_port);
    }
  }
  ~Listener() { ::close(fd_); }
  int port() const { return port_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }

 private:
  const int fd_;
  int port_ = 0;
};

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          absl::StrCat("arcface_server_test_", ::getpid(), "_", name))
      .string();
}

service::ServerConfig LoopbackConfig() {
  service::ServerConfig config;
  config.demo_weights = true;
  config.listen = "127.0.0.1:0";
  config.http_listen = "127.0.0.1:0";
  config.device = "cpu";
  config.warmup_batch_size = 0;
  config.preprocess_threads = 2;
  config.drain_timeout = absl::Seconds(2);
  return config;
}

TEST(Server, ABusyPortIsStatusOne) {
  Listener busy;
  ASSERT_GT(busy.port(), 0);
  service::ServerConfig config = LoopbackConfig();
  config.listen = busy.address();
  absl::Notification stop;
  EXPECT_EQ(Server(config).Run(stop), 1);

  config = LoopbackConfig();
  config.http_listen = busy.address();
  EXPECT_EQ(Server(config).Run(stop), 1);
}

TEST(Server, ABadWeightsFileIsStatusTwoAndItsPortsAreFreedAgain) {
  const std::string weights = TempPath("garbage.safetensors");
  std::ofstream(weights) << std::string(64, '\xff');
  const std::string port_file = TempPath("ports");
  service::ServerConfig config = LoopbackConfig();
  config.demo_weights = false;
  config.weights = weights;
  config.port_file = port_file;
  int grpc_port = 0, http_port = 0;
  {
    // Two free ports, given to the server by number.
    Listener grpc, http;
    grpc_port = grpc.port();
    http_port = http.port();
    config.listen = grpc.address();
    config.http_listen = http.address();
  }
  absl::Notification stop;
  // The weights fail after both ports listen: the teardown closes them.
  EXPECT_EQ(Server(config).Run(stop), 2);
  EXPECT_FALSE(std::filesystem::exists(port_file));  // written only once SERVING
  std::filesystem::remove(weights);
  EXPECT_EQ(Listener(grpc_port).port(), grpc_port);
  EXPECT_EQ(Listener(http_port).port(), http_port);
}

TEST(Server, AnEarlyStopStillServesThenDrainsToZero) {
  const std::string port_file = TempPath("ports");
  service::ServerConfig config = LoopbackConfig();
  config.port_file = port_file;
  absl::Notification stop;
  stop.Notify();
  EXPECT_EQ(Server(config).Run(stop), 0);
  int grpc_port = 0, http_port = 0;
  std::ifstream(port_file) >> grpc_port >> http_port;
  std::filesystem::remove(port_file);
  EXPECT_GT(grpc_port, 0);
  EXPECT_GT(http_port, 0);
}

}  // namespace
}  // namespace arcface::app
