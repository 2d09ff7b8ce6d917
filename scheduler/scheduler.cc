#include "scheduler/scheduler.h"

#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "scheduler/sampling_params.h"
#include "scheduler/step_selection.h"
#include "util/unshared_status.h"

namespace moed::scheduler {

struct Scheduler::Sequence {
  GenerationRequest request;
  std::shared_ptr<RequestHandle> handle;
  std::unique_ptr<model::KvCache> cache;
  // The tokens to prefill: the prompt, or after a preemption the prompt and every token
  // generated so far (recomputed; the batch-invariant kernels give the same logits).
  std::vector<int32_t> context;
  size_t prefilled = 0;
  std::vector<int32_t> generated;
  std::unique_ptr<model::Sampler> sampler;
  std::unique_ptr<model::StreamingDecoder> decoder;
  std::unique_ptr<model::StopMatcher> stops;
  uint32_t max_new = 0;
  bool admitted = false;   // moved from the queue into the running set
  bool preempted = false;  // sent back to the queue once to free KV blocks
  bool done = false;
  std::vector<std::vector<std::vector<int>>> routing;  // [layer][token], when recording
  std::vector<std::vector<int>> last_experts;          // [layer]: its last token's experts
  int skipped = 0;                                     // steps in a row it was left out of
  uint64_t last_stepped = 0;
  uint64_t arrival = 0;
  RequestExpertStats expert_stats;
  std::chrono::steady_clock::time_point submitted;
  std::chrono::steady_clock::time_point last_token;
};

std::optional<StreamEvent> RequestHandle::Next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (!ready_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return std::nullopt;
  StreamEvent event = std::move(events_.front());
  events_.pop_front();
  return event;
}

void RequestHandle::Cancel() {
  std::lock_guard lock(mutex_);
  cancelled_ = true;
}

void RequestHandle::Push(StreamEvent event) {
  std::function<void()> listener;
  {
    std::lock_guard lock(mutex_);
    events_.push_back(std::move(event));
    listener = listener_;
  }
  ready_.notify_all();
  if (listener) listener();
}

void RequestHandle::SetListener(std::function<void()> listener) {
  std::function<void()> call_now;
  {
    std::lock_guard lock(mutex_);
    listener_ = std::move(listener);
    if (!events_.empty()) call_now = listener_;
  }
  if (call_now) call_now();
}

bool RequestHandle::cancelled() const {
  std::lock_guard lock(mutex_);
  return cancelled_;
}

Scheduler::Scheduler(std::shared_ptr<model::Model> model,
                     std::shared_ptr<const model::Tokenizer> tokenizer,
                     const SchedulerOptions& options)
    : model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      options_(options),
      sampling_pool_(
          options.sampling_threads > 0
              ? options.sampling_threads
              : std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8)) {
  const auto max_running =
      static_cast<uint64_t>(std::max(options_.max_batch, options_.max_running));
  const model::KvBlockPool* pool = model_->kv_pool();
  stats_.kv_cache_budget_bytes =
      pool != nullptr
          ? static_cast<uint64_t>(pool->total()) * pool->block_bytes()
          : max_running * model::KvCache::BytesFor(model_->config(),
                                                   model_->config().max_position_embeddings);
  engine_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    accepting_ = false;
  }
  work_.notify_all();
  engine_.join();
}

