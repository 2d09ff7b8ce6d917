// The scheduler: a request queue with admission limits and one engine thread that runs
// continuous batching. Requests join and leave the running batch at token boundaries; a step
// carries the decode tokens of running sequences and chunks of prompts being prefilled, up to
// max_tokens_per_step, and runs layer by layer over all of them (so an expert is staged at most
// once per step). Nothing here knows about gRPC or HTTP.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model.h"
#include "model/sampler.h"
#include "model/tokenizer.h"
#include "scheduler/step_selection.h"
#include "scheduler/worker_pool.h"

namespace moed::scheduler {

// routing[layer][token] of one finished sequence (prompt tokens first), for traces.
using RoutingSink = std::function<void(const std::string& request_id, int prompt_tokens,
                                       const std::vector<std::vector<std::vector<int>>>& routing)>;

class RequestObserver;

struct SchedulerOptions {
  int max_batch = 16;             // sequences in one step
  int max_queue = 256;            // requests waiting beyond the running batch
  int max_tokens_per_step = 256;  // decode tokens + prefill chunks in one step
  RoutingSink on_routing;         // when set, every finished sequence's routing is handed here
  // Sequences admitted at once, each with its KV cache; 0 means max_batch. When more are
  // admitted than fit in one step, each step picks max_batch of them.
  int max_running = 0;
  // Pick a step's sequences so that the experts their previous tokens used, together with
  // those resident (`resident_experts`), need the fewest experts staged, rather than
  // round-robin (see step_selection.h); none runs more than max_delay_steps steps later than
  // its round-robin turn.
  bool expert_aware = true;
  int max_delay_steps = 4;
  std::function<ResidentSet()> resident_experts;
  // When set, told what each request does as it runs (for metrics).
  std::shared_ptr<RequestObserver> observer;
  // Threads that sample a step's sequences, the engine thread's included (each sequence's
  // sampler is its own, so the tokens do not depend on this); 0: one per hardware thread, at
  // most 8.
  int sampling_threads = 0;
};

enum class FinishReason { kNone, kStop, kLength, kCancelled };

struct GenerationRequest {
  std::string id;
  std::vector<int32_t> prompt;
  model::SamplingParams sampling;
  uint64_t default_seed = 0;  // used when sampling.seed is unset
  bool skip_special_tokens = true;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  // Higher leaves the queue first; equal priorities in arrival order.
  int32_t priority = 0;
  // The loosest expert copy this request's experts may run from under the cache's precision
  // policy (kSource: exact).
  model::Precision loosest_precision = model::Precision::kSource;
};

// What the expert cache did for one request, summed over the steps it ran in. An expert a
// step staged for several requests counts as a use for each; its bytes are split among them.
struct RequestExpertStats {
  uint64_t device_hits = 0;
  uint64_t host_hits = 0;
  uint64_t ssd_reads = 0;
  uint64_t low_precision_fallbacks = 0;  // fallbacks_int8 + fallbacks_int4
  uint64_t fallbacks_int8 = 0;
  uint64_t fallbacks_int4 = 0;
  uint64_t bytes_staged = 0;
  double stall_seconds = 0;  // the steps it ran in waited this long for experts
  // Prefetches the steps it ran in started and wasted (split among the step's requests), and
  // its expert uses a prefetch served before (useful) or while (late) it was needed.
  uint64_t prefetch_issued = 0;
  uint64_t prefetch_useful = 0;
  uint64_t prefetch_late = 0;
  uint64_t prefetch_wasted = 0;
};

// One message of a stream: new text and ids, and on the last one the finish reason or error.
struct StreamEvent {
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<model::TokenChoice> choices;  // one per token id (for logprobs)
  FinishReason finish = FinishReason::kNone;
  std::string matched_stop;
  absl::Status error;  // set on a last message that failed (deadline, engine error)
  uint32_t prompt_tokens = 0;
  uint32_t completion_tokens = 0;
  RequestExpertStats expert_stats;  // last message only
  bool last() const { return finish != FinishReason::kNone || !error.ok(); }
};

// The caller's side of a submitted request.
class RequestHandle {
 public:
  // The next event, or nothing if none came within `timeout`.
  std::optional<StreamEvent> Next(std::chrono::milliseconds timeout);
  // Asks the scheduler to drop the request at the next step boundary; its batch slot and KV
  // cache are released then.
  void Cancel();
  // Called after each event is queued (on the engine thread, so it must be quick: hand the
  // work to another thread), and at once if events are already waiting.
  void SetListener(std::function<void()> listener);

