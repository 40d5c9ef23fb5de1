// Keep large CPU tensor buffers for reuse instead of handing them back to the OS at every free.
//
// Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages
// from mmap and unmaps them again on free. A training step at 16k tokens allocates gigabytes of
// such buffers (activations, gradients, retention scores), so every step the kernel zero-fills
// and maps each page again on first touch: ~170,000 page faults per step for our d256 model,
// and a matmul writing into a fresh 64 MiB output runs at 206 GFLOP/s instead of 329 into a
// reused one (measured; docs/performance.md).
//
// How: an at::Allocator placed in front of PyTorch's CPU allocator. While a cache is switched
// on, allocations of at least `min_bytes` come from c10::CPUCachingAllocator (PyTorch's own
// exact-size block cache: a freed block waits for the next request of the same size); every
// other allocation, and everything while no cache is on, goes to the allocator that was there
// before. Switching the cache off frees the blocks it holds; blocks still in use when it is
// switched off are freed normally when their tensors die. A training loop with fixed shapes
// asks for the same sizes every step, so after the first step it allocates nothing new.
//
// The plain reference is PyTorch's own allocator: with the cache off (the default) nothing here
// is on the allocation path except one relaxed atomic load.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

// PyTorch's wheels ship the caching allocator's header only from some 2.x release on (2.2's do
// not). Without it the cache is never on: enabling it answers false, as when another allocator
// outranks ours, and everything else in the extension builds as usual.
#if __has_include(<c10/mobile/CPUCachingAllocator.h>)
#define YARETNET_CPU_CACHE 1
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/mobile/CPUCachingAllocator.h>

#include <pthread.h>

#include <atomic>
#include <mutex>
#endif

namespace {

#ifdef YARETNET_CPU_CACHE

class CachingFront final : public c10::Allocator {
 public:
  explicit CachingFront(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t n) override {
    if (n > 0 && n >= min_bytes_.load(std::memory_order_relaxed)) {
      std::lock_guard<std::mutex> guard(mutex_);
      if (cache_ != nullptr) {
        void* ptr = cache_->allocate(n);
        c10::profiledCPUMemoryReporter().New(ptr, n);
        return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
    return fallback_->allocate(n);
  }

  // Every block this front ever handed out, and anything c10::alloc_cpu made, can be freed here:
  // the cache (if on) keeps what it allocated and frees the rest.
  static void release(void* ptr) {
    if (ptr == nullptr) {
      return;
    }
    c10::profiledCPUMemoryReporter().Delete(ptr);
    std::lock_guard<std::mutex> guard(mutex_);
    if (cache_ != nullptr) {
      cache_->free(ptr);
    } else {
      c10::CPUCachingAllocator::record_free(ptr);
      c10::free_cpu(ptr);
    }
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  // Pure virtual in the releases that have it; not declared `override`, so that releases whose
  // Allocator has no copy_data still build.
  void copy_data(void* dest, const void* src, std::size_t count) const {
    std::memcpy(dest, src, count);
  }

  // Switch the cache on for allocations of at least `min_bytes` (a new cache if none is on).
  void enable(int64_t min_bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (cache_ == nullptr) {
      cache_ = new c10::CPUCachingAllocator();
    }
    min_bytes_.store(static_cast<size_t>(min_bytes), std::memory_order_relaxed);
  }

  // fork() while another thread holds the lock would hand the child a lock nobody releases: take
  // it around the fork (the cache's own lock is only ever taken under this one).
  static void lock_for_fork() { mutex_.lock(); }
  static void unlock_after_fork() { mutex_.unlock(); }

  // Switch it off: the blocks waiting in the cache go back to the OS now.
  void disable() {
    std::lock_guard<std::mutex> guard(mutex_);
    min_bytes_.store(SIZE_MAX, std::memory_order_relaxed);
    delete cache_;  // its destructor frees the cached (unused) blocks
    cache_ = nullptr;
  }

 private:
  c10::Allocator* fallback_;
  std::atomic<size_t> min_bytes_{SIZE_MAX};
  static std::mutex mutex_;
  static c10::CPUCachingAllocator* cache_;
};

std::mutex CachingFront::mutex_;
c10::CPUCachingAllocator* CachingFront::cache_ = nullptr;

// Installed once, on the first enable, and never removed: tensors allocated through it may
// outlive any cache, and their storages keep a pointer to the allocator that made them.
CachingFront* front() {
  static CachingFront* instance = [] {
    auto* made = new CachingFront(c10::GetCPUAllocator());
    pthread_atfork(&CachingFront::lock_for_fork, &CachingFront::unlock_after_fork,
                   &CachingFront::unlock_after_fork);
    c10::SetCPUAllocator(made, /*priority=*/1);
    return made;
  }();
  return instance;
}

// Returns whether the front is PyTorch's CPU allocator now (another allocator registered with a
// higher priority wins, and then nothing is cached).
bool cpu_memory_cache_enable(int64_t min_bytes) {
  TORCH_CHECK(min_bytes >= 1, "min_bytes must be >= 1, got ", min_bytes);
  CachingFront* made = front();
  made->enable(min_bytes);
  return c10::GetCPUAllocator() == made;
}

void cpu_memory_cache_disable() { front()->disable(); }

#else  // no caching allocator in this PyTorch

bool cpu_memory_cache_enable(int64_t min_bytes) {
  TORCH_CHECK(min_bytes >= 1, "min_bytes must be >= 1, got ", min_bytes);
  return false;
}

void cpu_memory_cache_disable() {}

#endif

}  // namespace

namespace {
bool cpu_memory_cache_built() {
#ifdef YARETNET_CPU_CACHE
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("cpu_memory_cache_enable(int min_bytes) -> bool", &cpu_memory_cache_enable);
  m.def("cpu_memory_cache_disable() -> ()", &cpu_memory_cache_disable);
  m.def("cpu_memory_cache_built() -> bool", &cpu_memory_cache_built);
}