absl::StatusOr<std::shared_ptr<RequestHandle>> Scheduler::Submit(GenerationRequest request) {
  const model::ModelConfig& config = model_->config();
  const int64_t context = config.max_position_embeddings;
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", id, " is outside the vocabulary of ", config.vocab_size));
    }
  }
  if (absl::Status s =
          ValidateSamplingParams(request.sampling, static_cast<uint32_t>(config.vocab_size));
      !s.ok()) {
    return s;
  }
  if (!request.sampling.stop.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError(
        "stop strings need a tokenizer; this model serves token ids only");
  }
  const int64_t prompt = static_cast<int64_t>(request.prompt.size());
  int64_t max_new =
      request.sampling.max_tokens == 0 ? context - prompt : request.sampling.max_tokens;
  if (prompt + max_new > context || max_new <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("the prompt (", prompt, " tokens) plus max_tokens (",
                     request.sampling.max_tokens, ") exceeds the context of ", context, " tokens"));
  }
  if (const model::KvBlockPool* pool = model_->kv_pool(); pool != nullptr) {
    // The prompt and the first new token must fit the whole budget at least.
    const uint64_t needed = model::KvCache::BytesFor(config, prompt + 1);
    if (needed > static_cast<uint64_t>(pool->total()) * pool->block_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the prompt (", prompt, " tokens) needs ", needed,
          " bytes of KV cache, beyond the "
          "daemon's KV budget of ",
          static_cast<uint64_t>(pool->total()) * pool->block_bytes(), " bytes (--kv-cache-bytes)"));
    }
  }
  auto seq = std::make_shared<Sequence>();
  seq->max_new = static_cast<uint32_t>(max_new);
  seq->submitted = std::chrono::steady_clock::now();
  seq->handle = std::make_shared<RequestHandle>();
  seq->sampler =
      std::make_unique<model::Sampler>(request.sampling, request.prompt, request.default_seed);
  if (tokenizer_ != nullptr) {
    seq->decoder =
        std::make_unique<model::StreamingDecoder>(*tokenizer_, request.skip_special_tokens);
    seq->stops = std::make_unique<model::StopMatcher>(request.sampling.stop);
  }
  seq->request = std::move(request);
  seq->context = seq->request.prompt;
  std::shared_ptr<RequestHandle> handle = seq->handle;
  {
    std::lock_guard lock(mutex_);
    if (!accepting_)
      return absl::UnavailableError("the daemon is draining and accepts no new requests");
    // A request that the next step can admit does not count as queued.
    if (waiting_.size() + running_count_ >=
        static_cast<size_t>(options_.max_batch) + static_cast<size_t>(options_.max_queue)) {
      return absl::ResourceExhaustedError(absl::StrCat("the request queue is full (",
                                                       waiting_.size(), " waiting; --max-queue ",
                                                       options_.max_queue, ")"));
    }
    seq->arrival = next_arrival_++;
    // After every waiting request of the same or higher priority.
    auto position = std::find_if(waiting_.begin(), waiting_.end(), [&](const auto& other) {
      return other->request.priority < seq->request.priority;
    });
    waiting_.insert(position, std::move(seq));
    stats_.waiting = waiting_.size();
  }
  work_.notify_all();
  return handle;
}

void Scheduler::StopAccepting() {
  std::lock_guard lock(mutex_);
  accepting_ = false;
}

void Scheduler::CancelAll() {
  {
    std::lock_guard lock(mutex_);
    cancel_all_ = true;
  }
  work_.notify_all();
}

bool Scheduler::Idle() const {
  std::lock_guard lock(mutex_);
  return waiting_.empty() && running_count_ == 0;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void Scheduler::Finish(Sequence& seq, FinishReason reason, const absl::Status& error,
                       const std::string& matched_stop) {
  StreamEvent event;
  if (error.ok() && reason != FinishReason::kCancelled && matched_stop.empty() &&
      seq.decoder != nullptr) {
    // Whatever was held back: an incomplete character at the very end, a partial stop string.
    absl::StatusOr<std::string> rest = seq.decoder->Flush();
    if (rest.ok()) {
      model::StopMatcher::Result r = seq.stops->Add(*rest);
      event.text = r.emit + (r.matched ? "" : seq.stops->Flush());
    }
  }
  event.finish = error.ok() ? reason : FinishReason::kNone;
  event.matched_stop = matched_stop;
  // The stream's reader is another thread: it gets a status of its own (util/unshared_status.h).
  event.error = util::Unshared(error);
  event.prompt_tokens = static_cast<uint32_t>(seq.request.prompt.size());
  event.completion_tokens = static_cast<uint32_t>(seq.generated.size());
  event.expert_stats = seq.expert_stats;
  // A reader that has the last event finds the trace written and the counters settled.
  if (options_.on_routing && !seq.routing.empty()) {
    options_.on_routing(seq.request.id, static_cast<int>(seq.request.prompt.size()), seq.routing);
  }
  {
    std::lock_guard lock(mutex_);
    if (seq.admitted) {
      const uint64_t held = seq.cache != nullptr ? seq.cache->bytes() : 0;
      stats_.kv_cache_bytes -= std::min(stats_.kv_cache_bytes, held);
      if (stats_.running > 0) --stats_.running;
      if (running_count_ > 0) --running_count_;
    }
    (reason == FinishReason::kCancelled ? stats_.cancelled : stats_.completed) += 1;
  }
  if (options_.observer != nullptr) {
    FinishedRequest finished;
    finished.reason = event.finish;
    finished.error = event.error.code();
    finished.prompt_tokens = event.prompt_tokens;
    finished.generation_tokens = event.completion_tokens;
    finished.e2e_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - seq.submitted).count();
    options_.observer->OnFinished(finished);
  }
  seq.done = true;
  seq.cache.reset();
  seq.handle->Push(std::move(event));
}

