#include "cache/expert_cache.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "util/status_macros.h"

namespace moed::cache {

uint64_t ExpertCache::SlotBytes(const Store& store, Precision precision) {
  auto it = store.manifest().layouts.find(precision);
  return it == store.manifest().layouts.end() ? 0 : it->second.padded_size;
}

uint64_t ExpertCache::MinimumDeviceBytes(const Store& store, Precision precision) {
  return 2 * SlotBytes(store, precision);
}

ExpertCache::ExpertCache(std::shared_ptr<const Store> store, const CacheOptions& options)
    : store_(std::move(store)), options_(options), precision_policy_(options.precision_policy) {}

absl::StatusOr<DeviceBudgetSplit> SplitDeviceBudget(uint64_t device_bytes, uint64_t full_slot_bytes,
                                                    uint64_t fallback_slot_bytes, uint64_t experts,
                                                    const PrecisionPolicyOptions& policy) {
  DeviceBudgetSplit split;
  const uint64_t full_fit = device_bytes / full_slot_bytes;
  if (policy.kind == PrecisionPolicyKind::kExact || full_fit >= experts) {
    split.full_slots = std::min(full_fit, experts);
    return split;
  }
  const uint64_t minimum = 2 * (full_slot_bytes + fallback_slot_bytes);
  if (device_bytes < minimum) {
    return absl::InvalidArgumentError(
        absl::StrCat("device cache budget of ", device_bytes, " bytes is below the minimum of ",
                     minimum, " bytes for precision policy ", PrecisionPolicyName(policy.kind),
                     " (two full slots of ", full_slot_bytes, " bytes and two ",
                     PrecisionName(policy.fallback), " slots of ", fallback_slot_bytes, " bytes)"));
  }
  if (policy.low_bit_floor) {
    split.fallback_slots =
        std::min(experts, (device_bytes - 2 * full_slot_bytes) / fallback_slot_bytes);
  } else {
    split.fallback_slots =
        std::min(experts, device_bytes / (full_slot_bytes + fallback_slot_bytes));
  }
  split.full_slots = std::min(
      experts, (device_bytes - split.fallback_slots * fallback_slot_bytes) / full_slot_bytes);
  return split;
}

absl::StatusOr<std::unique_ptr<ExpertCache>> ExpertCache::Create(
    std::shared_ptr<const Store> store, const CacheOptions& options,
    const ReaderFactory& reader_factory, std::string* note) {
  const Manifest& m = store->manifest();
  if (!m.HasPrecision(options.precision)) {
    return absl::InvalidArgumentError(absl::StrCat(store->dir(), ": the store has no ",
                                                   PrecisionName(options.precision),
                                                   " blobs (pack with --precisions including it)"));
  }
  const PrecisionPolicyOptions& policy = options.precision_policy;
  MOED_RETURN_IF_ERROR(ValidatePrecisionPolicy(policy));
  const bool falls_back = policy.kind != PrecisionPolicyKind::kExact;
  if (falls_back) {
    if (PrecisionLooseness(policy.fallback) <= PrecisionLooseness(options.precision)) {
      return absl::InvalidArgumentError(
          absl::StrCat("the fallback precision ", PrecisionName(policy.fallback),
                       " is not coarser than the precision the cache serves (",
                       PrecisionName(options.precision), ")"));
    }
    if (!m.HasPrecision(policy.fallback)) {
      return absl::InvalidArgumentError(
          absl::StrCat(store->dir(), ": the store has no ", PrecisionName(policy.fallback),
                       " blobs for the fallback (pack with --precisions including it)"));
    }
  }
  const uint64_t slot_bytes = SlotBytes(*store, options.precision);
  const uint64_t fallback_slot_bytes = falls_back ? SlotBytes(*store, policy.fallback) : 0;
  const uint64_t experts =
      static_cast<uint64_t>(store->config().NumMoeLayers()) * static_cast<uint64_t>(m.num_experts);
  uint64_t device_bytes = options.device_bytes == 0 ? experts * slot_bytes : options.device_bytes;
  if (device_bytes < MinimumDeviceBytes(*store, options.precision)) {
    return absl::InvalidArgumentError(
        absl::StrCat("device cache budget of ", device_bytes, " bytes is below the minimum of ",
                     MinimumDeviceBytes(*store, options.precision), " bytes (two ",
                     PrecisionName(options.precision), " expert slots of ", slot_bytes, " bytes)"));
  }
  if (options.host_bytes > 0 && options.host_bytes < slot_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("host cache budget of ", options.host_bytes,
                                                   " bytes is below one expert slot (", slot_bytes,
                                                   " bytes); use 0 for no host tier"));
  }
  MOED_ASSIGN_OR_RETURN(
      DeviceBudgetSplit split,
      SplitDeviceBudget(device_bytes, slot_bytes, fallback_slot_bytes, experts, policy));
  std::unique_ptr<ExpertCache> cache(new ExpertCache(std::move(store), options));
  kernels::Device* device = options.backend ? &options.backend->device() : nullptr;
  cache->staged_ = device != nullptr && !device->host_memory_is_device_memory();
  if (cache->staged_ && options.staging_buffers < 1) {
    return absl::InvalidArgumentError("staging_buffers must be at least 1 with a GPU backend");
  }
  MOED_RETURN_IF_ERROR(ValidateHostCompute(options.host_compute));
  if (options.host_compute.enabled && (!cache->staged_ || options.host_bytes == 0)) {
    return absl::InvalidArgumentError(
        "computing experts on the host needs a host tier and a device whose memory is not the "
        "host's");
  }

  enum class Memory { kDevice, kHost };
  auto make_tier = [&](Tier& tier, const char* name, Precision precision, uint64_t slots,
                       PolicyKind policy_kind, int reserve, Memory memory) -> absl::Status {
    const BlobLayout& layout = cache->store_->manifest().layouts.at(precision);
    tier.name = name;
    tier.precision = precision;
    tier.layout = &layout;
    tier.slot_bytes = layout.padded_size;
    if (cache->staged_) {
      // One allocation per pool: device memory, or pinned memory the copy engine reads.
      MOED_ASSIGN_OR_RETURN(tier.buffer, memory == Memory::kDevice
                                             ? device->Allocate(slots * tier.slot_bytes)
                                             : device->AllocateHost(slots * tier.slot_bytes));
      tier.base = tier.buffer.as<uint8_t>();
    } else {
      MOED_ASSIGN_OR_RETURN(tier.memory, AlignedBuffer::Allocate(slots * tier.slot_bytes));
      tier.base = tier.memory.data();
    }
    tier.slots.resize(slots);
    for (int i = static_cast<int>(slots) - 1; i >= 0; --i) tier.free.push_back(i);
    tier.policy = MakePolicy(policy_kind, static_cast<int>(cache->store_->config().num_layers));
    tier.counters.slots = slots;
    // Landing slots for prefetches, when the tier cannot hold every expert.
    reserve = slots < experts ? std::clamp<int>(static_cast<int>(slots) - 2, 0, reserve) : 0;
    for (int i = 0; i < reserve; ++i) {
      cache->landing_.push_back(tier.free.back());
      tier.free.pop_back();
    }
    if (reserve > 0) cache->landing_total_ = reserve;
    slots -= static_cast<uint64_t>(reserve);
    // Equal shares among the MoE layers, the remainder to the first of them.
    const model::ModelConfig& config = cache->store_->config();
    const auto moe_layers = static_cast<uint64_t>(config.NumMoeLayers());
    tier.per_layer.assign(static_cast<size_t>(config.num_layers), 0);
    tier.quota.assign(static_cast<size_t>(config.num_layers), 0);
    uint64_t nth = 0;
    for (int64_t l = 0; l < config.num_layers; ++l) {
      if (!config.IsMoeLayer(l)) continue;
      tier.quota[static_cast<size_t>(l)] =
          static_cast<int>(slots / moe_layers + (nth++ < slots % moe_layers ? 1 : 0));
    }
    return absl::OkStatus();
  };
  MOED_RETURN_IF_ERROR(make_tier(cache->device_, "device", options.precision, split.full_slots,
                                 options.device_policy, std::max(0, options.prefetch_slots),
                                 Memory::kDevice));
  if (split.fallback_slots > 0) {
    cache->fallback_ = std::make_unique<Tier>();
    MOED_RETURN_IF_ERROR(make_tier(*cache->fallback_, "fallback", policy.fallback,
                                   split.fallback_slots, options.device_policy, 0,
                                   Memory::kDevice));
  }
  // Without a floor, or without a fallback pool to hold one, the floor has nothing to read.
  cache->floor_complete_ = !policy.low_bit_floor || cache->fallback_ == nullptr;
  if (options.host_bytes > 0) {
    cache->host_ = std::make_unique<Tier>();
    MOED_RETURN_IF_ERROR(make_tier(*cache->host_, "host", options.precision,
                                   std::min(options.host_bytes / slot_bytes, experts),
                                   options.host_policy, 0, Memory::kHost));
  }
  if (cache->staged_) {
    const uint64_t staging_bytes = std::max(slot_bytes, fallback_slot_bytes);
    for (int i = 0; i < options.staging_buffers; ++i) {
      MOED_ASSIGN_OR_RETURN(kernels::DeviceBuffer buffer, device->AllocateHost(staging_bytes));
      cache->staging_.push_back(std::move(buffer));
      cache->staging_free_.push_back(options.staging_buffers - 1 - i);
    }
  }

