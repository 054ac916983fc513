// PgCluster: a throwaway PostgreSQL cluster for C++ tests, run by tests/gallery/pg_cluster.py
// (`serve`: initdb in a temporary folder, postgres as an unprivileged user on a free loopback
// port, trust authentication). The script is the one mechanism for both languages; this class
// speaks its line protocol over a pipe.
//
// Lifetime: the script dies with this process (PR_SET_PDEATHSIG) and, seeing its stdin close,
// stops the server and removes the folder; the destructor does the same and waits for it.
// Errors: Start() returns the script's reason (e.g. the PostgreSQL binaries are missing and
// deploy/install-deps.sh installs them). Not thread-safe; one test thread drives it.
#ifndef ARCFACE_TESTS_GALLERY_PG_CLUSTER_H_
#define ARCFACE_TESTS_GALLERY_PG_CLUSTER_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace arcface::test_util {

class PgCluster {
 public:
  PgCluster() = default;
  PgCluster(const PgCluster&) = delete;
  PgCluster& operator=(const PgCluster&) = delete;
  ~PgCluster() {
    if (to_ != nullptr) fclose(to_);  // end of stdin: the script cleans up and exits
    if (from_ != nullptr) fclose(from_);
    if (pid_ > 0) {
      int status = 0;
      while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
    }
  }

  // Starts `python pg_cluster.py serve` and waits for the cluster's URI.
  absl::Status Start(const std::string& python, const std::string& script) {
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) {
      return absl::InternalError("pipe2 failed");
    }
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ < 0) return absl::InternalError("fork failed");
    if (pid_ == 0) {
      // Only async-signal-safe calls until exec.
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(1);
      dup2(in[0], 0);
      dup2(out[1], 1);
      execl(python.c_str(), python.c_str(), script.c_str(), "serve", static_cast<char*>(nullptr));
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    to_ = fdopen(in[1], "w");
    from_ = fdopen(out[0], "r");
    const std::string first = ReadLine();
    if (!absl::StartsWith(first, "uri ")) {
      return absl::FailedPreconditionError(
          absl::StrCat("no PostgreSQL cluster for the test (", script, "): ", first));
    }
    uri_ = first.substr(4);
    return absl::OkStatus();
  }

  // postgresql://postgres@127.0.0.1:PORT/postgres
  const std::string& uri() const { return uri_; }
  // The URI of database `dbname` on this cluster.
  std::string UriOf(const std::string& dbname) const {
    return uri_.substr(0, uri_.rfind('/') + 1) + dbname;
  }

  absl::Status Stop() { return Command("stop"); }     // fast shutdown, data kept
  absl::Status Resume() { return Command("start"); }  // on the same port
  absl::Status Kill() { return Command("kill"); }     // SIGKILL to the postmaster

 private:
  std::string ReadLine() {
    std::string line;
    for (int c; (c = fgetc(from_)) != EOF && c != '\n';) line += static_cast<char>(c);
    return line.empty() ? "(the script exited without a word)" : line;
  }

  absl::Status Command(const char* command) {
    fprintf(to_, "%s\n", command);
    fflush(to_);
    const std::string answer = ReadLine();
    if (answer == "ok") return absl::OkStatus();
    return absl::InternalError(absl::StrCat("pg_cluster.py ", command, ": ", answer));
  }

  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
  std::string uri_;
};

}  // namespace arcface::test_util

#endif  // ARCFACE_TESTS_GALLERY_PG_CLUSTER_H_