void Scheduler::Loop() {
  std::vector<std::shared_ptr<Sequence>> running;
  std::vector<std::pair<std::shared_ptr<Sequence>, bool>> left_queue;  // bool: expired
  while (true) {
    {
      std::unique_lock lock(mutex_);
      work_.wait(lock,
                 [&] { return stopping_ || cancel_all_ || !waiting_.empty() || !running.empty(); });
      if (stopping_ || cancel_all_) {
        const bool stop = stopping_;
        cancel_all_ = false;
        std::deque<std::shared_ptr<Sequence>> waiting = std::move(waiting_);
        waiting_.clear();
        stats_.waiting = 0;
        lock.unlock();  // Finish takes the lock to settle the counters
        for (auto& seq : waiting) Finish(*seq, FinishReason::kCancelled, absl::OkStatus());
        for (auto& seq : running) Finish(*seq, FinishReason::kCancelled, absl::OkStatus());
        running.clear();
        if (stop) return;
        continue;
      }
      // A waiting request whose client went away or whose deadline passed leaves the queue
      // now, not when its turn comes: it would hold a queue place meanwhile.
      const auto swept_at = std::chrono::steady_clock::now();
      for (auto it = waiting_.begin(); it != waiting_.end();) {
        const Sequence& seq = **it;
        // A call cancelled because its deadline passed counts as a deadline.
        const bool expired = seq.request.deadline.has_value() && swept_at > *seq.request.deadline;
        if (expired || seq.handle->cancelled()) {
          left_queue.emplace_back(std::move(*it), expired);
          it = waiting_.erase(it);
        } else {
          ++it;
        }
      }
      const size_t max_running =
          static_cast<size_t>(std::max(options_.max_batch, options_.max_running));
      const auto admitted_at = std::chrono::steady_clock::now();
      const model::KvBlockPool* pool = model_->kv_pool();
      int64_t promised = 0;  // blocks the sequences admitted here will take for their prefix
      while (running.size() < max_running && !waiting_.empty()) {
        if (pool != nullptr) {
          // Admit by free KV blocks: what the prefix and its first new token take.
          const int64_t needed =
              (static_cast<int64_t>(waiting_.front()->context.size()) + model::kKvBlockSize) /
              model::kKvBlockSize;
          if (!running.empty() && pool->free() - promised < needed) break;
          promised += needed;
        }
        running.push_back(std::move(waiting_.front()));
        running.back()->admitted = true;
        waiting_.pop_front();
        if (options_.observer != nullptr && !running.back()->preempted) {
          options_.observer->OnAdmitted(
              std::chrono::duration<double>(admitted_at - running.back()->submitted).count());
        }
      }
      running_count_ = running.size();
      stats_.waiting = waiting_.size();
      stats_.running = running.size();
    }
    for (auto& [seq, expired] : left_queue) {
      if (expired) {
        Finish(*seq, FinishReason::kNone,
               absl::DeadlineExceededError("the request's deadline passed while it waited"));
      } else {
        Finish(*seq, FinishReason::kCancelled, absl::OkStatus());
      }
    }
    left_queue.clear();
    // Every admitted sequence, stepped this time or not, gives back its slot and KV cache as
    // soon as its client goes away or its deadline passes.
    const auto now = std::chrono::steady_clock::now();
    std::vector<std::shared_ptr<Sequence>> live;
    for (auto& seq : running) {
      // A call cancelled because its deadline passed counts as a deadline.
      if (seq->request.deadline.has_value() && now > *seq->request.deadline) {
        Finish(*seq, FinishReason::kNone,
               absl::DeadlineExceededError("the request's deadline passed"));
      } else if (seq->handle->cancelled()) {
        Finish(*seq, FinishReason::kCancelled, absl::OkStatus());
      } else {
        if (seq->cache == nullptr) {
          seq->cache =
              model_->NewKvCache(static_cast<int64_t>(seq->request.prompt.size()) + seq->max_new);
        }
        live.push_back(seq);
      }
    }
    std::vector<std::shared_ptr<Sequence>> step = SelectForStep(live);
    if (model_->kv_pool() != nullptr) FitKvBudget(running, step);
    Step(step);
    running.erase(std::remove_if(running.begin(), running.end(),
                                 [](const auto& s) { return s->done || !s->admitted; }),
                  running.end());
    uint64_t kv_bytes = 0;
    for (const auto& seq : running) kv_bytes += seq->cache->bytes();
    std::lock_guard lock(mutex_);
    ++stats_.steps;
    stats_.generated_tokens = generated_tokens_;
    stats_.running = running.size();
    stats_.kv_cache_bytes = kv_bytes;
    running_count_ = running.size();
  }
}