  ExpertCache* raw = cache.get();
  ReadCallback callback = [raw](uint64_t tag, const absl::Status& status) {
    raw->OnReadComplete(tag, status);
  };
  if (reader_factory) {
    MOED_ASSIGN_OR_RETURN(cache->reader_, reader_factory(callback));
  } else if (options.allow_io_uring) {
    MOED_ASSIGN_OR_RETURN(cache->reader_, OpenBestReader(cache->store_->experts_path(),
                                                         options.reader, callback, note));
  } else {
    MOED_ASSIGN_OR_RETURN(cache->reader_,
                          OpenPreadReader(cache->store_->experts_path(), options.reader, callback));
  }
  cache->retry_thread_ = std::thread([raw] { raw->RetryLoop(); });
  if (cache->staged_) cache->copy_watch_thread_ = std::thread([raw] { raw->CopyWatchLoop(); });
  return cache;
}

ExpertCache::~ExpertCache() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;  // from now on nothing submits a read
  }
  if (retry_thread_.joinable()) {
    retry_changed_.notify_all();
    retry_thread_.join();
  }
  // Reads still in flight write into our slots: stop the reader first.
  reader_.reset();
  // Then let the copies they queued finish (the buffers they read go with this cache).
  if (copy_watch_thread_.joinable()) {
    {
      std::lock_guard lock(mutex_);
      copy_watch_stopping_ = true;
    }
    copies_changed_.notify_all();
    copy_watch_thread_.join();
  }
}

absl::StatusOr<kernels::Event> ExpertCache::QueueCopy(Tier& pool, int slot, const uint8_t* src,
                                                      uint64_t bytes, const kernels::Event& after) {
  kernels::Stream& copy = options_.backend->copy();
  std::lock_guard lock(copy_mutex_);
  MOED_RETURN_IF_ERROR(copy.Wait(after));
  MOED_RETURN_IF_ERROR(
      copy.CopyToDevice(pool.buffer, static_cast<size_t>(slot) * pool.slot_bytes, src, bytes));
  return copy.Record();
}

void ExpertCache::CopyWatchLoop() {
  std::unique_lock lock(mutex_);
  while (true) {
    copies_changed_.wait(lock, [&] { return !copies_in_flight_.empty() || copy_watch_stopping_; });
    if (copies_in_flight_.empty()) return;  // stopping, and every copy is done
    // The copy stream runs in order: the oldest copy finishes first.
    const kernels::Event done = copies_in_flight_.front().done;
    lock.unlock();
    // A failed wait (a device error) leaves nothing to do but give the buffers back.
    options_.backend->device().WaitForEvent(done).IgnoreError();
    lock.lock();
    const CopyInFlight copy = copies_in_flight_.front();
    copies_in_flight_.pop_front();
    copy_bytes_queued_ -= copy.bytes;
    if (copy.from_host) {
      stage_from_host_.Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - copy.started).count());
    }
    if (copy.host_slot >= 0) ReleaseSlotLocked(*host_, copy.host_slot);
    if (copy.staging >= 0) ReleaseStagingLocked(copy.staging);
    IssuePrefetchesLocked();
    changed_.notify_all();
  }
}

void ExpertCache::ReleaseStagingLocked(int staging) {
  staging_free_.push_back(staging);
  while (!staging_waiters_.empty() && !staging_free_.empty()) {
    const uint64_t tag = staging_waiters_.front();
    staging_waiters_.pop_front();
    auto it = loads_.find(tag);
    if (it == loads_.end()) continue;
    Load& load = it->second;
    load.staging = staging_free_.back();
    staging_free_.pop_back();
    load.target = staging_[static_cast<size_t>(load.staging)].as<uint8_t>();
    const Load submitted_load = load;
    if (absl::Status submitted = SubmitLocked(tag, submitted_load); !submitted.ok()) {
      FailLoadLocked(submitted_load, BlobError(*store_, *submitted_load.blob,
                                               ReadFaultKind::kIoError, submitted.message(), 1));
    }
  }
}

void ExpertCache::RetryLoop() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    if (retries_.empty()) {
      retry_changed_.wait(lock);
      continue;
    }
    auto due = retries_.begin()->first;
    if (std::chrono::steady_clock::now() < due) {
      retry_changed_.wait_until(lock, due);
      continue;
    }
    const uint64_t tag = retries_.begin()->second;
    retries_.erase(retries_.begin());
    auto it = loads_.find(tag);
    if (it == loads_.end()) continue;
    const Load& load = it->second;
    ReadRequest request{load.blob->offset, DevicePool(load.key.precision).slot_bytes, load.target,
                        tag, load.prefetch || load.fill};
    absl::Status submitted = reader_->Submit(absl::MakeConstSpan(&request, 1));
    if (!submitted.ok()) {
      Load failed = it->second;
      loads_.erase(it);
      if (failed.prefetch) --prefetches_in_flight_;
      EndFailedLoadLocked(tag, failed,
                          BlobError(*store_, *failed.blob, ReadFaultKind::kIoError,
                                    submitted.message(), failed.attempts));
    }
  }
}

// A landing slot's expert counts toward its layer's share only once it joins the layer.
void ExpertCache::Tier::Add(const ExpertKey& key, int slot) {
  index[key] = slot;
  if (!slots[slot].landing) ++per_layer[static_cast<size_t>(key.layer)];
}

void ExpertCache::Tier::Drop(const ExpertKey& key) {
  auto it = index.find(key);
  if (it == index.end()) return;
  if (!slots[it->second].landing) --per_layer[static_cast<size_t>(key.layer)];
  index.erase(it);
}

