// A small asynchronous HTTP/1.1 server (Boost.Beast for parsing, Asio for I/O): keep-alive,
// chunked streaming responses for server-sent events, a connection cap, bounded request sizes,
// idle and write timeouts, and notice when a client goes away before its response ends.
// It knows nothing of the API it serves: a handler gets each request and an exchange to answer
// through, now or later, from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace moed::server {

struct HttpLimits {
  size_t max_body_bytes = 8u << 20;     // larger bodies get 413
  size_t max_header_bytes = 16u << 10;  // larger headers get 431
  int64_t max_connections = 4096;       // beyond it a new connection gets 503 and is closed
  // A connection with no request in progress is closed after this; so is one whose client
  // does not take a response's bytes for this long.
  std::chrono::seconds idle_timeout{120};
  std::chrono::seconds write_timeout{60};
  int threads = 2;
};

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string path;    // without the query
  std::string query;
  std::string body;
  std::string authorization;  // the Authorization header, or empty
  std::string content_type;
};

// How a handler answers one request. Every method may be called from any thread; calls are
// carried out in order on the connection. After the client has gone, they do nothing.
class HttpExchange {
 public:
  virtual ~HttpExchange() = default;
  using Headers = std::vector<std::pair<std::string, std::string>>;

  // A complete response; ends the exchange.
  virtual void Respond(int status, std::string content_type, std::string body,
                       Headers headers = {}) = 0;
  // A streamed response: the head now, then Send any number of times, then End.
  virtual void StartStream(int status, std::string content_type, Headers headers = {}) = 0;
  virtual void Send(std::string data) = 0;
  virtual void End() = 0;
  // Called once, on the connection's thread, if the client goes away before the response
  // ends (closes the connection, or stops reading past the write timeout).
  virtual void OnDisconnect(std::function<void()> callback) = 0;
  // Runs `work` on the connection's thread, in order with the calls above; dropped once the
  // exchange has ended or the client has gone.
  virtual void Post(std::function<void()> work) = 0;
};

using HttpHandler = std::function<void(HttpRequest, std::shared_ptr<HttpExchange>)>;

class HttpServer {
 public:
  // Binds "host:port" (port 0: a free one) and starts serving on its own threads.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& address,
                                                           const HttpLimits& limits,
                                                           HttpHandler handler);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // The bound "host:port".
  const std::string& address() const { return address_; }
  // Connections open now (idle, reading, or answering).
  int64_t connections() const;
  // Stops accepting and closes idle connections; a response in progress may end within
  // `grace`, then what is left is closed and the threads are joined.
  void Stop(std::chrono::milliseconds grace);

  struct State;

 private:
  HttpServer() = default;
  std::shared_ptr<State> state_;
  std::vector<std::thread> threads_;
  std::string address_;
};

// The reason phrase of an HTTP status code ("OK", "Not Found", ...).
const char* HttpReason(int status);

}  // namespace moed::server