std::vector<std::shared_ptr<Scheduler::Sequence>> Scheduler::SelectForStep(
    const std::vector<std::shared_ptr<Sequence>>& running) {
  ++step_counter_;
  if (running.size() <= static_cast<size_t>(options_.max_batch)) {
    for (const auto& seq : running) seq->last_stepped = step_counter_;
    return running;
  }
  const bool aware = options_.expert_aware && options_.resident_experts;
  const int overdue_after = OverdueAfter(running.size(), static_cast<size_t>(options_.max_batch),
                                         options_.max_delay_steps);
  std::vector<StepCandidate> candidates;
  for (const auto& seq : running) {
    StepCandidate c;
    c.overdue = seq->skipped >= overdue_after;
    if (aware) c.predicted = seq->last_experts;
    c.last_stepped = seq->last_stepped;
    c.arrival = seq->arrival;
    candidates.push_back(std::move(c));
  }
  ResidentSet resident;
  if (aware) resident = options_.resident_experts();
  std::vector<size_t> chosen = ChooseForStep(candidates, static_cast<size_t>(options_.max_batch),
                                             aware ? &resident : nullptr);
  for (const auto& seq : running) ++seq->skipped;
  std::vector<std::shared_ptr<Sequence>> step;
  for (size_t i : chosen) {
    running[i]->skipped = 0;
    running[i]->last_stepped = step_counter_;
    step.push_back(running[i]);
  }
  return step;
}

void Scheduler::AttributeExpertUses(const std::vector<model::SequenceInput>& inputs,
                                    const std::vector<Sequence*>& owners,
                                    const model::ForwardOutput& out) {
  // Which inputs used each (layer, expert): any of their tokens chose it.
  absl::flat_hash_map<std::pair<int, int>, std::vector<size_t>> users;
  size_t begin = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const size_t end = begin + inputs[i].tokens.size();
    for (size_t layer = 0; layer < out.routing.size(); ++layer) {
      for (size_t t = begin; t < end && t < out.routing[layer].size(); ++t) {
        for (int e : out.routing[layer][t]) {
          std::vector<size_t>& list = users[{static_cast<int>(layer), e}];
          if (list.empty() || list.back() != i) list.push_back(i);
        }
      }
    }
    begin = end;
  }
  double waited = 0;
  for (const model::ExpertUse& use : out.expert_uses) {
    waited += use.served.wait_seconds;
    auto it = users.find({use.layer, use.expert});
    if (it == users.end()) continue;
    const std::vector<size_t>& list = it->second;
    const uint64_t share = use.served.bytes_staged / list.size();
    const uint64_t rest = use.served.bytes_staged % list.size();
    for (size_t n = 0; n < list.size(); ++n) {
      RequestExpertStats& stats = owners[list[n]]->expert_stats;
      switch (use.served.source) {
        case model::ExpertSource::kDevice:
          ++stats.device_hits;
          break;
        case model::ExpertSource::kHost:
          ++stats.host_hits;
          break;
        case model::ExpertSource::kDisk:
          ++stats.ssd_reads;
          break;
      }
      stats.bytes_staged += share + (n == 0 ? rest : 0);
      if (use.served.fallback) {
        ++stats.low_precision_fallbacks;
        ++(use.served.precision == model::Precision::kInt8 ? stats.fallbacks_int8
                                                           : stats.fallbacks_int4);
      }
      stats.prefetch_useful += use.served.prefetch == model::PrefetchOutcome::kUseful ? 1 : 0;
      stats.prefetch_late += use.served.prefetch == model::PrefetchOutcome::kLate ? 1 : 0;
    }
  }
  for (Sequence* seq : owners) seq->expert_stats.stall_seconds += waited;
  // The step's prefetch events are split among its requests, the remainder to the first.
  if (!owners.empty()) {
    const uint64_t n = owners.size();
    for (size_t i = 0; i < owners.size(); ++i) {
      RequestExpertStats& stats = owners[i]->expert_stats;
      stats.prefetch_issued += out.prefetches.issued / n + (i == 0 ? out.prefetches.issued % n : 0);
      stats.prefetch_wasted += out.prefetches.wasted / n + (i == 0 ? out.prefetches.wasted % n : 0);
    }
  }
}

