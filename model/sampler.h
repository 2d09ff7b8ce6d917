// Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, seeded
// sampling; and stop-string matching on the decoded text.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/types/span.h"

namespace moed::model {

struct SamplingParams {
  uint32_t max_tokens = 0;   // 0: up to the end of the context
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;
  uint32_t top_k = 0;  // 0: off
  float min_p = 0.0f;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::vector<uint32_t> stop_token_ids;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  bool ignore_eos = false;
  bool logprobs = false;
  uint32_t top_logprobs = 0;
};

struct TokenChoice {
  int32_t token = 0;
  // With params.logprobs: the log-probability of `token` under the penalised distribution
  // before temperature and truncation (the model's own view, as OpenAI reports it), and the
  // top_logprobs most likely tokens' (most likely first). 0 and empty otherwise.
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top_logprobs;
};

struct SamplerOptions {
  // Draw through the fast path (weights on SIMD lanes, mass by logit buckets, no sort) when it
  // can show that its token is the exact path's; off, every draw takes the exact path.
  bool fast_path = true;
  // Scales the margin by which the fast path's decisions must clear the rounding of either
  // path; tests raise it to send every draw on to the exact path.
  double margin_scale = 1.0;
  // The fast path on the widest SIMD the CPU has (AVX-512 or AVX2); off, on SSE2's two lanes.
  bool widest_simd = true;
};

class Sampler {
 public:
  // `prompt` feeds the repetition penalty; `default_seed` is used when params.seed is unset.
  Sampler(const SamplingParams& params, const std::vector<int32_t>& prompt, uint64_t default_seed,
          SamplerOptions options = {});

  // Picks the next token and remembers it for the penalties.
  TokenChoice Next(absl::Span<const float> logits);

  // Runs body(part) once for every part < parts, on as many threads as it has, and returns
  // when every call has returned.
  using PartRunner = absl::FunctionRef<void(int parts, absl::FunctionRef<void(int part)> body)>;
  // The same token as Next(logits), with the passes over the vocabulary (candidates, their
  // order, their weights) split into `parts` that `run` may run at once: for a sequence that
  // samples alone while other threads are idle.
  TokenChoice Next(absl::Span<const float> logits, int parts, PartRunner run);

  // Which path drew the sampled (not greedy) tokens so far.
  struct Counters {
    uint64_t fast_draws = 0;
    uint64_t exact_draws = 0;
  };
  const Counters& counters() const { return counters_; }

 private:
  // Both draw from logits_ (penalised), `best` being its argmax, with `canonical` in [0, 1)
  // the generator's number for this token. The exact path sorts the candidates and sums their
  // weights in that order, one after another; its tokens are the reference. The fast path
  // returns nullopt where rounding could make its answer differ.
  int32_t ExactDraw(int32_t best, double canonical, int parts, PartRunner run);
  std::optional<int32_t> FastDraw(int32_t best, float lowest, double canonical, int parts,
                                  PartRunner run);

  SamplingParams params_;
  SamplerOptions options_;
  Counters counters_;
  std::mt19937_64 rng_;
  // Kept from token to token: a step allocates nothing once they have grown.
  std::vector<float> logits_;
  std::vector<uint64_t> keys_;
  std::vector<std::vector<uint64_t>> part_keys_, part_scratch_;  // one of each per part
  std::vector<uint64_t> pivots_, pivot_cuts_;  // where the parts' ranges of keys begin
  std::vector<double> probabilities_, running_sums_;
  std::vector<uint16_t> buckets_;    // the fast path's logit bucket of every token
  std::vector<double> bucket_mass_;  // per part and lane, the weight in each bucket
  struct PartSums {
    double kept_by_min_p = 0;  // the weight min-p surely keeps
    bool unsure = false;       // a candidate too near min-p's cut to tell
  };
  std::vector<PartSums> part_sums_;  // the fast path's, per part
  std::vector<uint64_t> members_;    // one bucket's candidates
  absl::flat_hash_map<int32_t, int> output_counts_;
  absl::flat_hash_map<int32_t, bool> seen_;  // prompt and output, for repetition_penalty
};

// e^x for x in [-80, 0] within 2^-50 of it, relative: the fast path's weights, computed as its
// pass computes them on SSE2's two lanes or (widest) on the widest lanes the CPU has. Exposed
// for its test.
double ApproxExp(double x, bool widest);

// Watches generated text for stop strings. Text that might be the start of a stop string is
// held back until it is clear.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}

  struct Result {
    std::string emit;                    // text that is safe to send
    std::optional<std::string> matched;  // the stop string found; generation ends
  };
  Result Add(const std::string& delta);
  // At the end of generation, whatever was held back.
  std::string Flush();

 private:
  std::vector<std::string> stops_;
  std::string pending_;
};

}  // namespace moed::model
