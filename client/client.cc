#include "client/client.h"

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace moed::client {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

std::unique_ptr<Client> Client::Create(const std::string& address,
                                       std::chrono::milliseconds timeout,
                                       const std::string& api_key,
                                       std::chrono::milliseconds stream_timeout) {
  return std::unique_ptr<Client>(
      new Client(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()), timeout, api_key,
                 stream_timeout));
}

Client::Client(std::shared_ptr<grpc::Channel> channel, std::chrono::milliseconds timeout,
               std::string api_key, std::chrono::milliseconds stream_timeout)
    : channel_(std::move(channel)),
      moed_(v1::Moed::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)),
      timeout_(timeout),
      api_key_(std::move(api_key)),
      stream_timeout_(stream_timeout) {}

// Every call sets its deadline (and the API key) here.
void Client::SetDeadline(grpc::ClientContext* context) const {
  context->set_deadline(std::chrono::system_clock::now() + timeout_);
  if (!api_key_.empty()) context->AddMetadata("authorization", "Bearer " + api_key_);
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Client::Health(
    const std::string& service) {
  grpc::ClientContext context;
  SetDeadline(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = health_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response.status();
}

absl::StatusOr<v1::ModelInfoResponse> Client::ModelInfo() {
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::ModelInfoResponse response;
  grpc::Status status = moed_->ModelInfo(&context, v1::ModelInfoRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::TokenizeResponse> Client::Tokenize(const v1::TokenizeRequest& request) {
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::TokenizeResponse response;
  grpc::Status status = moed_->Tokenize(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status Client::Generate(const v1::GenerateRequest& request,
                              const std::function<bool(const v1::GenerateResponse&)>& on_message) {
  // The timeout bounds reaching the daemon; the stream runs as long as it takes (or for the
  // stream timeout): a long generation is not a slow daemon.
  if (!channel_->WaitForConnected(std::chrono::system_clock::now() + timeout_)) {
    return absl::UnavailableError(absl::StrCat("no connection within ", timeout_.count(), " ms"));
  }
  grpc::ClientContext context;
  if (!api_key_.empty()) context.AddMetadata("authorization", "Bearer " + api_key_);
  if (stream_timeout_.count() > 0) {
    context.set_deadline(std::chrono::system_clock::now() + stream_timeout_);
  }
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      moed_->Generate(&context, request);
  v1::GenerateResponse message;
  while (reader->Read(&message)) {
    if (!on_message(message)) {
      context.TryCancel();
      break;
    }
  }
  return FromGrpcStatus(reader->Finish());
}

}  // namespace moed::client
