#include "server/logging.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>

#include "nlohmann/json.hpp"
#include "util/rate_limiter.h"

namespace moed::server {
namespace {

// Runs `body` with stderr redirected to a temporary file and returns what it wrote.
template <typename Body>
std::string CaptureStderr(Body body) {
  std::fflush(stderr);
  char name[] = "/tmp/moed_log_testXXXXXX";
  int fd = mkstemp(name);
  REQUIRE(fd >= 0);
  int saved = dup(STDERR_FILENO);
  dup2(fd, STDERR_FILENO);
  body();
  std::fflush(stderr);
  dup2(saved, STDERR_FILENO);
  close(saved);
  std::string text;
  char chunk[4096];
  lseek(fd, 0, SEEK_SET);
  for (ssize_t n; (n = read(fd, chunk, sizeof(chunk))) > 0;) text.append(chunk, n);
  close(fd);
  unlink(name);
  return text;
}

TEST_CASE("json logs are one escaped JSON object per line") {
  auto logger = MakeLogger("moed", "info", "json");
  REQUIRE(logger.ok());
  std::string text = CaptureStderr([&] {
    (*logger)->info("quote \" backslash \\ newline \n done");
    (*logger)->debug("below the level");
    (*logger)->warn("second");
  });
  std::vector<nlohmann::json> lines;
  size_t start = 0;
  for (size_t end; (end = text.find('\n', start)) != std::string::npos; start = end + 1) {
    lines.push_back(nlohmann::json::parse(text.substr(start, end - start)));
  }
  REQUIRE(lines.size() == 2);
  CHECK(lines[0]["msg"] == "quote \" backslash \\ newline \n done");
  CHECK(lines[0]["level"] == "info");
  CHECK(lines[0]["logger"] == "moed");
  CHECK(lines[0]["ts"].get<std::string>().size() == 24);  // 2026-11-22T10:51:14.123Z
  CHECK(lines[1]["level"] == "warning");
}

TEST_CASE("text logs carry a UTC timestamp and the level") {
  auto logger = MakeLogger("moed", "debug", "text");
  REQUIRE(logger.ok());
  std::string text = CaptureStderr([&] { (*logger)->debug("hello"); });
  CHECK(text.size() > 24);
  CHECK(text.substr(23, 1) == "Z");
  CHECK(text.find(" debug hello\n") != std::string::npos);
}

TEST_CASE("unknown levels and formats are refused") {
  CHECK_FALSE(MakeLogger("moed", "loud", "text").ok());
  CHECK_FALSE(MakeLogger("moed", "info", "xml").ok());
}

}  // namespace
}  // namespace moed::server

namespace moed::util {
namespace {

TEST_CASE("the rate limiter lets N events through per interval and counts the rest") {
  RateLimiter limiter(3, std::chrono::seconds(1));
  const auto t0 = RateLimiter::Clock::time_point{} + std::chrono::hours(1);
  uint64_t dropped = 99;
  for (int i = 0; i < 3; ++i) {
    REQUIRE(limiter.Allow(t0 + std::chrono::milliseconds(i), &dropped));
    CHECK(dropped == 0);
  }
  for (int i = 0; i < 5; ++i)
    CHECK_FALSE(limiter.Allow(t0 + std::chrono::milliseconds(500), &dropped));
  // The next interval: the first event through reports the five dropped, the next none.
  REQUIRE(limiter.Allow(t0 + std::chrono::milliseconds(1000), &dropped));
  CHECK(dropped == 5);
  REQUIRE(limiter.Allow(t0 + std::chrono::milliseconds(1001), &dropped));
  CHECK(dropped == 0);
}

}  // namespace
}  // namespace moed::util
