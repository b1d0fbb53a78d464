// The CPU instruction-set choice, made in one place. The CPU's level is detected once; tests
// lower it with lori::_set_cpu_isa to run every vector path on one machine. Kernels never test
// the CPU themselves: they read the dispatch table below, which says for each pass which
// implementation the current level runs.
#pragma once
#include <c10/util/string_view.h>

#include <string>

namespace lori::cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// AVX2 means AVX2 + FMA + F16C; AVX-512 means F/DQ/BW/VL + BMI2 on top of AVX2.
Isa detected_isa();
// min(detected, the cap set by set_cpu_isa).
Isa cpu_isa();
// "auto" | "avx512" | "avx2" | "generic": caps the level ("auto" and "avx512" lift the cap;
// the level never exceeds what the CPU has). Returns the previous level's name.
std::string set_cpu_isa(c10::string_view isa);
const char* isa_name(Isa isa);

// Which implementation each pass runs. One row per level (isa.cpp); a pass whose fastest
// variant needs less than the level lists the variant it runs.
struct CpuPaths {
  bool generic_ops;  // sparse_delta & co. take the ATen path (delta_generic.cpp)
  Isa philox;        // Philox words (agen.cpp, agen_avx512.cpp)
  Isa a_floats;      // Philox words -> fp32 A elements (agen.cpp)
  Isa x_dot;         // x -> h, direct A-row dots (delta_common.cpp, delta_common_avx512.cpp)
  Isa b_prefill;     // h -> y, T > 4 tokens (b_stage.h, b_stage_avx512.cpp)
  Isa b_decode;      // h -> y, T <= 4 tokens (b_stage.h, b_stage_avx512.cpp)
  Isa bwd_decode;    // backward over B, T <= 4 tokens, rank <= 32 (sparse_delta_bwd*.cpp)
};
const CpuPaths& cpu_paths();

}  // namespace lori::cpu
