#include "server/http_server.h"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <deque>
#include <mutex>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moed::server {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

const char* HttpReason(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 204:
      return "No Content";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 413:
      return "Payload Too Large";
    case 415:
      return "Unsupported Media Type";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    default:
      return "Unknown";
  }
}

namespace {

std::string Head(int status, const std::string& content_type, const HttpExchange::Headers& headers,
                 bool keep_alive, std::optional<size_t> content_length) {
  std::string head = absl::StrCat("HTTP/1.1 ", status, " ", HttpReason(status), "\r\n");
  if (!content_type.empty()) absl::StrAppend(&head, "Content-Type: ", content_type, "\r\n");
  for (const auto& [name, value] : headers) absl::StrAppend(&head, name, ": ", value, "\r\n");
  if (content_length) {
    absl::StrAppend(&head, "Content-Length: ", *content_length, "\r\n");
  } else {
    absl::StrAppend(&head, "Transfer-Encoding: chunked\r\n");
  }
  absl::StrAppend(&head, keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n",
                  "\r\n");
  return head;
}

std::string Chunk(absl::string_view data) {
  return absl::StrCat(absl::StrFormat("%x", data.size()), "\r\n", data, "\r\n");
}

class Session;

}  // namespace

struct HttpServer::State {
  explicit State(HttpLimits l, HttpHandler h) : limits(l), handler(std::move(h)) {}
  std::atomic<int64_t> connections{0};
  HttpLimits limits;
  HttpHandler handler;
  std::mutex sessions_mutex;
  std::vector<std::weak_ptr<Session>> sessions;
  net::io_context ioc;
  tcp::acceptor acceptor{net::make_strand(ioc)};  // its handlers run one at a time
};

