#include "model/sampler.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace moed::model {

Sampler::Sampler(const SamplingParams& params, const std::vector<int32_t>& prompt,
                 uint64_t default_seed, SamplerOptions options)
    : params_(params), options_(options), rng_(params.seed.value_or(default_seed)) {
  for (int32_t token : prompt) seen_[token] = true;
}

namespace {

// A token's place in the sampling order as one integer: ascending keys are descending logits,
// ties to the lower id. -0 and +0 key alike, as they compare equal.
uint64_t OrderKey(float logit, int32_t token) {
  uint32_t bits;
  const float value = logit == 0.0f ? 0.0f : logit;
  std::memcpy(&bits, &value, sizeof bits);
  // Floats as unsigned integers that sort as the floats do, then inverted: larger first.
  const uint32_t ascending = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(token);
}

int32_t TokenOf(uint64_t key) { return static_cast<int32_t>(key & 0xFFFFFFFFu); }

// Sorts keys ascending by their upper 32 bits (the logit part), stably: keys that arrive in
// token order leave with ties still in token order, as OrderKey orders them. Three passes of
// 11 bits, least significant first, skipping digits every key shares.
void RadixSortByLogit(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch) {
  constexpr int kDigitBits = 11;
  constexpr size_t kBuckets = size_t{1} << kDigitBits;
  scratch.resize(keys.size());
  uint64_t all_or = 0, all_and = ~uint64_t{0};
  for (uint64_t k : keys) {
    all_or |= k;
    all_and &= k;
  }
  std::array<uint32_t, kBuckets + 1> count;  // on the stack: a token allocates nothing
  for (int shift = 32; shift < 64; shift += kDigitBits) {
    const uint64_t mask = kBuckets - 1;
    if ((((all_or ^ all_and) >> shift) & mask) == 0) continue;  // one value in this digit
    std::fill(count.begin(), count.end(), 0);
    for (uint64_t k : keys) ++count[((k >> shift) & mask) + 1];
    for (size_t b = 0; b < kBuckets; ++b) count[b + 1] += count[b];
    for (uint64_t k : keys) scratch[count[(k >> shift) & mask]++] = k;
    keys.swap(scratch);
  }
}

// Whether token a comes before token b in sampling order: the higher logit first, ties to
// the lower id.
bool Before(const std::vector<float>& logits, int32_t a, int32_t b) {
  return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
}

struct Extremes {
  int32_t best;  // the most likely token, ties to the lower id
  float lowest;  // the smallest logit
};

// Running maxima and minima on two SSE2 registers' lanes, then the first position of the
// largest value.
Extremes FindExtremes(const std::vector<float>& logits) {
  using Floats = float __attribute__((vector_size(16)));
  const size_t n = logits.size();
  Floats high[2], low[2];
  high[0] = high[1] = low[0] = low[1] = Floats{} + logits[0];
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 2; ++k) {
      Floats block;
      std::memcpy(&block, &logits[i + 4 * static_cast<size_t>(k)], sizeof block);
      high[k] = block > high[k] ? block : high[k];
      low[k] = block < low[k] ? block : low[k];
    }
  }
  float top = logits[0], bottom = logits[0];
  for (int k = 0; k < 2; ++k) {
    for (int j = 0; j < 4; ++j) {
      top = high[k][j] > top ? high[k][j] : top;
      bottom = low[k][j] < bottom ? low[k][j] : bottom;
    }
  }
  for (; i < n; ++i) {
    top = logits[i] > top ? logits[i] : top;
    bottom = logits[i] < bottom ? logits[i] : bottom;
  }
  const auto best = std::find(logits.begin(), logits.end(), top) - logits.begin();
  return {static_cast<int32_t>(best), bottom};
}

// N doubles, their bits and N floats, in GCC's vector extension: lowered to
// SSE2 (which every x86-64 has) for 2, and to AVX2 or AVX-512 for 4 and 8 inside functions
// built for those (chosen at run time).
template <int N>
struct Simd {
  // (typedef, not using: GCC keeps a dependent vector_size only on a typedef.)
  typedef double Doubles __attribute__((vector_size(8 * N)));
  typedef uint64_t Bits __attribute__((vector_size(8 * N)));
  typedef float Floats __attribute__((vector_size(4 * N)));
};

