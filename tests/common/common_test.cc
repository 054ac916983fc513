#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/address.h"
#include "common/files.h"

namespace arcface::common {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// ParseHostPort

void ExpectParsed(const std::string& address, PortZero zero, const std::string& host, int port) {
  absl::StatusOr<HostPort> parsed = ParseHostPort(address, zero);
  ASSERT_TRUE(parsed.ok()) << address << ": " << parsed.status();
  EXPECT_EQ(parsed->host, host) << address;
  EXPECT_EQ(parsed->port, port) << address;
}

void ExpectRefused(const std::string& address, PortZero zero, const std::string& why) {
  absl::StatusOr<HostPort> parsed = ParseHostPort(address, zero);
  ASSERT_FALSE(parsed.ok()) << address << " was accepted";
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << address;
  // The message quotes the address and says what is wrong with it.
  EXPECT_THAT(parsed.status().message(), HasSubstr("'" + address + "'"));
  EXPECT_THAT(parsed.status().message(), HasSubstr(why)) << address;
}

TEST(ParseHostPort, NamesIpv4AndBracketedIpv6) {
  for (PortZero zero : {PortZero::kRefused, PortZero::kAllowed}) {
    ExpectParsed("localhost:80", zero, "localhost", 80);
    ExpectParsed("arcface.example.com:50051", zero, "arcface.example.com", 50051);
    ExpectParsed("127.0.0.1:1", zero, "127.0.0.1", 1);
    ExpectParsed("0.0.0.0:65535", zero, "0.0.0.0", 65535);
    ExpectParsed("[::1]:50051", zero, "::1", 50051);
    ExpectParsed("[::]:8080", zero, "::", 8080);
    ExpectParsed("[fe80::1%eth0]:9", zero, "fe80::1%eth0", 9);
    ExpectParsed("[::ffff:127.0.0.1]:443", zero, "::ffff:127.0.0.1", 443);
  }
}

TEST(ParseHostPort, PortZeroOnlyWhereAllowed) {
  ExpectParsed("127.0.0.1:0", PortZero::kAllowed, "127.0.0.1", 0);
  ExpectParsed("[::1]:0", PortZero::kAllowed, "::1", 0);
  ExpectRefused("127.0.0.1:0", PortZero::kRefused, "no port in 1..65535");
  ExpectRefused("[::1]:0", PortZero::kRefused, "no port in 1..65535");
}

TEST(ParseHostPort, BadAddressesSayWhy) {
  for (PortZero zero : {PortZero::kRefused, PortZero::kAllowed}) {
    const std::string ports = zero == PortZero::kAllowed ? "0..65535" : "1..65535";
    ExpectRefused("::1:80", zero, "IPv6 host without brackets");
    ExpectRefused("fe80::1:50051", zero, "IPv6 host without brackets");
    ExpectRefused("localhost", zero, "no port");
    ExpectRefused("localhost:", zero, "no port in " + ports);
    ExpectRefused("[::1]", zero, "no port");
    ExpectRefused("[::1]:", zero, "no port in " + ports);
    ExpectRefused("localhost:65536", zero, "no port in " + ports);
    ExpectRefused("localhost:99999", zero, "no port in " + ports);
    ExpectRefused("localhost:123456", zero, "no port in " + ports);
    ExpectRefused("localhost:-1", zero, "no port in " + ports);
    ExpectRefused("localhost:+80", zero, "no port in " + ports);
    ExpectRefused("localhost: 80", zero, "no port in " + ports);
    ExpectRefused("localhost:http", zero, "no port in " + ports);
    ExpectRefused(":80", zero, "no host");
    ExpectRefused("[]:80", zero, "no host");
    ExpectRefused("[::1:80", zero, "unbalanced [ ]");
    ExpectRefused("::1]:80", zero, "IPv6 host without brackets");
    ExpectRefused("[localhost]:80", zero, "not an IPv6 literal");
    ExpectRefused("[::1%]:80", zero, "not an IPv6 literal");
    ExpectRefused("[1.2.3.4]:80", zero, "not an IPv6 literal");
    ExpectRefused("[::1]x:80", zero, "text between the ] of its host and the port");
    ExpectRefused("local]host:80", zero, "unbalanced [ ]");
    ExpectRefused("local host:80", zero, "a space or '/'");
    ExpectRefused("http://localhost:80", zero, "a space or '/'");
    ExpectRefused("localhost/x:80", zero, "a space or '/'");
    ExpectRefused("", zero, "no port");
  }
}

// ---------------------------------------------------------------------------------------------
// ReadFile

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("arcface_common_test_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

TEST(ReadFile, ReadsEveryByte) {
  const std::string path = TempPath("bytes");
  std::string bytes;
  for (uint32_t i = 0; i < 300'000; ++i) bytes.push_back(static_cast<char>(i * 7919u % 256));
  std::ofstream(path, std::ios::binary) << bytes;
  absl::StatusOr<std::string> read = ReadFile(path);
  std::filesystem::remove(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, bytes);
}

TEST(ReadFile, EmptyFileIsEmpty) {
  const std::string path = TempPath("empty");
  std::ofstream(path, std::ios::binary).close();
  absl::StatusOr<std::string> read = ReadFile(path);
  std::filesystem::remove(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(read->empty());
}

TEST(ReadFile, APipeIsReadToItsEnd) {
  // A file of unknown size (process substitution, /dev/stdin): read until its end.
  const std::string path = TempPath("fifo");
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  const std::string bytes(200'000, 'x');
  std::thread writer([&] { std::ofstream(path, std::ios::binary) << bytes; });
  absl::StatusOr<std::string> read = ReadFile(path);
  writer.join();
  std::filesystem::remove(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, bytes);
}

TEST(ReadFile, ErrorsNameThePathAndTheReason) {
  const std::string missing = TempPath("missing");
  absl::StatusOr<std::string> read = ReadFile(missing);
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(read.status().message(), missing + ": no such file");

  read = ReadFile(missing + "/below");
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);

  const std::string dir = TempPath("dir");
  std::filesystem::create_directories(dir);
  read = ReadFile(dir);
  std::filesystem::remove(dir);
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(read.status().message(), dir + ": not a regular file (a directory)");

  if (::geteuid() != 0) {  // root reads whatever the mode says
    const std::string locked = TempPath("locked");
    std::ofstream(locked) << "secret";
    std::filesystem::permissions(locked, std::filesystem::perms::none);
    read = ReadFile(locked);
    std::filesystem::remove(locked);
    EXPECT_EQ(read.status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_THAT(read.status().message(), HasSubstr(locked + ": cannot open"));
  }
}

}  // namespace
}  // namespace arcface::common
