// vstar-kernels: the GEMM engines of the CPU kernels' block products (QK^T and PV forward; S, dP, dQ, dK, dV
// backward), and which one runs where.
//
//   engine          operands                  where it runs (auto)
//   brgemm_native   bf16/fp16 as given, fp32  bf16/fp16 on CPUs where cpublas::could_pack says oneDNN packs B for
//                   accumulation; B packed    them (AMX: Sapphire Rapids and later): the products run on AMX tiles,
//                   (VNNI) in blocks of <= 64 as PyTorch's SDPA runs them. Forced on other CPUs it runs unpacked
//                   columns                   (cpublas' fallback: MKL's bf16/fp16 GEMM), which tests that path here.
//   brgemm_f32      fp32 (bf16/fp16 widened   fp32 on AVX-512 builds where the engine works; bf16/fp16 where it
//                   once per tile)            cannot pack: without AMX, MKL's bf16 GEMM ran 2.2x and its fp16 GEMM 5x
//                                             slower than the fp32 ukernel on a 64x64x64 tile (AMD EPYC, AVX-512).
//   microkernel     fp32                      where cpublas::brgemm does not run (other architectures, torch builds
//                                             without oneDNN's ukernel), on AVX2 builds (3-6% faster than oneDNN's
//                                             AVX2 brgemm, cpu_gemm.cpp) and for products under kEngineMinMacs: the
//                                             hand-written at::vec FMA kernel of cpu_tiles.h.
// The first two are at::native::cpublas::brgemm (PyTorch's own engine: oneDNN's brgemm ukernel; SDPA's CPU flash
// kernel multiplies its blocks with it); the bias, the row max and the softmax stay fp32 in every engine.
// VSTAR_KERNELS_CPU_GEMM (read by the Python side, passed through set_gemm_override) forces one: auto, brgemm_native,
// brgemm_f32 or microkernel.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cpu_tiles.h"

namespace vstar {
namespace cpu {

enum class GemmEngine : int { kMicroKernel = 0, kBrgemmF32 = 1, kBrgemmNative = 2 };

// The engine and B layout of one dtype's products for this call (cpu_gemm.cpp: probes the engine once, honours the
// override).
struct GemmPlan {
  GemmEngine engine;
  bool packed;  // brgemm_native: B in oneDNN's VNNI layout (cpublas::pack), blocks of kPackColumns columns
  bool small_on_microkernel = false;  // auto: fp32 products below kEngineMinMacs on the micro-kernel
  bool native() const { return engine == GemmEngine::kBrgemmNative; }
};

// Below this many multiply-adds an fp32 product runs faster on the micro-kernel than through cpublas::brgemm's
// per-call kernel lookup (AMD EPYC, AVX-512: 16x16x64 173 vs 193 ns, 16x64x64 509 vs 532 ns, 64x64x64 2049 vs
// 1972 ns; relative TAR at F = 16, d = 64 ran 0.97x SDPA on the micro-kernel, 1.07x on brgemm), so auto keeps them
// there; forcing brgemm_f32 sends every product to the engine.
constexpr int64_t kEngineMinMacs = 64 * 64 * 32;

GemmPlan gemm_plan(at::ScalarType dtype);
// "auto" (the default), "brgemm_native", "brgemm_f32" or "microkernel"; an engine this CPU cannot run raises.
void set_gemm_override(const std::string& name);
// key=value pairs separated by ';': whether oneDNN packs (AMX), what each engine runs, the override, the engine of
// each dtype.
std::string gemm_info();

constexpr int64_t kEngineBlock = 256;  // the longest reduction and widest product of one cpublas::brgemm call
constexpr int64_t kPackColumns = 64;  // oneDNN packs B blocks of 16, 32, 48 or 64 columns (128 failed)
constexpr int64_t kPackAlign = 16;    // B's columns are padded to this in the native engine

inline const char* engine_name(GemmEngine e) {
  switch (e) {
    case GemmEngine::kBrgemmNative: return "brgemm_native";
    case GemmEngine::kBrgemmF32: return "brgemm_f32";
    default: return "microkernel";
  }
}

// C (m x n, row stride ldc) (+)= A (m x k, lda) B (k x n, ldb), all fp32, on the plan's engine (brgemm_f32 or the
// micro-kernel; n is a multiple of kVec). k == 0 gives zeros (or leaves C).
inline void gemm_f32(const GemmPlan& plan, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                     int64_t ldc, int64_t m, int64_t k, int64_t n, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, 0.f);
    return;
  }
  if (plan.engine == GemmEngine::kMicroKernel || (plan.small_on_microkernel && m * n * k < kEngineMinMacs)) {
    if (accumulate) gemm_rows<true>(a, lda, b, ldb, c, ldc, m, k, n);
    else gemm_rows<false>(a, lda, b, ldb, c, ldc, m, k, n);
    return;
  }
  // the ukernel wants small blocks: a 128 x 128 x 8192 product ran at 25 GMAC/s whole and at the micro-kernel's 93
  // in blocks (AMD EPYC, AVX-512), so long reductions and wide products go in blocks of kEngineBlock
  for (int64_t n0 = 0; n0 < n; n0 += kEngineBlock) {
    const int64_t width = std::min(kEngineBlock, n - n0);
    for (int64_t k0 = 0; k0 < k; k0 += kEngineBlock)
      at::native::cpublas::brgemm(m, width, std::min(kEngineBlock, k - k0), lda, ldb, ldc, accumulate || k0 > 0,
                                  a + k0, b + k0 * ldb + n0, c + n0, /*is_vnni=*/false);
  }
}