// e^x in place: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^13 (the
// remainder is below 2^-57), 2^n written into the exponent. Lanes below -80 are taken at -80;
// NaN lanes give garbage that callers mask out. (By reference: vectors wider than the
// baseline's registers must not cross a function's boundary by value.)
template <int N>
[[gnu::always_inline]] inline void ApproxExpInPlace(typename Simd<N>::Doubles& x) {
  using Doubles = typename Simd<N>::Doubles;
  using Bits = typename Simd<N>::Bits;
  constexpr double kRoundingShift = 0x1.8p52;      // adding it rounds to an integer in the low bits
  constexpr double kLn2Hi = 0x1.62e42fee00000p-1;  // n * kLn2Hi is exact for |n| < 2^21
  constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
  const Doubles low = Doubles{} - 80.0;
  x = x < low ? low : x;
  const Doubles shifted = x * 0x1.71547652b82fep0 + kRoundingShift;
  const Doubles n = shifted - kRoundingShift;
  const Doubles r = (x - n * kLn2Hi) - n * kLn2Lo;
  // 1/k! for k = 13 down to 0, by Horner's rule.
  Doubles series = r * (1.0 / 6227020800.0) + 1.0 / 479001600.0;
  series = series * r + 1.0 / 39916800.0;
  series = series * r + 1.0 / 3628800.0;
  series = series * r + 1.0 / 362880.0;
  series = series * r + 1.0 / 40320.0;
  series = series * r + 1.0 / 5040.0;
  series = series * r + 1.0 / 720.0;
  series = series * r + 1.0 / 120.0;
  series = series * r + 1.0 / 24.0;
  series = series * r + 1.0 / 6.0;
  series = series * r + 0.5;
  series = series * r + 1.0;
  series = series * r + 1.0;
  const Bits exponent =
      (__builtin_bit_cast(Bits, shifted) - __builtin_bit_cast(uint64_t, kRoundingShift) + 1023)
      << 52;
  x = series * __builtin_bit_cast(Doubles, exponent);
}

constexpr int kBuckets = 1024;  // the fast path's buckets of logits

// The fast path's pass over tokens [begin, end): each candidate's weight e^x, x = (l - top)/T,
// added to its bucket's mass (mass[row * (kBuckets + 1) + bucket], one row per lane, so that
// neighbouring tokens never wait on each other's sum), its bucket written to buckets[t]
// (kBuckets for a token that is no candidate). With min-p, the weight of the candidates it
// surely keeps is summed, and `unsure` set if any candidate is too close to its cut to tell.
struct WeighJob {
  const float* logits;
  int64_t begin, end;
  double top, inverse_temperature, floor, scale;
  bool min_p;
  double log_min_p, min_p_unsure;
  uint16_t* buckets;
  double* mass;
  double kept_mass = 0;
  bool unsure = false;
};

// The weights and buckets of N tokens' logits, into weights[0, N) and indices[0, N). (Not a lambda:
// a lambda's body would not be built for the enclosing function's instruction set.)
template <int N>
[[gnu::always_inline]] inline void WeighLanes(const WeighJob& job,
                                              const typename Simd<N>::Floats& raw, double* weights,
                                              uint64_t* indices,
                                              typename Simd<N>::Doubles& kept_mass,
                                              typename Simd<N>::Doubles& unsure) {
  using Doubles = typename Simd<N>::Doubles;
  // Scalars as whole vectors, and every compare inside the select that uses it: a compare
  // kept as a mask, or against a bare scalar, is split into one per lane.
  const Doubles zero = {};
  const Doubles floor = zero + job.floor;
  const Doubles l = __builtin_convertvector(raw, Doubles);
  const Doubles x = (l - job.top) * job.inverse_temperature;
  Doubles w = x;
  ApproxExpInPlace<N>(w);
  w = l < floor ? zero : w;  // a NaN logit weighs NaN, and the total sends the draw on
  // The bucket, clamped and masked while still a double (cheaper than 64-bit integer compares,
  // which SSE2 lacks), then rounded into the low bits.
  const Doubles last = zero + (kBuckets - 1);
  Doubles position = (job.top - l) * job.scale;
  position = position < last ? position : last;
  position = l < floor ? last + 1 : position;
  const typename Simd<N>::Bits index =
      __builtin_bit_cast(typename Simd<N>::Bits, position + 0x1.8p52) -
      __builtin_bit_cast(uint64_t, 0x1.8p52);
  if (job.min_p) {
    // A candidate's weight is at least e^-80 > 0, anything else's 0: w itself says which.
    const Doubles keep_from = zero + (job.log_min_p + job.min_p_unsure);
    const Doubles cut_below = zero + (job.log_min_p - job.min_p_unsure);
    // (Each compare feeds one select: GCC splits a compare that feeds two into one per lane.)
    const Doubles below_keep = x < keep_from ? w : zero;
    kept_mass += w - below_keep;                  // exactly w or 0
    unsure += cut_below < x ? below_keep : zero;  // nonzero: a candidate too near the cut
  }
  std::memcpy(weights, &w, sizeof w);
  std::memcpy(indices, &index, sizeof index);
}