int ExpertCache::AllocateSlotLocked(Tier& tier, int layer) {
  if (!tier.free.empty()) {
    int slot = tier.free.back();
    tier.free.pop_back();
    return slot;
  }
  std::vector<ExpertKey> candidates;
  auto collect = [&](auto in_scope) {
    for (const Slot& slot : tier.slots) {
      if (slot.state == SlotState::kReady && slot.pins == 0 && in_scope(slot.key.layer) &&
          !slot.landing)
        candidates.push_back(slot.key);
    }
  };
  auto over_quota = [&](int other) {
    return tier.per_layer[static_cast<size_t>(other)] > tier.quota[static_cast<size_t>(other)];
  };
  if (options_.eviction_scope == EvictionScope::kGlobal) {
    collect([](int) { return true; });
  } else if (tier.per_layer[static_cast<size_t>(layer)] >= tier.quota[static_cast<size_t>(layer)]) {
    // At its share: replace one of its own, else shrink a layer over its share, else wait
    // for one of its own that this step still uses (they are released as they compute).
    collect([&](int other) { return other == layer; });
    if (candidates.empty()) collect(over_quota);
    // With no slot of its own to wait for (a share of zero slots), anything will do.
    if (candidates.empty() && tier.per_layer[static_cast<size_t>(layer)] == 0)
      collect([](int) { return true; });
  } else {
    // Under its share (it lost slots while others grew into free ones): take one back.
    collect(over_quota);
    if (candidates.empty()) collect([](int) { return true; });
  }
  if (candidates.empty()) return -1;
  return EvictLocked(tier, candidates);
}

int ExpertCache::EvictLocked(Tier& tier, const std::vector<ExpertKey>& candidates) {
  const ExpertKey victim = tier.policy->Victim(candidates);
  const int slot = tier.index.at(victim);
  tier.Drop(victim);
  tier.policy->Remove(victim);
  Slot& evicted = tier.slots[slot];
  evicted.state = SlotState::kFree;
  if (evicted.prefetched) ++prefetch_wasted_;
  evicted.prefetched = evicted.claimed = false;
  ++tier.counters.evictions;
  return slot;
}

void ExpertCache::ReleaseSlotLocked(Tier& tier, int slot) {
  Slot& s = tier.slots[slot];
  if (--s.pins == 0 && s.state == SlotState::kFree) tier.free.push_back(slot);
}

absl::Status ExpertCache::StartLoadLocked(const ExpertKey& key, int device_slot, bool prefetch) {
  Tier& pool = DevicePool(key.precision);
  Slot& slot = pool.slots[device_slot];
  slot.state = SlotState::kLoading;
  slot.key = key;
  slot.prefetched = prefetch;
  slot.claimed = slot.arrived_late = false;
  pool.Add(key, device_slot);
  MOED_ASSIGN_OR_RETURN(const BlobEntry* blob, store_->Blob(key.layer, key.expert, key.precision));
  const uint64_t bytes = pool.slot_bytes;
  // The host tier keeps full copies only: a fallback copy is read from the store.
  Tier* host = &pool == &device_ ? host_.get() : nullptr;
  if (host != nullptr) {
    auto it = host->index.find(key);
    if (it != host->index.end() && host->slots[it->second].state == SlotState::kReady) {
      // Host hit: copy to the device tier now (staged: queue the copy; the host slot stays
      // pinned until it is done).
      ++host->counters.hits;
      host->policy->Touch(key, tick_);
      const auto copy_started = std::chrono::steady_clock::now();
      if (staged_) {
        MOED_ASSIGN_OR_RETURN(slot.ready, QueueCopy(pool, device_slot, host->SlotData(it->second),
                                                    bytes, slot.last_read));
        ++host->slots[it->second].pins;
        copies_in_flight_.push_back(
            CopyInFlight{slot.ready, -1, it->second, /*from_host=*/true, bytes, copy_started});
        copy_bytes_queued_ += bytes;
        copies_changed_.notify_all();
      } else {
        std::memcpy(pool.SlotData(device_slot), host->SlotData(it->second), bytes);
        stage_from_host_.Observe(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - copy_started).count());
      }
      pool.counters.bytes_in += bytes;
      slot.state = SlotState::kReady;
      pool.policy->Touch(key, tick_);
      return absl::OkStatus();
    }
    ++host->counters.misses;
  }
  Load load{key, blob, false, -1, device_slot, std::chrono::steady_clock::now()};
  load.prefetch = prefetch;
  load.after = slot.last_read;
  uint8_t*& target = load.target;
  target = pool.SlotData(device_slot);
  if (host != nullptr && !host->index.contains(key)) {
    int host_slot = AllocateSlotLocked(*host, key.layer);
    if (host_slot >= 0) {  // else every host slot is busy: read straight into the device tier
      Slot& hs = host->slots[host_slot];
      hs.state = SlotState::kLoading;
      hs.key = key;
      hs.pins = 1;
      host->Add(key, host_slot);
      load.into_host = true;
      load.host_slot = host_slot;
      target = host->SlotData(host_slot);
    }
  }
  uint64_t tag = next_tag_++;
  if (staged_ && !load.into_host) {
    // Device memory is not the host's to read into: a pinned staging buffer takes the read.
    if (staging_free_.empty()) {
      // (Prefetches start only with a buffer free: this is a use's read.)
      loads_[tag] = load;
      staging_waiters_.push_back(tag);  // submitted when a copy gives one back
      if (prefetch) {
        ++prefetch_reads_;
        ++prefetches_in_flight_;
      }
      return absl::OkStatus();
    }
    load.staging = staging_free_.back();
    staging_free_.pop_back();
    target = staging_[static_cast<size_t>(load.staging)].as<uint8_t>();
  }
  loads_[tag] = load;
  if (prefetch) {
    ++prefetch_reads_;
    ++prefetches_in_flight_;
  }
  absl::Status submitted = SubmitLocked(tag, load);
  if (!submitted.ok() && load.staging >= 0) ReleaseStagingLocked(load.staging);
  if (!submitted.ok() && prefetch) --prefetches_in_flight_;
  return submitted;
}

absl::Status ExpertCache::SubmitLocked(uint64_t tag, const Load& load) {
  if (stopping_) {
    // The reader is going away (its completion thread calls in until it has).
    loads_.erase(tag);
    return absl::CancelledError("the expert cache is shutting down");
  }
  const uint64_t bytes = DevicePool(load.key.precision).slot_bytes;
  ++ssd_reads_;
  ssd_bytes_ += bytes;
  ReadRequest request{load.blob->offset, bytes, load.target, tag, load.prefetch || load.fill};
  absl::Status submitted = reader_->Submit(absl::MakeConstSpan(&request, 1));
  if (!submitted.ok()) loads_.erase(tag);
  return submitted;
}

void ExpertCache::Prefetch(const std::vector<PrefetchHint>& hints) {
  std::lock_guard lock(mutex_);
  QueuePrefetchesLocked(hints);
  IssuePrefetchesLocked();
}

void ExpertCache::CancelPrefetches() {
  std::lock_guard lock(mutex_);
  QueuePrefetchesLocked({});
}

void ExpertCache::QueuePrefetchesLocked(const std::vector<PrefetchHint>& hints) {
  prefetch_cancelled_ += prefetch_queue_.size();  // superseded before they started
  prefetch_queue_.clear();
  absl::flat_hash_set<ExpertKey> hinted;
  const model::ModelConfig& config = store_->config();
  for (const PrefetchHint& hint : hints) {
    if (hint.layer < 0 || hint.layer >= config.num_layers || !config.IsMoeLayer(hint.layer) ||
        hint.expert < 0 || hint.expert >= config.num_experts) {
      continue;
    }
    const ExpertKey key{hint.layer, hint.expert, hint.precision.value_or(device_.precision)};
    if (DevicePool(key.precision).precision != key.precision) continue;  // no pool for it
    if (!hinted.insert(key).second) continue;
    DevicePool(key.precision).policy->Predict(key, hint.probability);
    if (hint.fetch) prefetch_queue_.push_back(hint);
  }
  std::stable_sort(
      prefetch_queue_.begin(), prefetch_queue_.end(),
      [](const PrefetchHint& a, const PrefetchHint& b) { return a.probability > b.probability; });
}