std::vector<Scheduler::StepInput> Scheduler::PlanStep(
    const std::vector<std::shared_ptr<Sequence>>& step) const {
  // Decode tokens first (they bound the latency of running requests), then prefix chunks.
  std::vector<StepInput> plan;
  int budget = options_.max_tokens_per_step;
  for (const auto& seq : step) {
    if (seq->done || seq->prefilled < seq->context.size() || budget <= 0) continue;
    plan.push_back({seq.get(), 1, false});
    --budget;
  }
  for (const auto& seq : step) {
    if (seq->done || seq->prefilled >= seq->context.size() || budget <= 0) continue;
    size_t take =
        std::min<size_t>(seq->context.size() - seq->prefilled, static_cast<size_t>(budget));
    plan.push_back({seq.get(), take, true});
    budget -= static_cast<int>(take);
  }
  return plan;
}

void Scheduler::Preempt(Sequence& seq) {
  std::lock_guard lock(mutex_);
  const uint64_t held = seq.cache != nullptr ? seq.cache->bytes() : 0;
  stats_.kv_cache_bytes -= std::min(stats_.kv_cache_bytes, held);
  ++stats_.preemptions;
  seq.admitted = false;
  seq.preempted = true;
  seq.cache.reset();
  seq.context = seq.request.prompt;
  seq.context.insert(seq.context.end(), seq.generated.begin(), seq.generated.end());
  seq.prefilled = 0;
  seq.last_experts.clear();
  seq.routing.clear();  // the recompute records the prefix's routing again
  seq.skipped = 0;
  if (running_count_ > 0) --running_count_;
  if (stats_.running > 0) --stats_.running;
}

void Scheduler::FitKvBudget(std::vector<std::shared_ptr<Sequence>>& running,
                            std::vector<std::shared_ptr<Sequence>>& step) {
  const model::KvBlockPool& pool = *model_->kv_pool();
  while (true) {
    int64_t needed = 0;
    for (const StepInput& input : PlanStep(step)) {
      const model::KvCache& cache = *input.seq->cache;
      needed += std::max<int64_t>(
          0, cache.BlocksFor(cache.length() + static_cast<int64_t>(input.tokens)) -
                 cache.blocks_held());
    }
    if (needed <= pool.free()) return;
    // Free the newest sequence's blocks: it goes back to the queue and later recomputes its
    // prefix, as vLLM's recompute preemption does.
    std::shared_ptr<Sequence> victim;
    for (const auto& seq : running) {
      if (!seq->done && seq->admitted && (victim == nullptr || seq->arrival > victim->arrival))
        victim = seq;
    }
    if (victim == nullptr) return;
    step.erase(std::remove(step.begin(), step.end(), victim), step.end());
    const bool alone = std::count_if(running.begin(), running.end(),
                                     [](const auto& s) { return !s->done && s->admitted; }) == 1;
    if (alone) {
      // Nothing else to free: the sequence has outgrown the whole budget.
      Finish(*victim, FinishReason::kNone,
             absl::ResourceExhaustedError(absl::StrCat(
                 "the KV cache budget (", static_cast<uint64_t>(pool.total()) * pool.block_bytes(),
                 " bytes, --kv-cache-bytes) cannot hold this sequence's ",
                 victim->cache->length() + 1, " tokens")));
      return;
    }
    Preempt(*victim);
    std::lock_guard lock(mutex_);
    waiting_.push_front(victim);  // first in line: older than everything waiting behind it
    stats_.waiting = waiting_.size();
  }
}