// Blocks of tokens in two loops: the lanes' arithmetic, whose iterations are independent and
// overlap, then the adds into the buckets one token at a time (a scatter that adds cannot run
// on lanes). In one loop, each token's add waited on its exp.
template <int N>
[[gnu::always_inline]] inline void WeighTokens(WeighJob& job) {
  constexpr int kBlock = 256;
  alignas(64) double weights[kBlock];
  alignas(64) uint64_t indices[kBlock];
  typename Simd<N>::Doubles kept_mass = {}, unsure = {};
  for (int64_t start = job.begin; start < job.end; start += kBlock) {
    const int count = static_cast<int>(std::min<int64_t>(kBlock, job.end - start));
    int whole = 0;
    for (; whole + N <= count; whole += N) {
      typename Simd<N>::Floats raw;
      std::memcpy(&raw, job.logits + start + whole, sizeof raw);
      WeighLanes<N>(job, raw, weights + whole, indices + whole, kept_mass, unsure);
    }
    if (whole < count) {  // the last few tokens, the other lanes no candidates
      typename Simd<N>::Floats raw;
      for (int j = 0; j < N; ++j) raw[j] = -INFINITY;
      std::memcpy(&raw, job.logits + start + whole,
                  sizeof(float) * static_cast<size_t>(count - whole));
      WeighLanes<N>(job, raw, weights + whole, indices + whole, kept_mass, unsure);
    }
    uint16_t* buckets = job.buckets + start;
    int i = 0;
    for (; i + N <= count; i += N) {
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) {
        buckets[i + j] = static_cast<uint16_t>(indices[i + j]);
        job.mass[static_cast<size_t>(j) * (kBuckets + 1) + indices[i + j]] += weights[i + j];
      }
    }
    for (int j = 0; i < count; ++i, ++j) {
      buckets[i] = static_cast<uint16_t>(indices[i]);
      job.mass[static_cast<size_t>(j) * (kBuckets + 1) + indices[i]] += weights[i];
    }
  }
  for (int j = 0; j < N; ++j) {
    job.kept_mass += kept_mass[j];
    job.unsure = job.unsure || unsure[j] != 0.0;
  }
}

void WeighTokensSse2(WeighJob& job) { WeighTokens<2>(job); }
#if defined(__x86_64__)
[[gnu::target("avx2")]] void WeighTokensAvx2(WeighJob& job) { WeighTokens<4>(job); }
[[gnu::target("avx512f,avx512dq")]] void WeighTokensAvx512(WeighJob& job) { WeighTokens<8>(job); }
#endif

// The widest lanes this CPU runs (2 when `widest` is off, or off x86-64) and the pass built for
// them.
std::pair<int, void (*)(WeighJob&)> WeighFor([[maybe_unused]] bool widest) {
#if defined(__x86_64__)
  if (widest && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) {
    return {8, WeighTokensAvx512};
  }
  if (widest && __builtin_cpu_supports("avx2")) return {4, WeighTokensAvx2};
#endif
  return {2, WeighTokensSse2};
}

double ApproxExp1(double x) {
  Simd<2>::Doubles lanes = Simd<2>::Doubles{} + x;
  ApproxExpInPlace<2>(lanes);
  return lanes[0];
}

#if defined(__x86_64__)
// The same on wider lanes. AVX-512 brings fused multiply-adds, which the compiler uses: not
// always the same bits as on two lanes, so the test checks each width.
[[gnu::target("avx2")]] double ApproxExp4(double x) {
  Simd<4>::Doubles lanes = Simd<4>::Doubles{} + x;
  ApproxExpInPlace<4>(lanes);
  return lanes[0];
}
[[gnu::target("avx512f,avx512dq")]] double ApproxExp8(double x) {
  Simd<8>::Doubles lanes = Simd<8>::Doubles{} + x;
  ApproxExpInPlace<8>(lanes);
  return lanes[0];
}
#endif

}  // namespace