void ExpertCache::IssuePrefetchesLocked() {
  // One prefetch read at a time, and only while no use waits for a read or a slot: prefetches
  // fill the time the disk would otherwise stand idle (while experts compute), and a wrong one
  // costs little more than that time, since it is cancelled when its layer comes.
  const bool demand_reading = std::any_of(loads_.begin(), loads_.end(), [](const auto& entry) {
    return !entry.second.prefetch && !entry.second.fill;
  });
  while (!prefetch_queue_.empty() && uses_waiting_for_slots_ == 0 && !demand_reading &&
         prefetches_in_flight_ < 1 && !(staged_ && staging_free_.empty())) {
    const PrefetchHint hint = prefetch_queue_.front();
    const ExpertKey key{hint.layer, hint.expert, hint.precision.value_or(device_.precision)};
    Tier& pool = DevicePool(key.precision);
    if (pool.index.contains(key)) {  // resident or on its way already
      prefetch_queue_.pop_front();
      ++prefetch_cancelled_;
      continue;
    }
    // A prefetch never evicts: it takes a free slot, or a landing slot.
    int slot = -1;
    bool landing = false;
    if (!pool.free.empty()) {
      slot = pool.free.back();
      pool.free.pop_back();
    } else if (&pool == &device_ && !landing_.empty()) {
      slot = landing_.back();
      landing_.pop_back();
      landing = true;
    } else {
      return;  // wait for one
    }
    prefetch_queue_.pop_front();
    ++prefetch_issued_;
    pool.slots[slot].landing = landing;
    landing_in_use_ += landing ? 1 : 0;
    if (!StartLoadLocked(key, slot, /*prefetch=*/true).ok()) {
      // Not even submitted: counted as failed, and the slot is free again.
      ++prefetch_failures_;
      pool.slots[slot].state = SlotState::kFree;
      pool.slots[slot].prefetched = false;
      pool.Drop(key);
      FreeSlotLocked(pool, slot);
    }
  }
  if (prefetch_queue_.empty() && loads_.empty() && uses_waiting_for_slots_ == 0)
    IssueBackgroundLocked();
}

void ExpertCache::IssueBackgroundLocked() {
  if (stopping_ || (staged_ && staging_free_.empty())) return;
  // Upgrades first (experts that just ran from a fallback copy), then the floor. Neither evicts
  // anything pinned; an upgrade takes a slot as a miss would (its expert was just used), the
  // floor only free ones.
  while (!upgrades_.empty()) {
    const ExpertKey key = upgrades_.front();
    upgrades_.pop_front();
    if (device_.index.contains(key)) continue;
    const int slot = AllocateSlotLocked(device_, key.layer);
    if (slot < 0) continue;
    if (StartFillLocked(key, slot)) {
      ++upgrade_reads_;
      return;
    }
  }
  if (floor_complete_ || fallback_ == nullptr) return;
  const model::ModelConfig& config = store_->config();
  const size_t total =
      static_cast<size_t>(config.num_layers) * static_cast<size_t>(config.num_experts);
  for (size_t checked = 0; checked < total;
       ++checked, floor_cursor_ = (floor_cursor_ + 1) % total) {
    const int layer = static_cast<int>(floor_cursor_ / static_cast<size_t>(config.num_experts));
    const int expert = static_cast<int>(floor_cursor_ % static_cast<size_t>(config.num_experts));
    if (!config.IsMoeLayer(layer)) continue;
    const ExpertKey key{layer, expert, fallback_->precision};
    if (fallback_->index.contains(key) || floor_failed_.contains(key)) continue;
    if (fallback_->free.empty()) return;  // full: the floor holds what the budget allows
    const int slot = fallback_->free.back();
    fallback_->free.pop_back();
    if (StartFillLocked(key, slot)) ++floor_reads_;
    return;
  }
  floor_complete_ = true;  // every fallback copy was resident or on its way
}

bool ExpertCache::StartFillLocked(const ExpertKey& key, int slot) {
  Tier& pool = DevicePool(key.precision);
  auto blob = store_->Blob(key.layer, key.expert, key.precision);
  if (!blob.ok()) {
    FreeSlotLocked(pool, slot);
    return false;
  }
  Slot& s = pool.slots[slot];
  s.state = SlotState::kLoading;
  s.key = key;
  s.prefetched = s.claimed = s.arrived_late = false;
  pool.Add(key, slot);
  Load load{key, *blob, false, -1, slot, std::chrono::steady_clock::now()};
  load.fill = true;
  load.target = pool.SlotData(slot);
  load.after = s.last_read;
  if (staged_) {  // IssueBackgroundLocked starts none without a free staging buffer
    load.staging = staging_free_.back();
    staging_free_.pop_back();
    load.target = staging_[static_cast<size_t>(load.staging)].as<uint8_t>();
  }
  const uint64_t tag = next_tag_++;
  loads_[tag] = load;
  if (!SubmitLocked(tag, load).ok()) {
    if (load.staging >= 0) ReleaseStagingLocked(load.staging);
    s.state = SlotState::kFree;
    pool.Drop(key);
    FreeSlotLocked(pool, slot);
    return false;
  }
  return true;
}

void ExpertCache::FreeSlotLocked(Tier& pool, int slot) {
  if (&pool == &device_) {
    FreeDeviceSlotLocked(slot);
  } else {
    pool.free.push_back(slot);
  }
}

void ExpertCache::FreeDeviceSlotLocked(int slot) {
  Slot& s = device_.slots[slot];
  if (s.landing) {
    s.landing = false;
    --landing_in_use_;
    landing_.push_back(slot);
  } else {
    device_.free.push_back(slot);
  }
}

void ExpertCache::JoinLayerLocked(int slot) {
  Slot& s = device_.slots[slot];
  if (!s.landing) return;
  s.landing = false;
  --landing_in_use_;
  ++device_.per_layer[static_cast<size_t>(s.key.layer)];
}

void ExpertCache::RestoreLandingSlotsLocked() {
  while (static_cast<int>(landing_.size()) + landing_in_use_ < landing_total_) {
    int slot = -1;
    if (!device_.free.empty()) {
      slot = device_.free.back();
      device_.free.pop_back();
    } else {
      // From a layer over its share (the one a used prefetch joined), its policy's victim.
      for (size_t l = 0; l < device_.per_layer.size() && slot < 0; ++l) {
        if (device_.per_layer[l] <= device_.quota[l]) continue;
        std::vector<ExpertKey> candidates;
        for (const Slot& s : device_.slots) {
          if (s.state == SlotState::kReady && s.pins == 0 && !s.landing &&
              s.key.layer == static_cast<int>(l))
            candidates.push_back(s.key);
        }
        if (!candidates.empty()) slot = EvictLocked(device_, candidates);
      }
    }
    if (slot < 0) return;  // everything is in use: try again when slots are released
    landing_.push_back(slot);
  }
}