void Scheduler::Step(std::vector<std::shared_ptr<Sequence>>& running) {
  std::vector<model::SequenceInput> inputs;
  std::vector<Sequence*> owners;
  std::vector<size_t> chunk;
  for (const StepInput& input : PlanStep(running)) {
    Sequence& seq = *input.seq;
    if (!input.prefix) {
      inputs.push_back(
          {seq.cache.get(), {seq.generated.back()}, false, seq.request.loosest_precision});
      chunk.push_back(0);
    } else {
      std::vector<int32_t> tokens(
          seq.context.begin() + static_cast<int64_t>(seq.prefilled),
          seq.context.begin() + static_cast<int64_t>(seq.prefilled + input.tokens));
      inputs.push_back({seq.cache.get(), std::move(tokens), false, seq.request.loosest_precision});
      chunk.push_back(input.tokens);
    }
    owners.push_back(&seq);
  }
  if (inputs.empty()) return;
  absl::StatusOr<model::ForwardOutput> out = model_->Forward(absl::MakeSpan(inputs));
  if (!out.ok() && inputs.size() > 1) {
    // A fault (an expert that cannot be read, a KV block that cannot be had) fails only the
    // sequences it touches: each runs the step alone, and the batch-invariant kernels make
    // every solo result exactly what the batch would have computed for it.
    model::ForwardOutput merged;
    merged.routing.assign(static_cast<size_t>(model_->config().num_layers), {});
    std::vector<model::SequenceInput> kept_inputs;
    std::vector<Sequence*> kept_owners;
    std::vector<size_t> kept_chunk;
    for (size_t i = 0; i < inputs.size(); ++i) {
      absl::StatusOr<model::ForwardOutput> solo = model_->Forward(absl::MakeSpan(&inputs[i], 1));
      if (!solo.ok()) {
        Finish(*owners[i], FinishReason::kNone, solo.status());
        continue;
      }
      merged.logits.insert(merged.logits.end(), solo->logits.begin(), solo->logits.end());
      merged.rows += solo->rows;
      for (size_t layer = 0; layer < merged.routing.size(); ++layer) {
        for (auto& token : solo->routing[layer]) merged.routing[layer].push_back(std::move(token));
      }
      merged.expert_uses.insert(merged.expert_uses.end(), solo->expert_uses.begin(),
                                solo->expert_uses.end());
      kept_inputs.push_back(std::move(inputs[i]));
      kept_owners.push_back(owners[i]);
      kept_chunk.push_back(chunk[i]);
    }
    inputs = std::move(kept_inputs);
    owners = std::move(kept_owners);
    chunk = std::move(kept_chunk);
    if (inputs.empty()) return;
    out = std::move(merged);
  }
  if (!out.ok()) {
    for (Sequence* seq : owners) Finish(*seq, FinishReason::kNone, out.status());
    return;
  }
  AttributeExpertUses(inputs, owners, *out);
  const auto step_done = std::chrono::steady_clock::now();
  if (options_.observer != nullptr) {
    uint64_t prompt_tokens = 0, sampled = 0;
    for (size_t i = 0; i < owners.size(); ++i) {
      prompt_tokens += chunk[i];
      if (owners[i]->prefilled + chunk[i] >= owners[i]->context.size()) ++sampled;
    }
    options_.observer->OnStepTokens(prompt_tokens, sampled);
  }
  const model::ModelConfig& config = model_->config();
  const int64_t vocab = config.vocab_size;
  {
    // Each sequence's last token's experts, for expert-aware selection of the next step.
    size_t end = 0;
    for (size_t i = 0; i < owners.size(); ++i) {
      end += inputs[i].tokens.size();
      std::vector<std::vector<int>>& last = owners[i]->last_experts;
      last.assign(out->routing.size(), {});
      for (size_t layer = 0; layer < out->routing.size(); ++layer)
        last[layer] = out->routing[layer][end - 1];
    }
  }
  if (options_.on_routing) {
    size_t token = 0;
    for (size_t i = 0; i < owners.size(); ++i) {
      Sequence& seq = *owners[i];
      seq.routing.resize(out->routing.size());
      for (size_t t = 0; t < inputs[i].tokens.size(); ++t, ++token) {
        for (size_t layer = 0; layer < out->routing.size(); ++layer) {
          seq.routing[layer].push_back(out->routing[layer][token]);
        }
      }
    }
  }
  // The sequences whose prefix is all in sample a token, each from its own row with its own
  // sampler: in parallel (a sequence sampling alone splits its vocabulary over the threads),
  // then in order for everything else.
  std::vector<size_t> sampling;
  for (size_t i = 0; i < owners.size(); ++i) {
    owners[i]->prefilled += chunk[i];
    if (owners[i]->prefilled >= owners[i]->context.size()) sampling.push_back(i);
  }
  std::vector<model::TokenChoice> choices(owners.size());
  auto row = [&](size_t i) {
    return absl::MakeConstSpan(out->logits.data() + static_cast<int64_t>(i) * vocab, vocab);
  };
  if (sampling.size() == 1 && sampling_pool_.threads() > 1) {
    const size_t i = sampling.front();
    choices[i] = owners[i]->sampler->Next(
        row(i), sampling_pool_.threads(), [&](int parts, absl::FunctionRef<void(int)> body) {
          sampling_pool_.ParallelFor(static_cast<size_t>(parts),
                                     [&](size_t part) { body(static_cast<int>(part)); });
        });
  } else {
    sampling_pool_.ParallelFor(sampling.size(), [&](size_t j) {
      const size_t i = sampling[j];
      choices[i] = owners[i]->sampler->Next(row(i));
    });
  }
  for (size_t i = 0; i < owners.size(); ++i) {
    Sequence& seq = *owners[i];
    if (seq.prefilled < seq.context.size()) continue;  // more prefix to go
    model::TokenChoice& choice = choices[i];
    if (options_.observer != nullptr) {
      const std::chrono::steady_clock::time_point since =
          seq.generated.empty() ? seq.submitted : seq.last_token;
      const double seconds = std::chrono::duration<double>(step_done - since).count();
      if (seq.generated.empty()) {
        options_.observer->OnFirstToken(seconds);
      } else {
        options_.observer->OnInterToken(seconds);
      }
    }
    seq.last_token = step_done;
    seq.generated.push_back(choice.token);
    ++generated_tokens_;
    const model::SamplingParams& sp = seq.request.sampling;
    bool eos = !sp.ignore_eos && std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(),
                                           choice.token) != config.eos_token_ids.end();
    bool stop_id = std::find(sp.stop_token_ids.begin(), sp.stop_token_ids.end(),
                             static_cast<uint32_t>(choice.token)) != sp.stop_token_ids.end();
    StreamEvent event;
    event.token_ids = {choice.token};
    event.choices = {choice};
    // Ids past the tokenizer's vocabulary (checkpoints pad vocab_size) have no text.
    bool has_text = tokenizer_ != nullptr && choice.token < tokenizer_->vocab_size();
    if (seq.decoder != nullptr && has_text && !eos && !stop_id) {
      absl::StatusOr<std::string> delta = seq.decoder->Add(choice.token);
      if (!delta.ok()) {
        Finish(seq, FinishReason::kNone, delta.status());
        continue;
      }
      model::StopMatcher::Result r = seq.stops->Add(*delta);
      event.text = std::move(r.emit);
      if (r.matched.has_value()) {
        event.matched_stop = *r.matched;
        event.finish = FinishReason::kStop;
      }
    }
    if (eos || stop_id) {
      event.finish = FinishReason::kStop;
      if (stop_id) event.matched_stop = absl::StrCat(choice.token);
    }
    bool length = event.finish == FinishReason::kNone && seq.generated.size() >= seq.max_new;
    if (event.finish != FinishReason::kNone || length) {
      // The last message carries the finish reason and usage; send this token's text first.
      FinishReason reason = length ? FinishReason::kLength : event.finish;
      std::string matched = event.matched_stop;
      event.finish = FinishReason::kNone;
      seq.handle->Push(std::move(event));
      Finish(seq, reason, absl::OkStatus(), matched);
      continue;
    }
    seq.handle->Push(std::move(event));
  }
}

}  // namespace moed::scheduler