TokenChoice Sampler::Next(absl::Span<const float> raw) {
  return Next(raw, 1, [](int parts, absl::FunctionRef<void(int)> body) {
    for (int part = 0; part < parts; ++part) body(part);
  });
}

TokenChoice Sampler::Next(absl::Span<const float> raw, int parts, PartRunner run) {
  parts = std::max(parts, 1);
  const int64_t vocab = static_cast<int64_t>(raw.size());
  std::vector<float>& logits = logits_;
  logits.assign(raw.begin(), raw.end());
  // Repetition penalty (multiplicative, over prompt and output), then the OpenAI penalties
  // (additive, over the output).
  if (params_.repetition_penalty != 1.0f) {
    for (const auto& [token, unused] : seen_) {
      float& l = logits[token];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
  }
  for (const auto& [token, count] : output_counts_) {
    logits[token] -=
        params_.presence_penalty + params_.frequency_penalty * static_cast<float>(count);
  }
  const Extremes extremes = FindExtremes(logits);
  const int32_t best = extremes.best;

  TokenChoice choice;
  if (params_.temperature == 0.0f || params_.top_k == 1) {
    choice.token = best;
  } else {
    // The one number this token takes from the generator, drawn before either path runs so
    // that the exact path, when the fast one cannot vouch for its answer, draws with it too.
    const double canonical =
        std::generate_canonical<double, std::numeric_limits<double>::digits>(rng_);
    std::optional<int32_t> fast;
    if (params_.top_k == 0 && options_.fast_path)
      fast = FastDraw(best, extremes.lowest, canonical, parts, run);
    if (fast.has_value()) {
      choice.token = *fast;
      ++counters_.fast_draws;
    } else {
      choice.token = ExactDraw(best, canonical, parts, run);
      ++counters_.exact_draws;
    }
  }
  if (params_.logprobs) {
    // Log-probabilities of the penalised distribution.
    const float max_logit = logits[best];
    double total = 0;
    for (float l : logits) total += std::exp(static_cast<double>(l - max_logit));
    const double log_total = std::log(total) + max_logit;
    auto logprob_of = [&](int32_t token) { return static_cast<float>(logits[token] - log_total); };
    choice.logprob = logprob_of(choice.token);
    if (params_.top_logprobs > 0) {
      std::vector<int32_t> top(static_cast<size_t>(vocab));
      std::iota(top.begin(), top.end(), 0);
      size_t n = std::min<size_t>(top.size(), params_.top_logprobs);
      std::partial_sort(top.begin(), top.begin() + static_cast<int64_t>(n), top.end(),
                        [&](int32_t a, int32_t b) { return Before(logits, a, b); });
      for (size_t i = 0; i < n; ++i) choice.top_logprobs.emplace_back(top[i], logprob_of(top[i]));
    }
  }
  ++output_counts_[choice.token];
  seen_[choice.token] = true;
  return choice;
}

double ApproxExp(double x, [[maybe_unused]] bool widest) {
#if defined(__x86_64__)
  switch (WeighFor(widest).first) {
    case 8:
      return ApproxExp8(x);
    case 4:
      return ApproxExp4(x);
    default:
      break;
  }
#endif
  return ApproxExp1(x);
}

// Without top-k, the exact path's token is the first candidate (in sampling order) whose
// running sum of normalised weights exceeds u = canonical * kept, where kept is that sum up to
// top-p's and min-p's cut. Every such sum here, taken in another order from weights within
// 2^-45 of the exact path's, lies within `margin` of the exact path's (error bounds of
// recursive summation, both paths against the true sums). So where each decision clears the
// margin, it is the exact path's decision; where one does not, the exact path decides (a few
// draws in a million on a flat 32,000-token vocabulary). The order is needed only inside
// one bucket of logits: the mass of the buckets before it is a sum of per-bucket sums.
std::optional<int32_t> Sampler::FastDraw(int32_t best, float lowest, double canonical, int parts,
                                         PartRunner run) {
  const std::vector<float>& logits = logits_;
  const int64_t vocab = static_cast<int64_t>(logits.size());
  const double top = logits[best];
  if (!std::isfinite(top)) return std::nullopt;
  // The candidates are the exact path's: e^-42 < 2^-60 adds nothing to its sums.
  const float floor = logits[best] - 42.0f * params_.temperature;
  const double inverse_temperature = 1.0 / static_cast<double>(params_.temperature);
  // Buckets split [max(lowest candidate), top] evenly; a higher logit never lands in a later
  // bucket (every step of the index is monotonic), so bucket order is sampling order.
  const double span = top - std::max(static_cast<double>(floor), static_cast<double>(lowest));
  const double scale = span > 0 ? (kBuckets - 1) / span : 0.0;
  const bool min_p = params_.min_p > 0;
  const double log_min_p = min_p ? std::log(static_cast<double>(params_.min_p)) : 0.0;
  constexpr double kMinPUnsure = 0x1p-40;  // in x = (l - top) / T; both paths' x and e^x agree
                                           // to far better than this
  const double margin =
      options_.margin_scale *
      ((8.0 * static_cast<double>(vocab + kBuckets) + 1024.0) * 0x1p-53 + 0x1p-40);

  const std::pair<int, void (*)(WeighJob&)> pass = WeighFor(options_.widest_simd);
  const int lanes = pass.first;
  void (*const weigh)(WeighJob&) = pass.second;
  const size_t part_stride = static_cast<size_t>(lanes) * (kBuckets + 1);
  // Padded to whole blocks of eight with no bucket, for the search by blocks below.
  buckets_.resize(static_cast<size_t>((vocab + 7) / 8 * 8));
  std::fill(buckets_.begin() + vocab, buckets_.end(), uint16_t{kBuckets});
  bucket_mass_.assign(static_cast<size_t>(parts) * part_stride, 0.0);
  part_sums_.assign(static_cast<size_t>(parts), PartSums{});
  run(parts, [&](int part) {
    WeighJob job{.logits = logits.data(),
                 .begin = vocab * part / parts,
                 .end = vocab * (part + 1) / parts,
                 .top = top,
                 .inverse_temperature = inverse_temperature,
                 .floor = floor,
                 .scale = scale,
                 .min_p = min_p,
                 .log_min_p = log_min_p,
                 .min_p_unsure = kMinPUnsure,
                 .buckets = buckets_.data(),
                 .mass = bucket_mass_.data() + static_cast<size_t>(part) * part_stride};
    weigh(job);
    part_sums_[static_cast<size_t>(part)] = {job.kept_mass, job.unsure};
  });

  std::array<double, kBuckets> bucket_mass{};
  double total = 0, kept_by_min_p = 0;
  for (int part = 0; part < parts; ++part) {
    const double* mass = bucket_mass_.data() + static_cast<size_t>(part) * part_stride;
    for (int lane = 0; lane < lanes; ++lane) {
      for (int b = 0; b < kBuckets; ++b) {
        bucket_mass[static_cast<size_t>(b)] += mass[static_cast<size_t>(lane) * (kBuckets + 1) + b];
      }
    }
    kept_by_min_p += part_sums_[static_cast<size_t>(part)].kept_by_min_p;
    if (part_sums_[static_cast<size_t>(part)].unsure) return std::nullopt;
  }
  for (double m : bucket_mass) total += m;
  if (!(total > 0) || !std::isfinite(total)) return std::nullopt;
  const double inverse_total = 1.0 / total;

  // The first candidate whose running normalised mass exceeds `target`, with that running
  // mass; nullopt where the mass before it or through it is within the margin of target.
  struct Crossing {
    uint64_t key;
    double through;
  };
  auto cross = [&](double target) -> std::optional<Crossing> {
    double before = 0;
    bool first = true;  // no candidate precedes: nothing below to clear
    int b = 0;
    for (; b < kBuckets; ++b) {
      const double m = bucket_mass[static_cast<size_t>(b)];
      if ((before + m) * inverse_total > target) break;
      before += m;
      first = first && m == 0;
    }
    if (b == kBuckets) return std::nullopt;
    std::vector<uint64_t>& members = members_;
    members.clear();
    // Eight buckets to a compare: most blocks hold no member.
    using Block = uint16_t __attribute__((vector_size(16)));
    using Halves = uint64_t __attribute__((vector_size(16)));
    for (int64_t t = 0; t < vocab; t += 8) {
      Block block;
      std::memcpy(&block, &buckets_[static_cast<size_t>(t)], sizeof block);
      const Halves hits = reinterpret_cast<Halves>(block == static_cast<uint16_t>(b));
      if ((hits[0] | hits[1]) == 0) continue;
      for (int64_t i = t; i < std::min(t + 8, vocab); ++i) {
        if (buckets_[static_cast<size_t>(i)] == b) {
          members.push_back(OrderKey(logits[i], static_cast<int32_t>(i)));
        }
      }
    }
    std::sort(members.begin(), members.end());
    for (uint64_t key : members) {
      const double l = logits[TokenOf(key)];
      const double through = before + ApproxExp1((l - top) * inverse_temperature);
      if (through * inverse_total > target) {
        if (!first && target - before * inverse_total <= margin) return std::nullopt;
        if (through * inverse_total - target <= margin) return std::nullopt;
        return Crossing{key, through * inverse_total};
      }
      before = through;
      first = false;
    }
    return std::nullopt;
  };

  double kept = min_p ? kept_by_min_p * inverse_total : 1.0;
  if (params_.top_p < 1.0f) {
    const std::optional<Crossing> cut = cross(params_.top_p);
    if (!cut.has_value()) return std::nullopt;
    const double x = (static_cast<double>(logits[TokenOf(cut->key)]) - top) * inverse_temperature;
    // Past min-p's cut, top-p never came into play: min-p's kept mass, all before it, fell
    // short of top_p by the margin.
    if (!min_p || x >= log_min_p + kMinPUnsure) kept = cut->through;
  }
  const double u = canonical * kept;
  if (kept - u <= margin) return std::nullopt;  // the draw could land on the cut itself
  const std::optional<Crossing> drawn = cross(u);
  if (!drawn.has_value()) return std::nullopt;
  return TokenOf(drawn->key);
}

int32_t Sampler::ExactDraw(int32_t best, double canonical, int parts, PartRunner run) {
  const std::vector<float>& logits = logits_;
  const int64_t vocab = static_cast<int64_t>(logits.size());
  int32_t token = 0;
  // The candidates in sampling order (descending logit, ties to the lower id). Without
  // top-k, only tokens whose weight exp((l - max) / T) reaches 2^-60: every other weight is
  // below half an ulp of the sums below (which start at exp(0) = 1 and only grow), so it
  // would change no sum and can never be drawn: the tokens are those a sort of the whole
  // vocabulary would give.
  std::vector<uint64_t>& keys = keys_;
  keys.clear();
  const float max_logit = logits[best];
  const bool pruned = params_.top_k == 0;
  if (pruned) {
    // Each part takes the candidates of its own range of keys, found in token order, and
    // sorts them; the parts' ranges follow each other, so their orders, one after another,
    // are the whole order. The ranges split at quantiles of a sample of the candidates.
    const float floor = max_logit - 42.0f * params_.temperature;  // e^-42 < 2^-60
    std::vector<uint64_t>& pivots = pivots_;
    pivots.clear();
    if (parts > 1) {
      const int64_t stride = std::max<int64_t>(1, vocab / 1024);
      for (int64_t t = 0; t < vocab; t += stride) {
        if (logits[t] >= floor) pivots.push_back(OrderKey(logits[t], static_cast<int32_t>(t)));
      }
      std::sort(pivots.begin(), pivots.end());
      std::vector<uint64_t>& cuts = pivot_cuts_;  // the sample's quantiles
      cuts.clear();
      for (int part = 1; part < parts && !pivots.empty(); ++part) {
        cuts.push_back(
            pivots[pivots.size() * static_cast<size_t>(part) / static_cast<size_t>(parts)]);
      }
      pivots.swap(cuts);
    }
    const int ranges = static_cast<int>(pivots.size()) + 1;
    part_keys_.resize(static_cast<size_t>(ranges));
    part_scratch_.resize(static_cast<size_t>(ranges));
    run(ranges, [&](int part) {
      const uint64_t low = part == 0 ? 0 : pivots[static_cast<size_t>(part - 1)];
      const uint64_t high = part == ranges - 1 ? ~uint64_t{0} : pivots[static_cast<size_t>(part)];
      const bool last = part == ranges - 1;
      std::vector<uint64_t>& own = part_keys_[static_cast<size_t>(part)];
      own.resize(static_cast<size_t>(vocab));
      size_t count = 0;
      for (int32_t t = 0; t < vocab; ++t) {           // without branches: whether a token is in the
        const uint64_t key = OrderKey(logits[t], t);  // range is a coin toss
        own[count] = key;
        count += static_cast<size_t>((logits[t] >= floor) & (key >= low) & ((key < high) | last));
      }
      own.resize(count);
      RadixSortByLogit(own, part_scratch_[static_cast<size_t>(part)]);  // in token order
    });
    if (ranges == 1) {
      keys.swap(part_keys_[0]);
    } else {
      for (const std::vector<uint64_t>& own : part_keys_) {
        keys.insert(keys.end(), own.begin(), own.end());
      }
    }
  } else {
    keys.reserve(static_cast<size_t>(vocab));
    for (int32_t t = 0; t < vocab; ++t) keys.push_back(OrderKey(logits[t], t));
    const size_t keep = std::min<size_t>(keys.size(), params_.top_k);
    std::nth_element(keys.begin(), keys.begin() + static_cast<int64_t>(keep - 1), keys.end());
    keys.resize(keep);
    std::sort(keys.begin(), keys.end());
  }
  // Probabilities at this temperature over the kept candidates: the weights in parts, their
  // sum in order.
  std::vector<double>& p = probabilities_;
  p.resize(keys.size());
  const double top = static_cast<double>(logits[TokenOf(keys[0])]);
  const size_t count = keys.size();
  run(parts, [&](int part) {
    const size_t begin = count * static_cast<size_t>(part) / static_cast<size_t>(parts);
    const size_t end = count * static_cast<size_t>(part + 1) / static_cast<size_t>(parts);
    for (size_t i = begin; i < end; ++i) {
      p[i] = std::exp((static_cast<double>(logits[TokenOf(keys[i])]) - top) / params_.temperature);
    }
  });
  double sum = 0;
  for (double v : p) sum += v;
  run(parts, [&](int part) {
    const size_t begin = count * static_cast<size_t>(part) / static_cast<size_t>(parts);
    const size_t end = count * static_cast<size_t>(part + 1) / static_cast<size_t>(parts);
    for (size_t i = begin; i < end; ++i) p[i] /= sum;
  });
  size_t cut = count;
  if (params_.min_p > 0) {
    const double min_p_floor = params_.min_p * p[0];
    cut = static_cast<size_t>(
        std::find_if(p.begin(), p.end(), [&](double v) { return v < min_p_floor; }) - p.begin());
  }
  cut = std::max<size_t>(cut, 1);
  // The normalised weights' running sums, as far as the cut needs them: top-p, the kept mass
  // and the draw each read a prefix of the same additions in the same order, so that serial
  // chain runs once.
  std::vector<double>& running = running_sums_;
  running.resize(cut);
  const bool top_p = params_.top_p < 1.0f;
  double cumulative = 0;
  for (size_t i = 0; i < cut; ++i) {
    cumulative += p[i];
    running[i] = cumulative;
    if (top_p && cumulative >= params_.top_p) {
      cut = i + 1;
      break;
    }
  }
  const double kept = running[cut - 1];
  const double u = canonical * kept;  // as std::uniform_real_distribution(0, kept) draws it
  token = TokenOf(keys[cut - 1]);
  if (cut == count && pruned && count < static_cast<size_t>(vocab)) {
    // Only when u rounds up to `kept`: the last token of the whole order, as a full sort.
    int32_t last = 0;
    for (int32_t t = 1; t < vocab; ++t) {
      if (!Before(logits, t, last)) last = t;
    }
    token = last;
  }
  for (size_t i = 0; i < cut; ++i) {
    if (u < running[i]) {
      token = TokenOf(keys[i]);
      break;
    }
  }
  return token;
}

StopMatcher::Result StopMatcher::Add(const std::string& delta) {
  pending_ += delta;
  Result result;
  // The earliest complete stop string wins; the text before it is emitted.
  size_t best = std::string::npos;
  for (const std::string& stop : stops_) {
    size_t at = pending_.find(stop);
    if (at != std::string::npos && (best == std::string::npos || at < best)) {
      best = at;
      result.matched = stop;
    }
  }
  if (result.matched.has_value()) {
    result.emit = pending_.substr(0, best);
    pending_.clear();
    return result;
  }
  // Hold back the longest tail that could still grow into a stop string.
  size_t hold = 0;
  for (const std::string& stop : stops_) {
    for (size_t len = std::min(stop.size() - 1, pending_.size()); len > hold; --len) {
      if (pending_.compare(pending_.size() - len, len, stop, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  result.emit = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return result;
}

std::string StopMatcher::Flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace moed::model
