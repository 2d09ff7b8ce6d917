// The HTTP server driven through plain sockets, byte by byte as a client sends them.
#include "server/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace moed::server {
namespace {

class Client {
 public:
  explicit Client(const std::string& address) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    size_t colon = address.rfind(':');
    addr.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
    inet_pton(AF_INET, address.substr(0, colon).c_str(), &addr.sin_addr);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~Client() { Close(); }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  bool connected() const { return connected_; }
  void Send(const std::string& bytes) {
    REQUIRE(write(fd_, bytes.data(), bytes.size()) == ssize_t(bytes.size()));
  }
  // Reads until `until` appears (or the peer closes, or 5 s pass); returns all read so far.
  std::string ReadUntil(const std::string& until) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (received_.find(until) == std::string::npos &&
           std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      char buf[4096];
      ssize_t n = read(fd_, buf, sizeof(buf));
      if (n <= 0) {
        closed_ = true;
        break;
      }
      received_.append(buf, static_cast<size_t>(n));
    }
    return received_;
  }
  bool closed_by_peer() {
    ReadUntil("\x01never\x02");
    return closed_;
  }
  void Clear() { received_.clear(); }

 private:
  int fd_ = -1;
  bool connected_ = false;
  bool closed_ = false;
  std::string received_;
};

std::string Post(const std::string& path, const std::string& body, const std::string& extra = "") {
  return "POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
         "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

TEST_CASE("http: keep-alive serves several requests on one connection, with their bodies") {
  auto server =
      HttpServer::Start("127.0.0.1:0", {}, [](HttpRequest r, std::shared_ptr<HttpExchange> x) {
        x->Respond(
            200, "text/plain",
            r.method + " " + r.path + " q=" + r.query + " " + r.body + " auth=" + r.authorization);
      });
  REQUIRE(server.ok());
  Client c((*server)->address());
  REQUIRE(c.connected());
  c.Send(Post("/v1/a?x=1", "hello", "Authorization: Bearer k\r\n"));
  std::string first = c.ReadUntil("auth=Bearer k");
  CHECK(first.rfind("HTTP/1.1 200 OK\r\n", 0) == 0);
  CHECK(first.find("Content-Length: 36\r\n") != std::string::npos);
  CHECK(first.find("\r\n\r\nPOST /v1/a q=x=1 hello auth=Bearer k") != std::string::npos);
  c.Clear();
  c.Send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(c.ReadUntil("auth=").find("GET /health q= ") != std::string::npos);
  CHECK((*server)->connections() == 1);
}

TEST_CASE("http: a streamed response arrives as chunks, as they are sent from another thread") {
  std::mutex mutex;
  std::shared_ptr<HttpExchange> held;
  std::condition_variable ready;
  auto server =
      HttpServer::Start("127.0.0.1:0", {}, [&](HttpRequest, std::shared_ptr<HttpExchange> x) {
        x->StartStream(200, "text/event-stream", {{"Cache-Control", "no-cache"}});
        std::lock_guard<std::mutex> lock(mutex);
        held = std::move(x);
        ready.notify_all();
      });
  REQUIRE(server.ok());
  Client c((*server)->address());
  c.Send(Post("/s", "{}"));
  {
    std::unique_lock<std::mutex> lock(mutex);
    ready.wait(lock, [&] { return held != nullptr; });
  }
  CHECK(c.ReadUntil("\r\n\r\n").find("Transfer-Encoding: chunked") != std::string::npos);
  held->Send("data: one\n\n");
  CHECK(c.ReadUntil("data: one").find("b\r\ndata: one\n\n\r\n") != std::string::npos);
  held->Send("data: [DONE]\n\n");
  held->End();
  CHECK(c.ReadUntil("0\r\n\r\n").find("e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n") != std::string::npos);
}

TEST_CASE("http: a client that goes away mid-response is reported once") {
  std::mutex mutex;
  std::condition_variable changed;
  int disconnects = 0;
  std::shared_ptr<HttpExchange> held;
  auto server =
      HttpServer::Start("127.0.0.1:0", {}, [&](HttpRequest, std::shared_ptr<HttpExchange> x) {
        x->OnDisconnect([&] {
          std::lock_guard<std::mutex> lock(mutex);
          ++disconnects;
          changed.notify_all();
        });
        std::lock_guard<std::mutex> lock(mutex);
        held = std::move(x);  // never answers: a long generation
        changed.notify_all();
      });
  REQUIRE(server.ok());
  {
    Client c((*server)->address());
    c.Send(Post("/slow", "{}"));
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return held != nullptr; });
  }  // the client closes
  std::unique_lock<std::mutex> lock(mutex);
  CHECK(changed.wait_for(lock, std::chrono::seconds(5), [&] { return disconnects == 1; }));
  lock.unlock();
  held->Respond(200, "text/plain", "too late");  // does nothing, and nothing breaks
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(disconnects == 1);
}