 private:
  friend class Scheduler;
  void Push(StreamEvent event);
  bool cancelled() const;

  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<StreamEvent> events_;
  std::function<void()> listener_;
  bool cancelled_ = false;
};

// How a request ended, for a RequestObserver.
struct FinishedRequest {
  FinishReason reason = FinishReason::kNone;       // kNone when it failed
  absl::StatusCode error = absl::StatusCode::kOk;  // why it failed
  uint32_t prompt_tokens = 0;
  uint32_t generation_tokens = 0;
  double e2e_seconds = 0;  // from Submit to the last event
};

// What the scheduler reports as requests run. Calls come on the engine thread, before the
// event they concern is pushed, so whoever holds an event finds it recorded; they sit on the
// decode path, so an implementation takes no lock (atomics, not a mutex).
class RequestObserver {
 public:
  virtual ~RequestObserver() = default;
  // The request left the queue for the running set.
  virtual void OnAdmitted(double queue_seconds) = 0;
  // A step computed this many prompt tokens and sampled this many new ones.
  virtual void OnStepTokens(uint64_t prompt_tokens, uint64_t generation_tokens) = 0;
  // A request's first new token, this long after Submit.
  virtual void OnFirstToken(double seconds) = 0;
  // A later token, this long after the request's previous one.
  virtual void OnInterToken(double seconds) = 0;
  virtual void OnFinished(const FinishedRequest& request) = 0;
};

struct SchedulerStats {
  uint64_t waiting = 0;
  uint64_t running = 0;
  uint64_t steps = 0;
  uint64_t completed = 0;
  uint64_t cancelled = 0;
  uint64_t kv_cache_bytes = 0;  // held by running sequences
  // What the running set may hold: the model's KV budget, or without one max_running
  // sequences of the full context.
  uint64_t kv_cache_budget_bytes = 0;
  uint64_t generated_tokens = 0;
  // Running sequences sent back to the queue to free KV blocks (the newest first); each
  // recomputes its prefix when admitted again.
  uint64_t preemptions = 0;
};

class Scheduler {
 public:
  // `tokenizer` may be null (token-ids-only serving).
  Scheduler(std::shared_ptr<model::Model> model, std::shared_ptr<const model::Tokenizer> tokenizer,
            const SchedulerOptions& options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // INVALID_ARGUMENT for bad token ids, sampling parameters or a prompt plus max_tokens over
  // the context (naming the limit); RESOURCE_EXHAUSTED when the queue is full; UNAVAILABLE
  // once draining.
  absl::StatusOr<std::shared_ptr<RequestHandle>> Submit(GenerationRequest request);
  // Stops accepting requests; those admitted run to the end.
  void StopAccepting();
  // Ends every waiting and running request at the next step boundary, each with a last event
  // (FinishReason::kCancelled, its usage), as if its client had cancelled it.
  void CancelAll();
  // True when nothing is waiting or running.
  bool Idle() const;
  SchedulerStats stats() const;

 private:
  struct Sequence;
  // One sequence's part of a step: its next decode token, or a chunk of its prefix.
  struct StepInput {
    Sequence* seq = nullptr;
    size_t tokens = 0;
    bool prefix = false;
  };
  void Loop();
  // What each of `step`'s sequences contributes, within max_tokens_per_step.
  std::vector<StepInput> PlanStep(const std::vector<std::shared_ptr<Sequence>>& step) const;
  // With a KV budget: preempts the newest running sequences until the step's new blocks fit
  // (dropping them from `step`); a sequence alone that outgrows the budget fails.
  void FitKvBudget(std::vector<std::shared_ptr<Sequence>>& running,
                   std::vector<std::shared_ptr<Sequence>>& step);
  // Frees a running sequence's KV cache and readies it to recompute its prefix.
  void Preempt(Sequence& seq);
  void Step(std::vector<std::shared_ptr<Sequence>>& running);
  // The sequences of the next step, from the admitted ones.
  std::vector<std::shared_ptr<Sequence>> SelectForStep(
      const std::vector<std::shared_ptr<Sequence>>& running);
  // Adds what the step's expert uses did to each sequence's expert stats.
  static void AttributeExpertUses(const std::vector<model::SequenceInput>& inputs,
                                  const std::vector<Sequence*>& owners,
                                  const model::ForwardOutput& out);
  // Hands the routing to on_routing, settles the counters (running, KV bytes, completed),
  // frees the KV cache, then sends the last event (text still held back unless a stop
  // matched, finish reason, usage): whoever has the last event sees all of that done.
  void Finish(Sequence& seq, FinishReason reason, const absl::Status& error,
              const std::string& matched_stop = "");

  std::shared_ptr<model::Model> model_;
  std::shared_ptr<const model::Tokenizer> tokenizer_;
  SchedulerOptions options_;
  WorkerPool sampling_pool_;  // the engine thread's, for sampling a step's sequences

  mutable std::mutex mutex_;
  std::condition_variable work_;
  std::deque<std::shared_ptr<Sequence>> waiting_;
  std::vector<std::shared_ptr<Sequence>> running_;  // touched only by the engine thread
  uint64_t running_count_ = 0;
  bool accepting_ = true;
  bool stopping_ = false;
  bool cancel_all_ = false;
  SchedulerStats stats_;
  uint64_t next_arrival_ = 0;
  uint64_t step_counter_ = 0;      // engine thread only
  uint64_t generated_tokens_ = 0;  // engine thread only
  std::thread engine_;
};

}  // namespace moed::scheduler