void ExpertCache::OnReadComplete(uint64_t tag, const absl::Status& status) {
  Load load;
  uint64_t bytes = 0;
  {
    std::lock_guard lock(mutex_);
    auto it = loads_.find(tag);
    if (it == loads_.end()) return;
    load = it->second;
    loads_.erase(it);
    if (load.cancelled && status.code() == absl::StatusCode::kCancelled) {
      EndCancelledLoadLocked(tag, load);
      return;
    }
    bytes = DevicePool(load.key.precision).slot_bytes;
  }
  // The target slots are pinned by this load: verify and copy without the lock.
  std::optional<ReadFaultKind> failed;
  std::string what;
  if (!status.ok()) {
    std::optional<StoreFault> fault = StoreFaultOf(status);
    failed = fault.has_value() ? fault->kind : ReadFaultKind::kIoError;
    what = std::string(status.message());
  } else if (Checksum(load.target, bytes) != load.blob->xxh64) {
    failed = ReadFaultKind::kCorrupt;
    what = "checksum mismatch";
  }
  const bool retry = failed.has_value() && IsRetryable(*failed) &&
                     load.attempts < std::max(1, options_.max_read_attempts);
  if (failed.has_value() && options_.on_read_failure) {
    StoreFault fault{*failed,           load.key.layer, load.key.expert, load.blob->precision,
                     load.blob->offset, load.attempts};
    options_.on_read_failure(fault, what, retry);
  }
  absl::StatusOr<kernels::Event> copied;
  if (!failed.has_value() && staged_) {
    // The pools' memory and slot sizes do not change: no lock needed to queue the copy.
    copied =
        QueueCopy(DevicePool(load.key.precision), load.device_slot, load.target, bytes, load.after);
  } else if (!failed.has_value() && load.into_host) {
    std::memcpy(device_.SlotData(load.device_slot), load.target, bytes);
  }

  std::lock_guard lock(mutex_);
  Tier& pool = DevicePool(load.key.precision);
  NoteReadOutcomeLocked(load.key, failed);
  if (!failed.has_value() && staged_ && !copied.ok()) {
    // The read was good; the device refused the copy. Not the store's fault, not retried.
    if (load.prefetch) --prefetches_in_flight_;
    EndFailedLoadLocked(tag, load, copied.status());
    return;
  }
  if (load.prefetch && !retry) --prefetches_in_flight_;
  if (retry) {
    // 1×, 4×, 16× ... the backoff: a device that has just failed is given time.
    auto delay = options_.retry_backoff * (int64_t{1} << (2 * std::min(load.attempts - 1, 10)));
    ++load.attempts;
    loads_[tag] = load;
    retries_.emplace(std::chrono::steady_clock::now() + delay, tag);
    retry_changed_.notify_all();
    return;
  }
  if (failed.has_value()) {
    EndFailedLoadLocked(tag, load, BlobError(*store_, *load.blob, *failed, what, load.attempts));
    return;
  }
  Slot& device_slot = pool.slots[load.device_slot];
  stage_from_ssd_.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load.started).count());
  device_slot.state = SlotState::kReady;
  if (device_slot.prefetched && device_slot.claimed) {
    ++prefetch_late_;
    device_slot.prefetched = device_slot.claimed = false;
    device_slot.arrived_late = true;
  }
  pool.policy->Touch(load.key, tick_);
  pool.counters.bytes_in += bytes;
  if (load.into_host) {
    host_->slots[load.host_slot].state = SlotState::kReady;
    host_->policy->Touch(load.key, tick_);
    host_->counters.bytes_in += bytes;
  }
  if (staged_) {
    // What the copy reads stays held until it is done.
    device_slot.ready = *copied;
    copies_in_flight_.push_back(CopyInFlight{
        *copied, load.staging, load.into_host ? load.host_slot : -1, false, bytes, load.started});
    copy_bytes_queued_ += bytes;
    copies_changed_.notify_all();
  } else if (load.into_host) {
    ReleaseSlotLocked(*host_, load.host_slot);
  }
  IssuePrefetchesLocked();  // the disk may be idle now
  changed_.notify_all();
}

void ExpertCache::CancelUnneededLocked(int layer, const std::vector<int>& experts) {
  // Arrived, not needed, holding a landing slot: give the slot back for the next prefetch.
  for (size_t i = 0; i < device_.slots.size(); ++i) {
    Slot& slot = device_.slots[i];
    if (!slot.landing || slot.state != SlotState::kReady || slot.key.layer != layer ||
        std::find(experts.begin(), experts.end(), slot.key.expert) != experts.end()) {
      continue;
    }
    ++prefetch_wasted_;
    device_.Drop(slot.key);
    device_.policy->Remove(slot.key);
    slot.state = SlotState::kFree;
    slot.prefetched = slot.claimed = false;
    FreeDeviceSlotLocked(static_cast<int>(i));
  }
  for (auto& [tag, load] : loads_) {
    Tier& pool = DevicePool(load.key.precision);
    if (!load.prefetch || load.cancelled || load.key.layer != layer ||
        std::find(experts.begin(), experts.end(), load.key.expert) != experts.end() ||
        pool.slots[load.device_slot].pins > 0) {
      continue;
    }
    load.cancelled = reader_->Cancel(tag);
    if (!load.cancelled) continue;
    // Wasted now, within the step that gave it up (its completion comes later).
    ++prefetch_wasted_;
    cancelled_read_bytes_ += pool.slot_bytes;
    Slot& slot = pool.slots[load.device_slot];
    slot.prefetched = slot.claimed = false;
  }
}

void ExpertCache::EndCancelledLoadLocked(uint64_t tag, const Load& load) {
  --prefetches_in_flight_;  // counted wasted when it was cancelled
  AbandonPrefetchLocked(tag, load);
}

void ExpertCache::AbandonPrefetchLocked(uint64_t tag, const Load& load) {
  Tier& pool = DevicePool(load.key.precision);
  Slot& slot = pool.slots[load.device_slot];
  slot.prefetched = slot.claimed = false;
  if (slot.pins > 0) {
    // A use waits for it: read it again as that use's own read, with attempts of its own.
    Load demand = load;
    demand.prefetch = demand.cancelled = demand.fill = false;
    demand.attempts = 1;
    demand.started = std::chrono::steady_clock::now();
    loads_[tag] = demand;
    if (absl::Status submitted = SubmitLocked(tag, demand); !submitted.ok()) {
      FailLoadLocked(
          demand, BlobError(*store_, *load.blob, ReadFaultKind::kIoError, submitted.message(), 1));
    }
    return;
  }
  // Nobody waits: free the slots and forget the expert; a use will read it again.
  slot.state = SlotState::kFree;
  pool.Drop(load.key);
  FreeSlotLocked(pool, load.device_slot);
  if (load.staging >= 0) ReleaseStagingLocked(load.staging);
  if (load.into_host) {
    host_->slots[load.host_slot].state = SlotState::kFree;
    host_->Drop(load.key);
    ReleaseSlotLocked(*host_, load.host_slot);
  }
  IssuePrefetchesLocked();
  changed_.notify_all();
}

void ExpertCache::NoteReadOutcomeLocked(const ExpertKey& key, std::optional<ReadFaultKind> failed) {
  if (!failed.has_value()) {
    failing_blobs_.clear();
    return;
  }
  switch (*failed) {
    case ReadFaultKind::kIoError:
      ++failed_io_;
      break;
    case ReadFaultKind::kShortRead:
      ++failed_short_reads_;
      break;
    case ReadFaultKind::kCorrupt:
      ++failed_checksums_;
      return;  // one bad blob says nothing of the rest of the store
  }
  failing_blobs_.insert(key);
  if (health_.readable && static_cast<int>(failing_blobs_.size()) >=
                              std::max(1, options_.unreadable_after_failed_blobs)) {
    health_.readable = false;
    health_.reason = absl::StrCat("reads of ", failing_blobs_.size(), " different expert blobs in ",
                                  store_->experts_path(), " failed in a row");
  }
}

void ExpertCache::EndFailedLoadLocked(uint64_t tag, const Load& load, const absl::Status& status) {
  if (!load.prefetch && !load.fill) {
    FailLoadLocked(load, status);
    return;
  }
  if (load.prefetch) ++prefetch_failures_;
  // The floor does not read a failed copy again (a bad blob would be read forever); a use
  // that needs it reads it.
  if (load.fill && load.key.precision != device_.precision) floor_failed_.insert(load.key);
  AbandonPrefetchLocked(tag, load);
}

void ExpertCache::FailLoadLocked(const Load& load, const absl::Status& status) {
  Tier& pool = DevicePool(load.key.precision);
  pool.slots[load.device_slot].state = SlotState::kFree;
  pool.Drop(load.key);
  if (load.staging >= 0) ReleaseStagingLocked(load.staging);
  if (load.into_host) {
    host_->slots[load.host_slot].state = SlotState::kFree;
    host_->Drop(load.key);
    ReleaseSlotLocked(*host_, load.host_slot);
  }
  std::optional<StoreFault> fault = StoreFaultOf(status);
  failures_[load.key] =
      Failure{status.code(), std::string(status.message()), fault.value_or(StoreFault{})};
  changed_.notify_all();
}