TEST_CASE("http: oversized bodies get 413, headers 431, malformed requests 400, all close") {
  HttpLimits limits;
  limits.max_body_bytes = 100;
  auto server = HttpServer::Start(
      "127.0.0.1:0", limits,
      [](HttpRequest, std::shared_ptr<HttpExchange> x) { x->Respond(200, "text/plain", "ok"); });
  REQUIRE(server.ok());
  Client big((*server)->address());
  big.Send(Post("/x", std::string(101, 'a')));
  CHECK(big.ReadUntil("}}").rfind("HTTP/1.1 413 Payload Too Large\r\n", 0) == 0);
  CHECK(big.closed_by_peer());
  Client tall((*server)->address());
  tall.Send("GET / HTTP/1.1\r\nHost: x\r\nX-Padding: " + std::string(20000, 'p') + "\r\n\r\n");
  CHECK(tall.ReadUntil("}}").rfind("HTTP/1.1 431 Request Header Fields Too Large\r\n", 0) == 0);
  CHECK(tall.closed_by_peer());
  Client bad((*server)->address());
  bad.Send("NOT HTTP AT ALL\r\n\r\n");
  CHECK(bad.ReadUntil("}}").rfind("HTTP/1.1 400 Bad Request\r\n", 0) == 0);
  CHECK(bad.closed_by_peer());
}

TEST_CASE("http: past max_connections a new connection gets 503, idle ones time out") {
  HttpLimits limits;
  limits.max_connections = 2;
  limits.idle_timeout = std::chrono::seconds(1);
  auto server = HttpServer::Start(
      "127.0.0.1:0", limits,
      [](HttpRequest, std::shared_ptr<HttpExchange> x) { x->Respond(200, "text/plain", "ok"); });
  REQUIRE(server.ok());
  Client a((*server)->address()), b((*server)->address());
  a.Send("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  b.Send("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(a.ReadUntil("ok").find("200 OK") != std::string::npos);
  CHECK(b.ReadUntil("ok").find("200 OK") != std::string::npos);
  Client third((*server)->address());
  CHECK(third.ReadUntil("}}").rfind("HTTP/1.1 503 Service Unavailable\r\n", 0) == 0);
  CHECK(a.closed_by_peer());  // idle past the timeout
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while ((*server)->connections() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK((*server)->connections() == 0);
}

TEST_CASE("http: a taken port is an error naming the address") {
  auto first =
      HttpServer::Start("127.0.0.1:0", {}, [](HttpRequest, std::shared_ptr<HttpExchange>) {});
  REQUIRE(first.ok());
  auto second =
      HttpServer::Start((*first)->address(), {}, [](HttpRequest, std::shared_ptr<HttpExchange>) {});
  REQUIRE(!second.ok());
  CHECK(second.status().message().find("cannot listen on " + (*first)->address()) == 0);
  CHECK(!HttpServer::Start("nonsense", {}, [](HttpRequest, std::shared_ptr<HttpExchange>) {}).ok());
}

}  // namespace
}  // namespace moed::server
