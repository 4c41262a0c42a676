// vstar-kernels: which GEMM engine the CPU kernels' products run on (cpu_gemm.h has the table and the reasons).
#include "cpu_gemm.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <sstream>
#include <vector>

namespace vstar {
namespace cpu {
namespace {

// What this CPU and this torch build can run, found once by multiplying a small known product on each engine.
struct EngineSupport {
  bool f32 = false;                       // cpublas::brgemm on fp32
  bool native_bf16 = false, native_f16 = false;  // cpublas::brgemm on bf16 / fp16 operands (packed or not)
  bool pack_bf16 = false, pack_f16 = false;      // cpublas::could_pack: oneDNN packs B (AMX)
};

// Whether `packed` (or unpacked) native products give exact results in every way the kernels call them: B of two
// column blocks (64 + 16), a product starting at an even row of B with fewer rows than it holds, and one stopping
// short inside a block (N = 32 of a 64-column block). Small integers: exact in every engine. fp32 runs brgemm itself.
template <typename op_t>
bool product_is_right(bool packed) {
  constexpr int64_t m = 3, k = 8, n = 80;
  std::vector<op_t> a(m * k), b(k * n), bp(k * n);
  for (int64_t i = 0; i < m * k; ++i) a[i] = static_cast<op_t>(static_cast<float>(i % 5) - 2.f);
  for (int64_t i = 0; i < k * n; ++i) b[i] = static_cast<op_t>(static_cast<float>(i % 7) - 3.f);
  // C = A[:, 0:rows] B[row0:row0 + rows, 0:cols]
  auto check = [&](const std::vector<float>& c, int64_t row0, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        float want = 0.f;
        for (int64_t x = 0; x < rows; ++x)
          want += static_cast<float>(a[i * k + x]) * static_cast<float>(b[(row0 + x) * n + j]);
        if (c[i * n + j] != want) return false;
      }
    return true;
  };
  std::vector<float> full(m * n, 0.f), skipped(m * n, 0.f), short_n(m * n, 0.f);
  try {
    if constexpr (std::is_same_v<op_t, float>) {
      at::native::cpublas::brgemm(m, n, k, k, n, n, false, a.data(), b.data(), full.data(), false);
      at::native::cpublas::brgemm_release(false);
      return check(full, 0, k, n);
    } else {
      const NativeB<op_t> view = pack_native_b(b.data(), n, k, n, packed, bp.data());
      gemm_native(a.data(), k, view, full.data(), n, m, k, false);
      gemm_native(a.data(), k, view, skipped.data(), n, m, 4, false, /*row0=*/2);
      gemm_native(a.data(), k, view, short_n.data(), n, m, k, false, 0, /*n=*/32);
      at::native::cpublas::brgemm_release(packed);
    }
  } catch (const std::exception&) {
    return false;
  }
  return check(full, 0, k, n) && check(skipped, 2, 4, n) && check(short_n, 0, k, 32);
}

const EngineSupport& support() {
  static const EngineSupport s = [] {
    EngineSupport e;
    e.f32 = product_is_right<float>(false);
    e.pack_bf16 = at::native::cpublas::could_pack(at::kBFloat16) && product_is_right<c10::BFloat16>(true);
    e.pack_f16 = at::native::cpublas::could_pack(at::kHalf) && product_is_right<c10::Half>(true);
    e.native_bf16 = e.pack_bf16 || product_is_right<c10::BFloat16>(false);
    e.native_f16 = e.pack_f16 || product_is_right<c10::Half>(false);
    return e;
  }();
  return s;
}

enum class Override : int { kAuto = 0, kNative, kF32, kMicroKernel };
std::atomic<int> g_override{static_cast<int>(Override::kAuto)};

// Whether auto sends fp32 products to the engine: on AVX-512 builds yes; on AVX2 builds the 8-wide micro-kernel ran
// 3-6% faster than oneDNN's AVX2 brgemm (forward F = 64, d = 64: 1.02x vs 1.05x SDPA; forward+backward F = 256,
// d = 40: 1.17x vs 1.23x; AMD EPYC with torch, oneDNN and MKL held to AVX2), so AVX2 keeps it.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kEngineForF32 = true;
#else
constexpr bool kEngineForF32 = false;
#endif

GemmPlan auto_plan(at::ScalarType dtype, const EngineSupport& s) {
  const GemmEngine f32 = s.f32 && kEngineForF32 ? GemmEngine::kBrgemmF32 : GemmEngine::kMicroKernel;
  if (dtype == at::kBFloat16 && s.pack_bf16) return {GemmEngine::kBrgemmNative, true};
  if (dtype == at::kHalf && s.pack_f16) return {GemmEngine::kBrgemmNative, true};
  return {f32, false, /*small_on_microkernel=*/true};
}

}  // namespace

GemmPlan gemm_plan(at::ScalarType dtype) {
  const EngineSupport& s = support();
  const bool reduced = dtype == at::kBFloat16 || dtype == at::kHalf;
  switch (static_cast<Override>(g_override.load(std::memory_order_relaxed))) {
    case Override::kMicroKernel: return {GemmEngine::kMicroKernel, false};
    case Override::kF32: return {GemmEngine::kBrgemmF32, false};
    case Override::kNative:
      if (!reduced) return {GemmEngine::kBrgemmF32, false};
      return {GemmEngine::kBrgemmNative, dtype == at::kBFloat16 ? s.pack_bf16 : s.pack_f16};
    default: return auto_plan(dtype, s);
  }
}

void set_gemm_override(const std::string& name) {
  const EngineSupport& s = support();
  Override o;
  if (name == "auto") {
    o = Override::kAuto;
  } else if (name == "microkernel") {
    o = Override::kMicroKernel;
  } else if (name == "brgemm_f32") {
    TORCH_CHECK(s.f32, "vstar_kernels: the brgemm_f32 GEMM engine (at::native::cpublas::brgemm on fp32) does not ",
                "run on this CPU or torch build; use auto or microkernel");
    o = Override::kF32;
  } else if (name == "brgemm_native") {
    TORCH_CHECK(s.f32 && s.native_bf16 && s.native_f16, "vstar_kernels: the brgemm_native GEMM engine ",
                "(at::native::cpublas::brgemm on bf16/fp16) does not run on this CPU or torch build; use auto, ",
                "brgemm_f32 or microkernel");
    o = Override::kNative;
  } else {
    TORCH_CHECK(false, "vstar_kernels: unknown CPU GEMM engine '", name,
                "'; expected auto, brgemm_native, brgemm_f32 or microkernel");
  }
  g_override.store(static_cast<int>(o), std::memory_order_relaxed);
}

std::string gemm_info() {
  const EngineSupport& s = support();
  std::ostringstream out;
  static const char* names[] = {"auto", "brgemm_native", "brgemm_f32", "microkernel"};
  out << "amx=" << (s.pack_bf16 || s.pack_f16 ? 1 : 0)
      << ";brgemm_f32=" << (s.f32 ? 1 : 0) << ";native_bf16=" << (s.native_bf16 ? 1 : 0)
      << ";native_f16=" << (s.native_f16 ? 1 : 0) << ";override=" << names[g_override.load()];
  for (const auto& [label, dtype] :
       {std::pair<const char*, at::ScalarType>{"float32", at::kFloat}, {"bfloat16", at::kBFloat16},
        {"float16", at::kHalf}}) {
    const GemmPlan plan = gemm_plan(dtype);
    out << ";" << label << "=" << engine_name(plan.engine) << (plan.native() && plan.packed ? "+packed" : "")
        << (plan.small_on_microkernel && plan.engine == GemmEngine::kBrgemmF32
                ? " (products under 64x64x32: microkernel)" : "");
  }
  return out.str();
}

}  // namespace cpu
}  // namespace vstar