StoreHealth ExpertCache::store_health() const {
  std::lock_guard lock(mutex_);
  return health_;
}

StoreHealth ExpertCache::CheckStore() {
  absl::Status usable = store_->CheckExpertsFile();
  bool was_readable = false;
  ExpertKey probe_key{-1, -1};
  {
    std::lock_guard lock(mutex_);
    if (!usable.ok()) {
      health_ = StoreHealth{false, std::string(usable.message())};
      return health_;
    }
    was_readable = health_.readable;
    if (!failing_blobs_.empty()) probe_key = *failing_blobs_.begin();
  }
  if (was_readable) return store_health();
  // Unreadable until now: read one blob back, one that failed if any did.
  const BlobEntry* blob =
      probe_key.layer >= 0
          ? store_->manifest().FindBlob(probe_key.layer, probe_key.expert, probe_key.precision)
          : nullptr;
  if (blob == nullptr && !store_->manifest().blobs.empty()) blob = &store_->manifest().blobs[0];
  absl::Status probed = absl::OkStatus();
  if (blob != nullptr) {
    auto buffer =
        AlignedBuffer::Allocate(store_->manifest().layouts.at(blob->precision).padded_size);
    probed = buffer.ok() ? store_->ReadBlob(*blob, buffer->data()) : buffer.status();
  }
  std::lock_guard lock(mutex_);
  if (probed.ok()) {
    failing_blobs_.clear();
    health_ = StoreHealth{};
  } else {
    health_ = StoreHealth{false, std::string(probed.message())};
  }
  return health_;
}

absl::Status ExpertCache::ForEachExpert(int layer, const std::vector<int>& experts,
                                        const model::ExpertCompute& compute) {
  return ForEachExpert(layer, experts, compute, std::vector<PrefetchHint>{});
}

absl::Status ExpertCache::ForEachExpert(int layer, const std::vector<int>& experts,
                                        const model::ExpertCompute& compute,
                                        const std::vector<PrefetchHint>& hints) {
  std::vector<ExpertUse> uses;
  if (routed_layer_ == layer && !routed_uses_.empty()) {
    uses.reserve(experts.size());
    for (int e : experts) {
      ExpertUse& use = uses.emplace_back();
      auto it = routed_uses_.find(e);
      if (it == routed_uses_.end()) continue;
      use.may_fall_back = precision_policy_.MayFallBack(it->second);
      use.tokens = static_cast<int>(it->second.size());
      use.all_inexact = std::all_of(it->second.begin(), it->second.end(), [](const TokenUse& t) {
        return t.loosest != Precision::kSource;
      });
    }
  }
  routed_uses_.clear();
  routed_layer_ = -1;
  return ForEachExpert(layer, experts, compute, hints, uses);
}

void ExpertCache::Routed(const model::LayerRouting& routing) {
  routed_uses_.clear();
  routed_layer_ = routing.layer;
  if (!precision_policy_.falls_back() && !options_.host_compute.enabled) return;
  // Who claims each expert, with what weight and rank, and what their requests accept.
  for (size_t t = 0; t < routing.num_tokens(); ++t) {
    const std::vector<int>& chosen = (*routing.chosen)[t];
    const Precision loosest = routing.loosest != nullptr ? routing.loosest[t] : Precision::kSource;
    for (size_t r = 0; r < chosen.size(); ++r) {
      routed_uses_[chosen[r]].push_back(
          TokenUse{routing.gate_weights[t * static_cast<size_t>(routing.top_k) + r],
                   static_cast<int>(r), loosest});
    }
  }
}

void ExpertCache::ClaimLocked(ExpertClaim& claim) {
  Tier& pool = PoolOf(claim);
  model::ExpertServed& how = claim.served;
  how.precision = pool.precision;
  how.fallback = &pool != &device_;
  ++tick_;
  auto it = pool.index.find(claim.key);
  if (it == pool.index.end()) {
    ++pool.counters.misses;
    return;  // waits for a slot (StartClaimLocked)
  }
  claim.slot = it->second;
  Slot& slot = pool.slots[claim.slot];
  ++slot.pins;
  if (&pool == &device_) JoinLayerLocked(claim.slot);
  if (slot.state == SlotState::kReady) {
    ++pool.counters.hits;
    pool.policy->Touch(claim.key, tick_);
    if (slot.prefetched) {  // its bytes were moved for this use, ahead of it
      ++prefetch_useful_;
      slot.prefetched = false;
      how.prefetch = model::PrefetchOutcome::kUseful;
      how.bytes_staged = pool.slot_bytes;
    }
    return;
  }
  ++pool.counters.misses;                   // the use waits for it
  how.source = model::ExpertSource::kDisk;  // a read already in flight
  how.bytes_staged = pool.slot_bytes;
  if (slot.prefetched) {
    slot.claimed = true;  // late, should it arrive; failed, should it not
    how.prefetch = model::PrefetchOutcome::kLate;
  }
  for (const auto& [tag, load] : loads_) {
    if (load.key == claim.key && (load.prefetch || load.fill)) reader_->Promote(tag);  // awaited
  }
}

absl::StatusOr<bool> ExpertCache::StartClaimLocked(ExpertClaim& claim, int layer) {
  Tier& pool = PoolOf(claim);
  const int slot = AllocateSlotLocked(pool, layer);
  if (slot < 0) return false;
  pool.slots[slot].pins = 1;
  absl::Status started = StartLoadLocked(claim.key, slot);
  if (!started.ok()) {
    pool.slots[slot].state = SlotState::kFree;
    pool.Drop(claim.key);
    ReleaseSlotLocked(pool, slot);
    claim.finished = true;
    return started;
  }
  claim.slot = slot;
  claim.served.bytes_staged = pool.slot_bytes;
  claim.served.source = pool.slots[slot].state == SlotState::kReady
                            ? model::ExpertSource::kHost  // copied from the host tier already
                            : model::ExpertSource::kDisk;
  return true;
}

ExpertCache::ClaimState ExpertCache::ClaimStateLocked(ExpertClaim& claim, absl::Status* error) {
  if (claim.slot < 0) return ClaimState::kWaitingForSlot;
  auto failure = failures_.find(claim.key);
  if (failure != failures_.end()) {
    *error = WithStoreFault(absl::Status(failure->second.code, failure->second.message),
                            failure->second.fault);
    failures_.erase(failure);
    return ClaimState::kFailed;
  }
  Slot& slot = PoolOf(claim).slots[claim.slot];
  if (slot.state != SlotState::kReady || !(slot.key == claim.key)) return ClaimState::kLoading;
  // A late prefetch that failed was read again for this use: it served nothing.
  if (claim.served.prefetch == model::PrefetchOutcome::kLate && !slot.arrived_late)
    claim.served.prefetch = model::PrefetchOutcome::kNone;
  slot.arrived_late = false;
  return ClaimState::kReady;
}

bool ExpertCache::ClaimOnHostLocked(ExpertClaim& claim, const ExpertUse& use) {
  const HostComputeOptions& host_compute = options_.host_compute;
  if (!host_compute.enabled || claim.fallback_pool || use.tokens == 0 ||
      (!host_compute.bitwise_equal && !use.all_inexact) || device_.index.contains(claim.key)) {
    return false;
  }
  auto it = host_->index.find(claim.key);
  if (it == host_->index.end() || host_->slots[it->second].state != SlotState::kReady) return false;
  if (!EstimateHostCompute(host_compute, device_.slot_bytes, copy_bytes_queued_, use.tokens)
           .host_is_faster()) {
    return false;
  }
  claim.host_pool = true;
  claim.slot = it->second;
  ++host_->slots[claim.slot].pins;
  ++host_->counters.hits;
  host_->policy->Touch(claim.key, ++tick_);
  claim.served.source = model::ExpertSource::kHost;
  claim.served.on_host = true;
  claim.served.precision = host_->precision;
  ++host_computes_;
  return true;
}