namespace {

class Exchange;

// One connection: reads a request, hands it to the handler, writes what the exchange sends,
// and reads the next request once the response has ended (keep-alive).
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, HttpServer::State& state)
      : stream_(std::move(socket)), state_(state) {}
  ~Session() { state_.connections.fetch_sub(1); }

  void Begin() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->Read(); });
  }

  // The server is stopping: close now if no response is in progress, else once it ends.
  void Close() {
    net::post(stream_.get_executor(), [self = shared_from_this()] {
      self->closing_ = true;
      if (!self->in_exchange_) self->Abort();
    });
  }

  // --- called on the connection's strand through Exchange -----------------------------
  void DoRespond(uint64_t exchange, int status, const std::string& content_type,
                 const std::string& body, const HttpExchange::Headers& headers) {
    if (!Current(exchange) || started_) return;
    started_ = true;
    ended_ = true;
    Queue(Head(status, content_type, headers, keep_alive_, body.size()) + body);
  }
  void DoStart(uint64_t exchange, int status, const std::string& content_type,
               const HttpExchange::Headers& headers) {
    if (!Current(exchange) || started_) return;
    started_ = true;
    Queue(Head(status, content_type, headers, keep_alive_, std::nullopt));
  }
  void DoSend(uint64_t exchange, const std::string& data) {
    if (!Current(exchange) || !started_ || ended_ || data.empty()) return;
    Queue(Chunk(data));
  }
  void DoEnd(uint64_t exchange) {
    if (!Current(exchange) || !started_ || ended_) return;
    ended_ = true;
    Queue("0\r\n\r\n");
  }
  void DoOnDisconnect(uint64_t exchange, std::function<void()> callback) {
    if (!Current(exchange)) {
      if (exchange == exchange_id_ && gone_) callback();  // gone before it was registered
      return;
    }
    on_disconnect_ = std::move(callback);
  }

  void DoPost(uint64_t exchange, const std::function<void()>& work) {
    if (Current(exchange)) work();
  }

  net::any_io_executor executor() { return stream_.get_executor(); }

 private:
  bool Current(uint64_t exchange) const {
    return exchange == exchange_id_ && in_exchange_ && !gone_;
  }

  void Read() {
    if (gone_) return;
    parser_.emplace();
    parser_->body_limit(state_.limits.max_body_bytes);
    parser_->header_limit(static_cast<uint32_t>(state_.limits.max_header_bytes));
    stream_.expires_after(state_.limits.idle_timeout);
    http::async_read(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
  }

  void OnRead(beast::error_code ec) {
    if (gone_) return;
    if (ec) {
      int status = 0;
      if (ec == http::error::body_limit) {
        status = 413;
      } else if (ec == http::error::header_limit) {
        status = 431;
      } else if (&ec.category() == &http::make_error_code(http::error::bad_target).category() &&
                 ec != http::error::end_of_stream && ec != http::error::partial_message) {
        status = 400;  // malformed
      }
      if (status == 0) return Abort();
      // Answer and close: the rest of the request is not read.
      keep_alive_ = false;
      in_exchange_ = true;
      ++exchange_id_;
      std::string body = absl::StrCat(
          R"({"error":{"message":")",
          status == 413
              ? absl::StrCat("request body larger than ", state_.limits.max_body_bytes, " bytes")
          : status == 431 ? absl::StrCat("request headers larger than ",
                                         state_.limits.max_header_bytes, " bytes")
                          : "malformed HTTP request",
          R"(","type":"invalid_request_error","param":null,"code":null}})");
      DoRespond(exchange_id_, status, "application/json", body, {});
      return;
    }
    http::request<http::string_body> message = parser_->release();
    parser_.reset();
    HttpRequest request;
    request.method = std::string(message.method_string());
    std::string target(message.target());
    size_t q = target.find('?');
    request.path = target.substr(0, q);
    if (q != std::string::npos) request.query = target.substr(q + 1);
    request.body = std::move(message.body());
    request.authorization = std::string(message[http::field::authorization]);
    request.content_type = std::string(message[http::field::content_type]);
    keep_alive_ = message.keep_alive();
    in_exchange_ = true;
    started_ = false;
    ended_ = false;
    on_disconnect_ = nullptr;
    ++exchange_id_;
    stream_.expires_never();
    WatchForClose();
    state_.handler(std::move(request), MakeExchange());
  }

  std::shared_ptr<HttpExchange> MakeExchange();

  // While a response is being made, a readable socket means the client closed (or sent a
  // pipelined request, which waits until the response ends).
  void WatchForClose() {
    if (watching_) return;
    watching_ = true;
    stream_.socket().async_wait(tcp::socket::wait_read,
                                [self = shared_from_this()](beast::error_code ec) {
                                  self->watching_ = false;
                                  self->OnReadable(ec);
                                });
  }

  void OnReadable(beast::error_code ec) {
    if (gone_) return;
    if (!in_exchange_) {
      // The response ended while the watch was pending (cancelled, or the next request is
      // already here): read the next request.
      if (ec && ec != net::error::operation_aborted) return Abort();
      return Read();
    }
    if (!ec) {
      char byte;
      ssize_t n = ::recv(stream_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      if (n > 0) return;  // pipelined bytes: read them after this response
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return WatchForClose();
    }
    Abort();
  }

  void Queue(std::string bytes) {
    writes_.push_back(std::move(bytes));
    if (!writing_) Write();
  }

  void Write() {
    writing_ = true;
    stream_.expires_after(state_.limits.write_timeout);
    net::async_write(
        stream_, net::buffer(writes_.front()),
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnWrite(ec); });
  }

  void OnWrite(beast::error_code ec) {
    writing_ = false;
    if (gone_) return;
    if (ec) return Abort();
    writes_.pop_front();
    if (!writes_.empty()) return Write();
    stream_.expires_never();
    if (!ended_) return;
    in_exchange_ = false;
    on_disconnect_ = nullptr;
    if (!keep_alive_ || closing_) {
      beast::error_code ignored;
      stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
      return Abort();
    }
    if (watching_) {
      stream_.socket().cancel();  // OnReadable sees operation_aborted and reads the next request
    } else {
      Read();
    }
  }

  // The client is gone (or the server stops): tell the exchange, close the socket.
  void Abort() {
    if (gone_) return;
    gone_ = true;
    if (in_exchange_ && !ended_ && on_disconnect_) {
      auto callback = std::move(on_disconnect_);
      callback();
    }
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.socket().close(ignored);
  }

  beast::tcp_stream stream_;
  HttpServer::State& state_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::deque<std::string> writes_;
  std::function<void()> on_disconnect_;
  uint64_t exchange_id_ = 0;
  bool keep_alive_ = true;
  bool in_exchange_ = false;
  bool started_ = false;
  bool ended_ = false;
  bool writing_ = false;
  bool watching_ = false;
  bool closing_ = false;
  bool gone_ = false;
};

class Exchange final : public HttpExchange {
 public:
  Exchange(std::weak_ptr<Session> session, uint64_t id) : session_(std::move(session)), id_(id) {}

  // The posted calls capture the exchange's id, not the exchange: it may be gone by then.
  void Respond(int status, std::string content_type, std::string body, Headers headers) override {
    Dispatch([id = id_, status, content_type = std::move(content_type), body = std::move(body),
              headers = std::move(headers)](Session& s) mutable {
      s.DoRespond(id, status, content_type, body, headers);
    });
  }
  void StartStream(int status, std::string content_type, Headers headers) override {
    Dispatch([id = id_, status, content_type = std::move(content_type),
              headers = std::move(headers)](Session& s) mutable {
      s.DoStart(id, status, content_type, headers);
    });
  }
  void Send(std::string data) override {
    Dispatch([id = id_, data = std::move(data)](Session& s) mutable { s.DoSend(id, data); });
  }
  void End() override {
    Dispatch([id = id_](Session& s) { s.DoEnd(id); });
  }
  void Post(std::function<void()> work) override {
    Dispatch([id = id_, work = std::move(work)](Session& s) { s.DoPost(id, work); });
  }
  void OnDisconnect(std::function<void()> callback) override {
    if (session_.expired()) return callback();  // gone already
    Dispatch([id = id_, callback = std::move(callback)](Session& s) mutable {
      s.DoOnDisconnect(id, std::move(callback));
    });
  }

