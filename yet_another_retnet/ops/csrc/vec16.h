// Sixteen floats as one GCC/Clang vector: one AVX-512 register where the build has it (two AVX2
// registers elsewhere). Loads and stores through memcpy, so any alignment is fine. Shared by the
// kernels that vectorise by hand (chunk_kernels.cpp, norm_gate.cpp).
#pragma once

#include <cstring>

namespace yaretnet_cpu {

typedef float vec16 __attribute__((vector_size(64)));

inline vec16 load(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace yaretnet_cpu