void ExpertCache::ReleaseClaimLocked(ExpertClaim& claim) {
  if (claim.slot >= 0 && staged_ && !claim.host_pool) {
    // Whatever the use queued on the compute stream reads the slot until here.
    absl::StatusOr<kernels::Event> read = options_.backend->compute().Record();
    if (read.ok()) PoolOf(claim).slots[claim.slot].last_read = *std::move(read);
  }
  if (claim.slot >= 0) ReleaseSlotLocked(PoolOf(claim), claim.slot);
  claim.slot = -1;
  claim.finished = true;
}

absl::StatusOr<ExpertHandle> ExpertCache::Acquire(int layer, int expert, Precision precision) {
  const model::ModelConfig& config = store_->config();
  if (layer < 0 || layer >= config.num_layers || !config.IsMoeLayer(layer) || expert < 0 ||
      expert >= config.num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("no routed expert ", expert, " at layer ", layer, " in this model"));
  }
  std::lock_guard lock(mutex_);
  if (DevicePool(precision).precision != precision) {
    return absl::InvalidArgumentError(absl::StrCat("the cache keeps no ", PrecisionName(precision),
                                                   " copies (it serves ",
                                                   PrecisionName(device_.precision), ")"));
  }
  ExpertHandle handle;
  handle.cache_ = this;
  handle.claim_.key = ExpertKey{layer, expert, precision};
  handle.claim_.fallback_pool = &DevicePool(precision) != &device_;
  ClaimLocked(handle.claim_);
  if (handle.claim_.slot < 0) {
    absl::StatusOr<bool> started = StartClaimLocked(handle.claim_, layer);
    if (!started.ok()) {
      handle.cache_ = nullptr;
      return started.status();
    }
  }
  return handle;
}

ExpertHandle& ExpertHandle::operator=(ExpertHandle&& other) noexcept {
  if (this != &other) {
    Release();
    cache_ = other.cache_;
    claim_ = other.claim_;
    other.cache_ = nullptr;
  }
  return *this;
}

bool ExpertHandle::ready() const {
  if (cache_ == nullptr || claim_.slot < 0) return false;
  std::lock_guard lock(cache_->mutex_);
  const ExpertCache::Slot& slot = cache_->PoolOf(claim_).slots[claim_.slot];
  return slot.state == ExpertCache::SlotState::kReady && slot.key == claim_.key;
}

absl::Status ExpertHandle::Wait() {
  if (cache_ == nullptr) return absl::FailedPreconditionError("an empty or released handle");
  if (claim_.finished) return absl::FailedPreconditionError("the read failed; release the handle");
  std::unique_lock lock(cache_->mutex_);
  const auto start = std::chrono::steady_clock::now();
  bool waited = false, counted_waiting = false;
  absl::Status result;
  while (true) {
    if (claim_.slot < 0) {
      absl::StatusOr<bool> started = cache_->StartClaimLocked(claim_, claim_.key.layer);
      if (!started.ok()) {
        result = started.status();
        break;
      }
      if (!*started && !counted_waiting) {
        ++cache_->uses_waiting_for_slots_;  // no prefetch takes a slot before this use has one
        counted_waiting = true;
      }
    }
    absl::Status error;
    const ExpertCache::ClaimState state = cache_->ClaimStateLocked(claim_, &error);
    if (state == ExpertCache::ClaimState::kReady) break;
    if (state == ExpertCache::ClaimState::kFailed) {
      claim_.finished = true;  // its slot was freed with the failed read; the pin goes on Release
      result = error;
      break;
    }
    waited = true;
    cache_->changed_.wait(lock);
  }
  if (counted_waiting) --cache_->uses_waiting_for_slots_;
  if (waited) {
    claim_.served.wait_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    cache_->wait_seconds_ += claim_.served.wait_seconds;
  }
  return result;
}

kernels::Event ExpertHandle::ready_event() const {
  if (cache_ == nullptr || claim_.slot < 0) return {};
  std::lock_guard lock(cache_->mutex_);
  return cache_->PoolOf(claim_).slots[claim_.slot].ready;
}

model::ExpertWeights ExpertHandle::weights() const {
  if (cache_ == nullptr || claim_.slot < 0) return {};
  ExpertCache::Tier& pool = cache_->PoolOf(claim_);
  return ExpertWeightsInBlob(*pool.layout, pool.SlotData(claim_.slot));
}

void ExpertHandle::Release() {
  if (cache_ == nullptr) return;
  {
    std::lock_guard lock(cache_->mutex_);
    cache_->ReleaseClaimLocked(claim_);
    cache_->IssuePrefetchesLocked();
  }
  cache_->changed_.notify_all();  // a claim waiting for a slot may take this one
  cache_ = nullptr;
}

absl::Status ExpertCache::ForEachExpert(int layer, const std::vector<int>& experts,
                                        const model::ExpertCompute& compute,
                                        const std::vector<PrefetchHint>& hints,
                                        const std::vector<ExpertUse>& uses) {
  std::unique_lock lock(mutex_);
  device_.policy->AtLayer(layer);
  if (fallback_ != nullptr) fallback_->policy->AtLayer(layer);
  if (host_ != nullptr) host_->policy->AtLayer(layer);
  CancelUnneededLocked(layer, experts);
  // One claim per expert, on its full copy or (a fallback) its fallback copy.
  std::vector<ExpertClaim> claims(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) {
    const int e = experts[i];
    ExpertClaim& claim = claims[i];
    claim.key = FullKey(layer, e);
    auto it = device_.index.find(claim.key);
    const bool full_ready =
        it != device_.index.end() && device_.slots[it->second].state == SlotState::kReady;
    const ExpertUse use = i < uses.size() ? uses[i] : ExpertUse{};
    if (fallback_ != nullptr && !full_ready && use.may_fall_back) {
      // A resident fallback copy serves at once; else a full copy already on its way; else
      // the fallback copy is read (fewer bytes than the full one).
      const ExpertKey low{layer, e, fallback_->precision};
      auto low_it = fallback_->index.find(low);
      const bool low_ready = low_it != fallback_->index.end() &&
                             fallback_->slots[low_it->second].state == SlotState::kReady;
      if (low_ready || it == device_.index.end()) {
        claim.key = low;
        claim.fallback_pool = true;
      }
    }
    if (ClaimOnHostLocked(claim, use)) continue;
    ClaimLocked(claim);
  }
  absl::Status first_error;
  size_t remaining = experts.size();
  // Starts reads for claims still waiting for slots, in order, while slots can be had.
  auto start_waiting = [&] {
    size_t still_waiting = 0;
    for (ExpertClaim& claim : claims) {
      if (claim.finished || claim.slot >= 0) continue;
      if (still_waiting == 0 && first_error.ok()) {
        absl::StatusOr<bool> started = StartClaimLocked(claim, layer);
        if (!started.ok()) {
          first_error = started.status();
          --remaining;
          continue;
        }
        if (*started) continue;
      }
      ++still_waiting;
    }
    uses_waiting_for_slots_ = still_waiting;
  };
  start_waiting();
  // This layer's experts are pinned or on their way: now the later layers may have slots.
  QueuePrefetchesLocked(hints);
  IssuePrefetchesLocked();

  while (remaining > 0) {
    if (!first_error.ok()) {
      // Claims that never had a slot have nothing to drain.
      for (ExpertClaim& claim : claims) {
        if (!claim.finished && claim.slot < 0) {
          claim.finished = true;
          --remaining;
        }
      }
      if (remaining == 0) break;
    }
    ExpertClaim* next = nullptr;
    bool failed = false;
    auto wait_start = std::chrono::steady_clock::now();
    bool waited = false;
    while (next == nullptr) {
      for (ExpertClaim& claim : claims) {
        if (claim.finished) continue;
        absl::Status error;
        const ClaimState state = ClaimStateLocked(claim, &error);
        if (state == ClaimState::kReady || state == ClaimState::kFailed) {
          next = &claim;
          if (state == ClaimState::kFailed) {
            failed = true;
            if (first_error.ok()) first_error = error;
          }
          break;
        }
      }
      if (next != nullptr) break;
      start_waiting();
      bool any_ready = false;
      for (ExpertClaim& claim : claims) {
        any_ready |= !claim.finished && claim.slot >= 0 &&
                     PoolOf(claim).slots[claim.slot].state == SlotState::kReady;
      }
      if (any_ready) continue;
      waited = true;
      changed_.wait(lock);
    }
    double waited_seconds = 0;
    if (waited) {
      waited_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
      wait_seconds_ += waited_seconds;
      if (!failed && next->served.prefetch == model::PrefetchOutcome::kLate)
        prefetch_wait_seconds_ += waited_seconds;
    }
    --remaining;
    if (!failed && first_error.ok()) {
      Tier& pool = PoolOf(*next);
      model::ExpertWeights weights = ExpertWeightsInBlob(*pool.layout, pool.SlotData(next->slot));
      model::ExpertServed how = next->served;
      how.wait_seconds = waited_seconds;
      how.ready = pool.slots[next->slot].ready;
      if (how.fallback) {
        (pool.precision == Precision::kInt8 ? fallbacks_int8_ : fallbacks_int4_)++;
        // The full copy is read when the disk is idle (an upgrade): the full pool fills with the
        // experts in use rather than waiting for prefetches.
        const ExpertKey full = FullKey(layer, next->key.expert);
        if (std::find(upgrades_.begin(), upgrades_.end(), full) == upgrades_.end()) {
          upgrades_.push_back(full);
          // Bounded: the oldest wishes go first (the full pool could not take more anyway).
          while (upgrades_.size() > device_.slots.size()) upgrades_.pop_front();
        }
      }
      lock.unlock();
      absl::Status computed = compute(next->key.expert, weights, how);
      lock.lock();
      if (!computed.ok() && first_error.ok()) first_error = computed;
    }
    ReleaseClaimLocked(*next);
    start_waiting();
    IssuePrefetchesLocked();
  }
  uses_waiting_for_slots_ = 0;
  RestoreLandingSlotsLocked();
  IssuePrefetchesLocked();
  return first_error;
}

