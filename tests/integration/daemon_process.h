// Starts a real binary as a child process and reads what it prints, for integration tests.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

extern char** environ;

namespace moed::testing {

class ChildProcess {
 public:
  // Starts `argv[0]` with its stdout and stderr captured through pipes.
  explicit ChildProcess(const std::vector<std::string>& argv) {
    int out[2], err[2];
    if (pipe(out) != 0 || pipe(err) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&actions, err[1], STDERR_FILENO);
    posix_spawn_file_actions_addclose(&actions, out[0]);
    posix_spawn_file_actions_addclose(&actions, err[0]);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    if (posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
    close(out[1]);
    close(err[1]);
    stdout_fd_ = out[0];
    stderr_fd_ = err[0];
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() {
    if (pid_ > 0 && !exit_code_.has_value()) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (stdout_fd_ >= 0) close(stdout_fd_);
    if (stderr_fd_ >= 0) close(stderr_fd_);
  }

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // The next line on stdout, or nothing if none comes within `timeout`.
  std::optional<std::string> ReadStdoutLine(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      if (size_t nl = stdout_.find('\n'); nl != std::string::npos) {
        std::string line = stdout_.substr(0, nl);
        stdout_.erase(0, nl + 1);
        return line;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0 || !ReadSome(stdout_fd_, &stdout_, left)) return std::nullopt;
    }
  }

  // Sends `signal` and waits for the exit; returns the exit code (128 + signal if killed).
  int Stop(int signal = SIGTERM) {
    if (!exit_code_.has_value()) kill(pid_, signal);
    return Wait();
  }

  // Waits up to `timeout` for the process to exit by itself; then kills it.
  int WaitOrKill(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!exit_code_.has_value() && std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        DrainPipes();
        return *exit_code_;
      }
      ReadSome(stderr_fd_, &stderr_, std::chrono::milliseconds(20));
    }
    return Stop(SIGKILL);
  }

  int Wait() {
    if (exit_code_.has_value()) return *exit_code_;
    int status = 0;
    waitpid(pid_, &status, 0);
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    DrainPipes();
    return *exit_code_;
  }

  // Reads what is left in the pipes once the process is gone.
  void DrainPipes() {
    while (ReadSome(stdout_fd_, &stdout_, std::chrono::milliseconds(0))) {
    }
    while (ReadSome(stderr_fd_, &stderr_, std::chrono::milliseconds(0))) {
    }
  }

  // Everything on stderr (complete once Wait() has returned).
  const std::string& stderr_text() const { return stderr_; }
  const std::string& remaining_stdout() const { return stdout_; }

 private:
  static bool ReadSome(int fd, std::string* into, std::chrono::milliseconds timeout) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
    char buffer[4096];
    ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n <= 0) return false;
    into->append(buffer, static_cast<size_t>(n));
    return true;
  }

  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  int stderr_fd_ = -1;
  std::string stdout_;
  std::string stderr_;
  std::optional<int> exit_code_;
};

// GET `path` from `host:port` over plain HTTP/1.1; the whole response (status line, headers and
// body), or nothing when the connection fails.
inline std::optional<std::string> HttpGet(const std::string& address, const std::string& path) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return std::nullopt;
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
  if (inet_pton(AF_INET, address.substr(0, colon).c_str(), &to.sin_addr) != 1) return std::nullopt;
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return std::nullopt;
  if (connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof(to)) != 0) {
    close(fd);
    return std::nullopt;
  }
  const std::string request =
      "GET " + path + " HTTP/1.1\r\nHost: " + address + "\r\nConnection: close\r\n\r\n";
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return std::nullopt;
  }
  std::string response;
  char buffer[4096];
  for (ssize_t n; (n = read(fd, buffer, sizeof(buffer))) > 0;) response.append(buffer, n);
  close(fd);
  return response;
}

// Runs a command to completion and returns its exit code, stdout and stderr.
struct CommandResult {
  int exit_code;
  std::string out;
  std::string err;
};
inline CommandResult RunCommand(const std::vector<std::string>& argv) {
  ChildProcess child(argv);
  std::string out;
  while (auto line = child.ReadStdoutLine(std::chrono::seconds(30))) out += *line + "\n";
  // A command that does not end on its own within the read timeout is killed: the test then
  // sees exit code 128 + SIGKILL rather than hanging.
  int code = child.WaitOrKill(std::chrono::seconds(10));
  return {code, out + child.remaining_stdout(), child.stderr_text()};
}

}  // namespace moed::testing
