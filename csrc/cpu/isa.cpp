#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>

namespace lori::cpu {

namespace {

std::atomic<int> g_isa_cap{static_cast<int>(Isa::kAvx512)};

constexpr CpuPaths kPaths[] = {
    // generic: everything on the ATen / scalar path.
    {true, Isa::kGeneric, Isa::kGeneric, Isa::kGeneric, Isa::kGeneric, Isa::kGeneric,
     Isa::kGeneric},
    // avx2
    {false, Isa::kAvx2, Isa::kAvx2, Isa::kAvx2, Isa::kAvx2, Isa::kAvx2, Isa::kAvx2},
    // avx512: A's fp32 elements stay on AVX2 (the conversion is not the bottleneck).
    {false, Isa::kAvx512, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512, Isa::kAvx512, Isa::kAvx512},
};

}  // namespace

Isa detected_isa() {
  static const Isa isa = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("bmi2")) {
      return Isa::kAvx512;
    }
    return avx2 ? Isa::kAvx2 : Isa::kGeneric;
  }();
  return isa;
}

Isa cpu_isa() {
  return static_cast<Isa>(std::min(static_cast<int>(detected_isa()),
                                   g_isa_cap.load(std::memory_order_relaxed)));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

std::string set_cpu_isa(c10::string_view isa) {
  const Isa before = cpu_isa();
  Isa cap;
  if (isa == "auto" || isa == "avx512") {
    cap = Isa::kAvx512;
  } else if (isa == "avx2") {
    cap = Isa::kAvx2;
  } else if (isa == "generic") {
    cap = Isa::kGeneric;
  } else {
    TORCH_CHECK_VALUE(false, "_set_cpu_isa: isa must be auto, avx512, avx2 or generic, got '",
                      std::string(isa), "'");
  }
  g_isa_cap.store(static_cast<int>(cap));
  return isa_name(before);
}

const CpuPaths& cpu_paths() { return kPaths[static_cast<int>(cpu_isa())]; }

}  // namespace lori::cpu