// The B operand of the native engine: a (k x n) row-major matrix in op_t, kept as is (unpacked) or packed by
// cpublas::pack into blocks of kPackColumns columns, each block k_even x width with row stride = width (VNNI pairs
// of rows interleaved). k is padded to even with zero rows, n to kPackAlign with zero columns by the caller.
template <typename op_t>
struct NativeB {
  const op_t* data;
  int64_t ld;      // unpacked: row stride of the k x n matrix
  int64_t k, n;    // k even, n a multiple of kPackAlign
  bool packed;
  // The block holding columns [n0, n0 + width) (n0 a multiple of kPackColumns when packed) and its row stride;
  // `row` skips that many rows (even when packed).
  const op_t* block(int64_t n0, int64_t row = 0) const {
    return packed ? data + n0 * k + row * std::min(kPackColumns, n - n0) : data + row * ld + n0;
  }
  int64_t block_ld(int64_t n0) const { return packed ? std::min(kPackColumns, n - n0) : ld; }
};

// Packs src (k x n row-major, stride ld_src, op_t) into dst as NativeB wants it; returns the view. When !packed the
// caller's matrix itself is the view (dst unused).
template <typename op_t>
inline NativeB<op_t> pack_native_b(const op_t* src, int64_t ld_src, int64_t k, int64_t n, bool packed, op_t* dst) {
  if (!packed) return {src, ld_src, k, n, false};
  const at::ScalarType dt = c10::CppTypeToScalarType<op_t>::value;
  for (int64_t n0 = 0; n0 < n; n0 += kPackColumns) {
    const int64_t width = std::min(kPackColumns, n - n0);
    at::native::cpublas::pack(k, width, ld_src, width, dt, dt, src + n0, dst + n0 * k);
  }
  return {dst, n, k, n, true};
}

// C (m x n, ldc, fp32) (+)= A (m x k, lda, op_t) B (NativeB), block by block of B's columns; `row0` (even when
// packed) starts at that row of B, k rows used.
template <typename op_t>
inline void gemm_native(const op_t* a, int64_t lda, const NativeB<op_t>& b, float* c, int64_t ldc, int64_t m,
                        int64_t k, bool accumulate, int64_t row0 = 0, int64_t n = -1) {
  n = n < 0 ? b.n : n;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, 0.f);
    return;
  }
  const int64_t step = b.packed ? kPackColumns : kEngineBlock;
  for (int64_t n0 = 0; n0 < n; n0 += step) {
    const int64_t width = std::min(step, n - n0);
    for (int64_t k0 = 0; k0 < k; k0 += kEngineBlock)  // kEngineBlock is even: each block starts a VNNI row pair
      at::native::cpublas::brgemm(m, width, std::min(kEngineBlock, k - k0), lda, b.block_ld(n0),
                                  ldc, accumulate || k0 > 0, a + k0, b.block(n0, row0 + k0), c + n0,
                                  /*is_vnni=*/b.packed);
  }
}

// Calls fn(plan, op_t{}) with this call's plan for scalar_t and its operand type: scalar_t itself on brgemm_native,
// float on the other engines (bf16/fp16 widened while packing). The kernels are templates on both types.
template <typename scalar_t, typename Fn>
inline void with_operand_type(Fn&& fn) {
  const GemmPlan plan = gemm_plan(c10::CppTypeToScalarType<scalar_t>::value);
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (plan.native()) return fn(plan, scalar_t{});
  }
  fn(plan, float{});
}

// After a thread's last brgemm: releases the AMX tile state (what SDPA's kernel does at the end of its loops).
inline void release_engine(const GemmPlan& plan) {
  if (plan.engine != GemmEngine::kMicroKernel) at::native::cpublas::brgemm_release(plan.packed);
}

}  // namespace cpu
}  // namespace vstar