std::vector<std::vector<bool>> ExpertCache::DeviceResidency() const {
  const model::ModelConfig& config = store_->config();
  std::vector<std::vector<bool>> resident(
      static_cast<size_t>(config.num_layers),
      std::vector<bool>(static_cast<size_t>(config.num_experts)));
  std::lock_guard lock(mutex_);
  for (const Slot& slot : device_.slots) {
    if (slot.state == SlotState::kReady)
      resident[static_cast<size_t>(slot.key.layer)][static_cast<size_t>(slot.key.expert)] = true;
  }
  return resident;
}

std::vector<double> StageSecondsBuckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
          0.025,   0.05,   0.1,     0.25,   0.5,   1,      2.5,   10};
}

CacheCounters ExpertCache::counters() const {
  std::lock_guard lock(mutex_);
  CacheCounters c;
  c.device = device_.counters;
  c.device.resident = 0;
  for (const Slot& slot : device_.slots)
    c.device.resident += slot.state == SlotState::kReady ? 1 : 0;
  if (host_ != nullptr) {
    c.host = host_->counters;
    c.host.resident = 0;
    for (const Slot& slot : host_->slots)
      c.host.resident += slot.state == SlotState::kReady ? 1 : 0;
  }
  if (fallback_ != nullptr) {
    c.fallback = fallback_->counters;
    c.fallback.resident = 0;
    for (const Slot& slot : fallback_->slots)
      c.fallback.resident += slot.state == SlotState::kReady ? 1 : 0;
    c.fallback.budget_bytes = c.fallback.slots * fallback_->slot_bytes;
  }
  c.fallbacks_int8 = fallbacks_int8_;
  c.fallbacks_int4 = fallbacks_int4_;
  c.host_computes = host_computes_;
  c.copy_bytes_queued = copy_bytes_queued_;
  c.floor_reads = floor_reads_;
  c.upgrade_reads = upgrade_reads_;
  c.ssd_reads = ssd_reads_;
  c.ssd_bytes = ssd_bytes_;
  c.device.budget_bytes = c.device.slots * device_.slot_bytes;
  if (host_ != nullptr) c.host.budget_bytes = c.host.slots * host_->slot_bytes;
  c.prefetch_reads = prefetch_reads_;
  c.prefetch_failures = prefetch_failures_;
  c.prefetch_issued = prefetch_issued_;
  c.prefetch_useful = prefetch_useful_;
  c.prefetch_late = prefetch_late_;
  c.prefetch_wasted = prefetch_wasted_;
  c.prefetch_cancelled = prefetch_cancelled_;
  c.cancelled_read_bytes = cancelled_read_bytes_;
  c.prefetch_wait_seconds = prefetch_wait_seconds_;
  for (const Slot& slot : device_.slots) c.prefetch_pending += slot.prefetched ? 1 : 0;
  c.failed_io = failed_io_;
  c.failed_short_reads = failed_short_reads_;
  c.failed_checksums = failed_checksums_;
  c.failed_reads = failed_io_ + failed_short_reads_ + failed_checksums_;
  c.wait_seconds = wait_seconds_;
  c.stage_from_ssd = stage_from_ssd_.Snapshot();
  c.stage_from_host = stage_from_host_.Snapshot();
  return c;
}

namespace {

class SharedCacheProvider final : public model::ExpertProvider {
 public:
  SharedCacheProvider(std::shared_ptr<ExpertCache> cache, std::shared_ptr<Prefetcher> prefetcher)
      : cache_(std::move(cache)), prefetcher_(std::move(prefetcher)) {}
  absl::Status ForEachExpert(int layer, const std::vector<int>& experts,
                             const model::ExpertCompute& compute) override {
    absl::Status status = cache_->ForEachExpert(layer, experts, compute, hints_);
    hints_.clear();
    return status;
  }
  void Routed(const model::LayerRouting& routing) override {
    if (prefetcher_ != nullptr) hints_ = prefetcher_->Plan(routing);
    cache_->Routed(routing);
  }
  int lookahead_layers() const override {
    return prefetcher_ == nullptr ? 0 : prefetcher_->lookahead_layers();
  }
  bool serves_device_memory() const override { return cache_->serves_device_memory(); }
  StepPrefetches TakeStepPrefetches() override {
    // The step is over: what is still queued was for its layers. Dropping it also means no
    // prefetch starts, and none evicts, between steps, so every one is charged to a step.
    cache_->CancelPrefetches();
    const CacheCounters now = cache_->counters();
    StepPrefetches step{now.prefetch_issued - issued_, now.prefetch_wasted - wasted_};
    issued_ = now.prefetch_issued;
    wasted_ = now.prefetch_wasted;
    return step;
  }

 private:
  std::shared_ptr<ExpertCache> cache_;
  std::shared_ptr<Prefetcher> prefetcher_;
  std::vector<PrefetchHint> hints_;   // from the last Routed, for the ForEachExpert after it
  uint64_t issued_ = 0, wasted_ = 0;  // the cache's counts at the last TakeStepPrefetches
};

}  // namespace

std::unique_ptr<model::ExpertProvider> SharedProvider(std::shared_ptr<ExpertCache> cache,
                                                      std::shared_ptr<Prefetcher> prefetcher) {
  return std::make_unique<SharedCacheProvider>(std::move(cache), std::move(prefetcher));
}

}  // namespace moed::cache
