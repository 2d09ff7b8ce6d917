// A small C++ client for the moed gRPC API.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/channel.h"
#include "moed/v1/moed.grpc.pb.h"

namespace moed::client {

// Maps a gRPC status onto the same canonical code.
absl::Status FromGrpcStatus(const grpc::Status& status);

class Client {
 public:
  // Does not connect yet: the first call does. `timeout` bounds the unary calls and the wait
  // for a connection before a stream; a stream itself runs until it ends, or for at most
  // `stream_timeout` when that is positive. `api_key`, when not empty, goes with every call as
  // "authorization: Bearer KEY".
  static std::unique_ptr<Client> Create(
      const std::string& address, std::chrono::milliseconds timeout,
      const std::string& api_key = "",
      std::chrono::milliseconds stream_timeout = std::chrono::milliseconds(0));

  // grpc.health.v1 Check for `service` ("" for the daemon as a whole).
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Health(
      const std::string& service = "");
  absl::StatusOr<v1::ModelInfoResponse> ModelInfo();
  absl::StatusOr<v1::TokenizeResponse> Tokenize(const v1::TokenizeRequest& request);

  // Streams a generation: `on_message` sees each message as it arrives; returning false from
  // it cancels the call. UNAVAILABLE when no connection is made within the timeout;
  // DEADLINE_EXCEEDED when the stream outlasts a positive stream_timeout.
  absl::Status Generate(const v1::GenerateRequest& request,
                        const std::function<bool(const v1::GenerateResponse&)>& on_message);

 private:
  Client(std::shared_ptr<grpc::Channel> channel, std::chrono::milliseconds timeout,
         std::string api_key, std::chrono::milliseconds stream_timeout);
  void SetDeadline(grpc::ClientContext* context) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Moed::Stub> moed_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  std::chrono::milliseconds timeout_;
  std::string api_key_;
  std::chrono::milliseconds stream_timeout_;
};

}  // namespace moed::client
