// vstar-kernels: the one C++ definition of Temporal Attention Regularization (TAR).
//
// Shared by the CPU kernel (tar_attention_cpu.cpp), the CUDA kernel (tar_attention_cuda.cu, compiled without
// ATen) and the bindings. The op contract (vstar_kernels/contract.py, ../shared/DESIGN.md §2), per (batch, head):
//
//     S_ij  = scale * <q_i, k_j>
//     G_ij  = exp(-(gi - gj)^2 / (2 sigma^2)),     gi - gj = offset_delta + frame_q(i) - frame_k(j)
//             (0 when token i or j has no frame; by default frame(t) = t, see tar_token_frame)
//     c_i   = sat(strength * M_i),  M_i = max_j' S_ij' or a given row max  (relative, VSTAR Eq. 3)
//     c_i   = sat(strength)                                                 (absolute)
//     S'_ij = S_ij + c_i * G_ij
//     out_i = sum_j softmax_j(S'_ij) v_j,          lse_i = log sum_j exp(S'_ij)   (natural log, when asked for)
//
// The call may be a chunk of a longer sequence (context parallelism's Ring): the layout arrives folded to the
// chunk's local token indices (contract.TARParams.kernel_layout_args, offset_delta including the frames before each
// chunk's first token), a given row max M_i (the max over every key chunk of the row) replaces the call's own, and
// the log-sum-exp lets the caller merge the chunks' partial outputs exactly.
//
// Kernels may hold logits in natural units (t = S) or in the exp2 domain (t = S * log2 e, softmax by exp2). The
// Gaussian G is the same number in both; tar_bias_coeff() gives the multiplier of G for either unit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TAR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <cmath>
#define TAR_HOST_DEVICE inline
#endif