 private:
  template <typename F>
  void Dispatch(F f) {
    std::shared_ptr<Session> session = session_.lock();
    if (!session) return;
    net::post(session->executor(), [session, f = std::move(f)]() mutable { f(*session); });
  }

  std::weak_ptr<Session> session_;
  uint64_t id_;
};

std::shared_ptr<HttpExchange> Session::MakeExchange() {
  return std::make_shared<Exchange>(weak_from_this(), exchange_id_);
}

void Accept(HttpServer::State& state) {
  state.acceptor.async_accept(net::make_strand(state.ioc), [&state](beast::error_code ec,
                                                                    tcp::socket socket) {
    if (ec) {
      if (ec == net::error::operation_aborted || !state.acceptor.is_open()) return;
      Accept(state);  // EMFILE and the like: keep accepting
      return;
    }
    if (state.connections.load() >= state.limits.max_connections) {
      const std::string body =
          R"({"error":{"message":"too many connections","type":"server_error","param":null,"code":null}})";
      auto reply = std::make_shared<std::string>(
          Head(503, "application/json", {}, false, body.size()) + body);
      auto held = std::make_shared<tcp::socket>(std::move(socket));
      net::async_write(*held, net::buffer(*reply), [held, reply](beast::error_code, size_t) {
        beast::error_code ignored;
        held->shutdown(tcp::socket::shutdown_both, ignored);
        held->close(ignored);
      });
    } else {
      state.connections.fetch_add(1);
      auto session = std::make_shared<Session>(std::move(socket), state);
      {
        std::lock_guard<std::mutex> lock(state.sessions_mutex);
        // Forget closed sessions now and then, so the list stays the size of the open ones.
        if (state.sessions.size() > 64 &&
            state.sessions.size() > 2 * static_cast<size_t>(state.connections.load())) {
          std::erase_if(state.sessions,
                        [](const std::weak_ptr<Session>& s) { return s.expired(); });
        }
        state.sessions.push_back(session);
      }
      session->Begin();
    }
    Accept(state);
  });
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& address,
                                                              const HttpLimits& limits,
                                                              HttpHandler handler) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos)
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not HOST:PORT"));
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  int port = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535)
    return absl::InvalidArgumentError(absl::StrCat("'", address, "': bad port"));
  std::unique_ptr<HttpServer> server(new HttpServer());
  server->state_ = std::make_shared<State>(limits, std::move(handler));
  State& state = *server->state_;
  beast::error_code ec;
  net::ip::address ip = net::ip::make_address(host == "localhost" ? "127.0.0.1" : host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("'", host, "' is not an IP address"));
  tcp::endpoint endpoint(ip, static_cast<uint16_t>(port));
  state.acceptor.open(endpoint.protocol(), ec);
  if (!ec) state.acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) state.acceptor.bind(endpoint, ec);
  if (!ec) state.acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, " for HTTP: ", ec.message()));
  }
  tcp::endpoint bound = state.acceptor.local_endpoint();
  server->address_ = bound.address().is_v6()
                         ? absl::StrCat("[", bound.address().to_string(), "]:", bound.port())
                         : absl::StrCat(bound.address().to_string(), ":", bound.port());
  Accept(state);
  for (int i = 0; i < std::max(1, limits.threads); ++i) {
    server->threads_.emplace_back([&state] { state.ioc.run(); });
  }
  return server;
}

int64_t HttpServer::connections() const { return state_ ? state_->connections.load() : 0; }

void HttpServer::Stop(std::chrono::milliseconds grace) {
  if (!state_ || threads_.empty()) return;
  net::post(state_->acceptor.get_executor(), [state = state_.get()] {
    beast::error_code ignored;
    state->acceptor.close(ignored);
  });
  {
    std::lock_guard<std::mutex> lock(state_->sessions_mutex);
    for (const auto& weak : state_->sessions) {
      if (std::shared_ptr<Session> session = weak.lock()) session->Close();
    }
  }
  // Responses in progress end within the grace; then whatever is left is cut.
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (state_->connections.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  state_->ioc.stop();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

HttpServer::~HttpServer() { Stop(std::chrono::milliseconds(0)); }

}  // namespace moed::server