namespace vstar {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;  // exp2-domain log-sum-exp to natural units

// Strides are in elements; tensors are (batch, frames, heads, head_dim).
struct TensorStrides {
  int64_t batch, frame, head, dim;
};

// Strides (elements) of a per-row float32 tensor (batch, len_q, heads): the given row max, the log-sum-exp.
struct RowStrides {
  int64_t batch, row, head;
};

// A frame-distance profile (vstar_kernels/profiles.py) in the kernels' form (backends/profile_tables.KernelProfile):
// float32 tables (rows, table_len), contiguous, on the inputs' device. For a pair of tokens that both have a frame, at
// frame distance d = |gi - gj| (exact integer), idx = min(d, table_len - 1), h the head (row 0: head_stride 0),
//     kept  = (radius < 0 or d <= radius or f_k(j) < sink_limit) and bias[h, idx] != -inf
//     S'_ij = (S_ij > 0 ? scale[h, idx] * S_ij : S_ij) + bias[h, idx] + c_i * G(d)       (kept pairs; else masked)
// with c_i's relative row max taken over the kept keys, of the unscaled logits. Pairs with a text token are never
// masked, scaled or biased. A masked pair gets no weight and passes no gradient; a row with no kept key (a chunk of
// keys, offset frames) gets output 0 and lse -inf. `on` false: plain TAR, the kernels' old code path; every other
// field is then unused. tar_profile_pair() and tar_profile_logit() below are the one C++ statement of the formula.
struct FrameProfileView {
  const float* bias = nullptr;   // bias[h * head_stride + idx], natural units; -inf masks; nullptr: no bias table
  const float* scale = nullptr;  // positive-logit scale (> 0, finite); nullptr: no scale table
  int64_t table_len = 1;         // D + 1 entries per row (both tables widened to one length)
  int64_t head_stride = 0;       // table_len for per-head tables, 0 for one row shared by every head
  int64_t radius = -1;           // the window's radius in frames; -1: no window
  int64_t sink_limit = 0;        // with a window: a key whose local frame f_k(j) is below this is a sink (always kept)
  bool on = false;
};

struct TARParams {
  int64_t batch = 0, heads = 0, len_q = 0, len_k = 0, head_dim = 0;
  TensorStrides q{}, k{}, v{}, o{};
  float scale = 1.f;            // logit scale (natural units), head_dim ** -0.5 by default
  float gauss_log2_coeff = 0.f; // log2(e) / (2 sigma^2): G = exp2(-(gi - gj)^2 * gauss_log2_coeff)
  float strength = 0.f;         // 0: plain softmax attention
  // gi - gj = offset_delta + frame_q(i) - frame_k(j): q_offset - k_offset plus the whole frames before each chunk's
  // first token (contract.TARParams.offset_delta; within 2^53, so exact)
  int64_t offset_delta = 0;
  bool relative = true;         // mode "relative" (VSTAR) or "absolute"
  // Token layout in the kernels' folded form (contract.TARParams.kernel_layout_args): local token t of q has frame
  // (t - video_start_q) / tokens_per_frame when video_start_q <= t < video_end_q, else none; the same for k with
  // video_start_k, video_end_k. A start may be negative, down to 1 - tokens_per_frame (a chunk that begins inside a
  // frame): t - start >= 0 wherever a frame exists, so C's truncating division is floor. Every value lies within
  // [-tokens_per_frame, max(len_q, len_k, 1)] (int32 in the CUDA kernels). Unused when !framed: then token t is
  // frame t (temporal attention).
  bool framed = false;
  int64_t tokens_per_frame = 1, video_start_q = 0, video_start_k = 0, video_end_q = 0, video_end_k = 0;
  // Relative mode: the row max M_i of c_i, natural units, one float per (batch, query row, head) at row_max_s; nullptr:
  // each row's own max_j S_ij. Ignored in absolute mode.
  const float* row_max = nullptr;
  RowStrides row_max_s{};
  // When not nullptr: lse_i = log sum_j exp(S'_ij) (natural log) of every row is written here, at lse_s.
  float* lse = nullptr;
  RowStrides lse_s{};
  // Varlen keys, when not nullptr: batch element b attends to its first k_lengths[b] keys only (each in [1, len_k],
  // checked by the caller); the others get no weight, no part in the row max and zero gradients. CPU kernels only.
  const int64_t* k_lengths = nullptr;
  // The call's frame-distance profile (tables and windows beyond the Gaussian band), or none (profile.on false).
  FrameProfileView profile{};
};

// The keys batch element b attends to: its k_lengths[b], or every one of the len_k.
TAR_HOST_DEVICE int64_t tar_key_count(const TARParams& p, int64_t b) {
  if (p.k_lengths == nullptr) return p.len_k;
  return p.k_lengths[b] < p.len_k ? p.k_lengths[b] : p.len_k;
}

// Element offset of (batch b, query row i, head h) in a per-row tensor.
TAR_HOST_DEVICE int64_t tar_row_offset(const RowStrides& s, int64_t b, int64_t i, int64_t h) {
  return b * s.batch + i * s.row + h * s.head;
}

// Local frame index (before the offsets) of token t of a sequence whose tokens [video_start, video_end) have
// frames, or -1 when t has none. I is int64_t on the host, int32_t in the CUDA kernels (every value within
// [-2^30, 2^30] there). video_start may be negative (> -tokens_per_frame): t - video_start >= 0 when t has a frame.
template <typename I>
TAR_HOST_DEVICE I tar_token_frame(I t, I tokens_per_frame, I video_start, I video_end) {
  return t >= video_start && t < video_end ? (t - video_start) / tokens_per_frame : I(-1);
}

// Frame of query token i / key token j of a call (t itself unless the layout is framed), each side with its own start.
template <typename I>
TAR_HOST_DEVICE I tar_query_frame(const TARParams& p, I i) {
  return p.framed ? tar_token_frame<I>(i, I(p.tokens_per_frame), I(p.video_start_q), I(p.video_end_q)) : i;
}
template <typename I>
TAR_HOST_DEVICE I tar_key_frame(const TARParams& p, I j) {
  return p.framed ? tar_token_frame<I>(j, I(p.tokens_per_frame), I(p.video_start_k), I(p.video_end_k)) : j;
}

// Frames of a sequence side: one past its last local frame index (0 when no token has a frame).
TAR_HOST_DEVICE int64_t tar_frame_count(int64_t tokens_per_frame, int64_t video_start, int64_t video_end) {
  return video_end > video_start ? (video_end - video_start - 1) / tokens_per_frame + 1 : 0;
}

// The coefficient saturates here: exp2(-2048 d^2) is exactly 0 for every |d| >= 1 (1 at d = 0), so a tiny sigma
// gives the diagonal-only band instead of an overflow to inf (0 * inf = NaN on the diagonal).
constexpr double kGaussLog2CoeffMax = 2048.0;

// Host-side constant of the Gaussian from sigma (> 0, finite; validated by the caller).
inline float tar_gauss_log2_coeff(double sigma) {
  const double coeff = (1.4426950408889634 / 2.0) / sigma / sigma;  // inf, never 0/0, for a tiny sigma
  return static_cast<float>(coeff < kGaussLog2CoeffMax ? coeff : kGaussLog2CoeffMax);
}

// G_ij for the frame distance dist = gi - gj = offset_delta + frame_q(i) - frame_k(j), computed exactly in integers and rounded to
// float once by the caller (the Triton kernel does the same, in the same order).
TAR_HOST_DEVICE float tar_gaussian(float dist, float gauss_log2_coeff) {
  return exp2f(-(dist * dist) * gauss_log2_coeff);
}

// |c_i|, the multiplier of G_ij in natural units, saturates here (contract.BIAS_COEFF_MAX, "Extreme values"): every
// biased logit and every difference of two stays finite in float32, in natural and in exp2 units.
constexpr float kBiasCoeffMax = 0x1p125f;

// The multiplier of G_ij added to a logit row: t'_ij = t_ij + tar_bias_coeff(p, row_max, unit) * G_ij, i.e.
// sat(strength * row_max) (relative) or sat(strength) * unit (absolute), sat clamping to +-kBiasCoeffMax * unit.
//   row_max: max_j t_ij of the unbiased logits of this row, or the given p.row_max of the row (natural units, times
//            unit), in the same units as t (relative mode only);
//   unit: 1 for natural-unit logits, kLog2e for exp2-domain logits (the absolute bias is `strength` nats).
// Finite for every admitted strength and row max, also where their product overflows float32.
TAR_HOST_DEVICE float tar_bias_coeff(const TARParams& p, float row_max, float unit) {
  const float coeff = p.strength * (p.relative ? row_max : unit);
  const float bound = kBiasCoeffMax * unit;
  return coeff > bound ? bound : coeff < -bound ? -bound : coeff;
}

// d tar_bias_coeff / d row_max in relative mode: strength, or 0 in a row whose coefficient saturates (the row max's
// gradient share in the backward).
TAR_HOST_DEVICE float tar_bias_coeff_slope(const TARParams& p, float row_max, float unit) {
  const float coeff = p.strength * row_max;
  const float bound = kBiasCoeffMax * unit;
  return coeff <= bound && coeff >= -bound ? p.strength : 0.f;
}

// Whether a kernel may skip the bias entirely (strength 0 is plain softmax attention).
TAR_HOST_DEVICE bool tar_has_bias(const TARParams& p) { return p.strength != 0.f; }

// ---- frame-distance profiles (FrameProfileView above)

// What a profile does to one (query, key) pair: whether the pair is kept, the scale of a positive logit and the bias
// added to the logit (natural units). The identity (kept, 1, 0) for a pair with a text token.
struct ProfilePair {
  bool kept;
  float scale;
  float bias;
};

// The profile's pair of query frame fi and key frame fj (local frames, -1 for a token without a frame; the frame
// distance |offset_delta + fi - fj|, exact in I: int64_t on the host, int32_t in the CUDA kernels) for head h.
template <typename I>
TAR_HOST_DEVICE ProfilePair tar_profile_pair(const FrameProfileView& f, int64_t h, I offset_delta, I fi, I fj) {
  if (fi < 0 || fj < 0) return {true, 1.f, 0.f};
  I d = offset_delta + fi - fj;
  d = d < 0 ? -d : d;
  const int64_t last = f.table_len - 1;
  const int64_t at = h * f.head_stride + (static_cast<int64_t>(d) < last ? static_cast<int64_t>(d) : last);
  const float bias = f.bias != nullptr ? f.bias[at] : 0.f;
  const bool in_window = f.radius < 0 || static_cast<int64_t>(d) <= f.radius || static_cast<int64_t>(fj) < f.sink_limit;
  return {in_window && bias >= -0x1.fffffep127f, f.scale != nullptr ? f.scale[at] : 1.f, bias};  // -inf: masked
}

// The scaled logit of a kept pair: t > 0 ? scale * t : t (t in natural or exp2 units: the scale keeps the sign).
TAR_HOST_DEVICE float tar_profile_scaled(const ProfilePair& pr, float t) { return t > 0.f ? pr.scale * t : t; }

// The profile's logit of a kept pair before the band: (t > 0 ? scale * t : t) + bias * unit, `unit` 1 for
// natural-unit logits t, kLog2e for exp2-domain ones. The kernels add c_i * G (tar_bias_coeff) to it; a kernel that
// applies it a row or a key group at a time (the CPU kernels' vector loops) computes exactly these operations.
TAR_HOST_DEVICE float tar_profile_logit(const ProfilePair& pr, float t, float unit) {
  return tar_profile_scaled(pr, t) + pr.bias * unit;
}

// ---- CUDA fallback entry point (tar_attention_cuda.cu); raw pointers, no ATen.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Launches on `stream` (a cudaStream_t); returns 0 or a cudaError_t value (cudaErrorInvalidConfiguration beyond
// these limits). Frame distances are int32 in the CUDA kernels: frame counts and |offset_delta| are at most 2^30.
// p.row_max and p.lse (device pointers) are honoured as in the CPU kernel.
constexpr int64_t kMaxCudaHeadDim = 256;
constexpr int64_t kMaxCudaFrames = int64_t{1} << 30;
constexpr int64_t kMaxCudaOffsetDelta = int64_t{1} << 30;
int tar_attention_cuda_launch(const TARParams& p, DType dtype, const void* q, const void* k, const void* v,
                              void* o, void* stream);

// Strides (elements) of the backward's incoming gradient and its three outputs, (batch, frames, heads, head_dim).
struct TARGradStrides {
  TensorStrides grad_out{}, dq{}, dk{}, dv{};
};

// fp32 numbers per (batch, head, query row) in the backward's workspace: row max, log-sum-exp, D, tie share.
constexpr int64_t kBackwardStatsPerRow = 4;

// The fused CUDA backward: writes dq, dk, dv (never zero-fills: with Lq * Lk == 0 the caller does). `workspace`
// holds kBackwardStatsPerRow * batch * heads * len_q floats. Returns 0 or a cudaError_t value.
int tar_attention_backward_cuda_launch(const TARParams& p, const TARGradStrides& g, DType dtype, const void* grad_out,
                                       const void* q, const void* k, const void* v, void* dq, void* dk, void* dv,
                                       float* workspace, void* stream);

}  // namespace vstar
