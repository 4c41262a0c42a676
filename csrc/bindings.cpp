// vstar-kernels: the custom ops vstar_kernels::* (torch.library), their validation and their CPU and CUDA
// implementations. The fake (meta) implementations for torch.compile are registered from Python
// (vstar_kernels/backends/extension.py) next to the loader.
//
// Two pairs of ops run the same kernels:
//   tar_attention, tar_attention_backward                the public ops of whole sequences: the token layout as the
//                                                        user gives it (contract.TokenFrames), checked to lie inside
//                                                        both sequences and clipped to them here; differentiable.
//   tar_attention_kernel, tar_attention_kernel_backward  what the Python backend calls: the layout already in the
//                                                        kernels' folded form (contract.TARParams.kernel_layout_args,
//                                                        chunks of a sequence included; nothing recomputed here),
//                                                        an optional given row max and the log-sum-exp, and an
//                                                        optional frame-distance profile (set_profile). Forward-only
//                                                        partials: the op's own autograd refuses a backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "cpu_gemm.h"
#include "tar_attention.h"
#include "tar_attention_cpu.h"

#ifdef VSTAR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace vstar {
namespace {

constexpr int64_t kMaxOffset = int64_t{1} << 53;  // frame indices exact in double
constexpr int64_t kMaxTokens = int64_t{1} << 53;

TensorStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }
RowStrides row_strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Tensors and the scalars every op takes.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma, double strength,
                  std::string_view mode, double scale) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4, "tar_attention: q, k, v must be 4-D (batch, frames, heads, head_dim), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "tar_attention: mismatched dtypes ", q.scalar_type(), " and ",
                t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "tar_attention: mismatched devices ", q.device(), " and ", t->device());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "tar_attention (extension): dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "tar_attention: mismatched batch");
  TORCH_CHECK(k.size(2) == q.size(2) && v.size(2) == q.size(2), "tar_attention: mismatched heads");
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3), "tar_attention: mismatched head_dim");
  TORCH_CHECK(k.size(1) == v.size(1), "tar_attention: k and v must have the same number of frames");
  TORCH_CHECK(q.size(3) >= 1, "tar_attention: head_dim must be >= 1");
  TORCH_CHECK(k.size(1) >= 1 || q.numel() == 0, "tar_attention: k and v need at least one frame");
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0, "tar_attention: sigma must be > 0 and finite, got ", sigma);
  TORCH_CHECK(std::isfinite(strength) && std::abs(strength) <= std::numeric_limits<float>::max(),
              "tar_attention: strength must be finite and fit in float32, got ", strength);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "tar_attention: scale must be > 0 and finite, got ", scale);
  TORCH_CHECK(mode == "relative" || mode == "absolute", "tar_attention: mode must be 'relative' or 'absolute', got '",
              std::string(mode), "'");
}

void check_offsets(int64_t q_offset, int64_t k_offset) {
  TORCH_CHECK(q_offset >= -kMaxOffset && q_offset <= kMaxOffset && k_offset >= -kMaxOffset && k_offset <= kMaxOffset,
              "tar_attention: q_offset and k_offset must be within +-2^53, got ", q_offset, " and ", k_offset);
}

// The public op's token layout (contract.TokenFrames): counts in range, the video span inside both sequences.
void check_layout(const at::Tensor& q, const at::Tensor& k, int64_t tokens_per_frame, int64_t video_start,
                  std::optional<int64_t> video_tokens) {
  TORCH_CHECK(tokens_per_frame >= 1 && tokens_per_frame <= kMaxTokens,
              "tar_attention: tokens_per_frame must be in [1, 2^53], got ", tokens_per_frame);
  TORCH_CHECK(video_start >= 0 && video_start <= kMaxTokens, "tar_attention: video_start must be in [0, 2^53], got ",
              video_start);
  TORCH_CHECK(!video_tokens || (*video_tokens >= 0 && *video_tokens <= kMaxTokens),
              "tar_attention: video_tokens must be in [0, 2^53], got ", video_tokens.value_or(0));
  const int64_t shortest = std::min(q.size(1), k.size(1));
  const bool temporal = tokens_per_frame == 1 && video_start == 0 && !video_tokens;
  TORCH_CHECK(temporal || shortest == 0 || video_start + video_tokens.value_or(0) <= shortest,
              "tar_attention: the video tokens (video_start ", video_start, ", video_tokens ", video_tokens.value_or(0),
              ") must lie inside both q (", q.size(1), " tokens) and k (", k.size(1), " tokens)");
}

// A checked whole-sequence layout clipped to the sequences, in the kernels' form (what
// contract.TARParams.kernel_layout_args gives for whole sequences: both starts video_start clipped to the longer
// length, every field then <= it, so int32 wherever lengths are).
void set_whole_layout(TARParams& p, int64_t tokens_per_frame, int64_t video_start,
                      std::optional<int64_t> video_tokens) {
  p.framed = !(tokens_per_frame == 1 && video_start == 0 && !video_tokens);
  const int64_t longest = std::max<int64_t>({p.len_q, p.len_k, 1});
  p.tokens_per_frame = std::min(tokens_per_frame, longest);
  p.video_start_q = p.video_start_k = std::min(video_start, longest);
  const auto end = [&](int64_t len) {
    const int64_t stop = video_tokens ? std::min(len, p.video_start_q + *video_tokens) : len;
    return std::max(p.video_start_q, stop);
  };
  p.video_end_q = end(p.len_q);
  p.video_end_k = end(p.len_k);
}

// The kernel op's folded layout (contract.TARParams.kernel_layout_args), taken as given once it is in the range the
// kernels rely on: 1 <= tokens_per_frame <= max(Lq, Lk, 1) and per side 1 - tokens_per_frame <= start <= max(Lq, Lk,
// 1), start <= end <= max(start, L). No check that the span lies inside the sequences: a chunk's may reach past it.
void check_kernel_layout(const at::Tensor& q, const at::Tensor& k, int64_t tokens_per_frame, int64_t video_start_q,
                         int64_t video_start_k, int64_t video_end_q, int64_t video_end_k) {
  const int64_t longest = std::max<int64_t>({q.size(1), k.size(1), 1});
  TORCH_CHECK(tokens_per_frame >= 1 && tokens_per_frame <= longest,
              "tar_attention_kernel: tokens_per_frame must be in [1, max(Lq, Lk, 1) = ", longest,
              "] (the folded layout of TARParams.kernel_layout_args), got ", tokens_per_frame);
  const auto side = [&](const char* name, int64_t start, int64_t end, int64_t len) {
    TORCH_CHECK(start >= 1 - tokens_per_frame && start <= longest, "tar_attention_kernel: video_start_", name,
                " must be in [1 - tokens_per_frame, max(Lq, Lk, 1)] = [", 1 - tokens_per_frame, ", ", longest,
                "], got ", start);
    TORCH_CHECK(end >= start && end <= std::max(start, len), "tar_attention_kernel: video_end_", name, " must be in [",
                "video_start_", name, ", max(video_start_", name, ", L", name, ")] = [", start, ", ",
                std::max(start, len), "], got ", end);
  };
  side("q", video_start_q, video_end_q, q.size(1));
  side("k", video_start_k, video_end_k, k.size(1));
}

// The given row max of the kernel op: float32 (batch, Lq, heads) on q's device, any strides; relative mode only.
void check_row_max(const at::Tensor& q, const at::Tensor& row_max, bool relative) {
  TORCH_CHECK(relative, "tar_attention_kernel: row_max applies to mode='relative' only (the absolute bias has no "
              "row max)");
  TORCH_CHECK(row_max.dim() == 3 && row_max.size(0) == q.size(0) && row_max.size(1) == q.size(1) &&
                  row_max.size(2) == q.size(2),
              "tar_attention_kernel: row_max must have shape (batch, Lq, heads) = ", q.sizes().slice(0, 3), ", got ",
              row_max.sizes());
  TORCH_CHECK(row_max.scalar_type() == at::kFloat, "tar_attention_kernel: row_max must be float32, got ",
              row_max.scalar_type());
  TORCH_CHECK(row_max.device() == q.device(), "tar_attention_kernel: row_max must be on q's device ", q.device(),
              ", got ", row_max.device());
}

// Varlen keys: a contiguous int64 (batch,) CPU tensor whose values lie in [1, Lk] (the CUDA fallback has no varlen
// kernel: the Triton backend runs those calls), checked here, before any launch.
void set_key_lengths(TARParams& p, const at::Tensor& q, const std::optional<at::Tensor>& k_lengths, const char* op) {
  if (!k_lengths) return;
  const at::Tensor& lengths = *k_lengths;
  TORCH_CHECK(q.is_cpu(), op, ": k_lengths (varlen keys) runs on the CPU kernel only; on CUDA use the triton backend");
  TORCH_CHECK(lengths.device() == q.device(), op, ": k_lengths must be on q's device ", q.device());
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == p.batch &&
                  lengths.is_contiguous(),
              op, ": k_lengths must be a contiguous int64 (batch,) = (", p.batch, ",) tensor, got ",
              lengths.scalar_type(), " ", lengths.sizes());
  const int64_t* values = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < p.batch; ++b)
    TORCH_CHECK(values[b] >= 1 && values[b] <= p.len_k, op, ": k_lengths[", b, "] = ", values[b],
                " must be in [1, Lk = ", p.len_k, "]");
  p.k_lengths = values;
}

// A frame-distance profile of the kernel ops (backends/profile_tables.KernelProfile): `ints` = (table_len,
// head_stride, radius, sink_limit), the optional float32 tables contiguous (rows, table_len) on q's device, rows 1
// (head_stride 0) or one per head (head_stride table_len). Their values were validated by FrameProfile (bias finite
// or -inf, bias[..., 0] finite, scale > 0 and finite); the kernels read nothing outside the tables for any values.
void set_profile(TARParams& p, const at::Tensor& q, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& scale, const std::optional<c10::IntArrayRef>& ints, const char* op) {
  if (!ints) {
    TORCH_CHECK(!bias && !scale, op, ": profile tables need the profile's integers (table_len, head_stride, radius, ",
                "sink_limit)");
    return;
  }
  TORCH_CHECK(ints->size() == 4, op, ": profile must be (table_len, head_stride, radius, sink_limit), got ",
              ints->size(), " integers");
  FrameProfileView& f = p.profile;
  f.on = true;
  f.table_len = (*ints)[0];
  f.head_stride = (*ints)[1];
  f.radius = (*ints)[2];
  f.sink_limit = (*ints)[3];
  TORCH_CHECK(f.table_len >= 1, op, ": profile table_len must be >= 1, got ", f.table_len);
  TORCH_CHECK(f.head_stride == 0 || f.head_stride == f.table_len, op, ": profile head_stride must be 0 (one table row ",
              "for every head) or table_len = ", f.table_len, " (one per head), got ", f.head_stride);
  TORCH_CHECK(f.radius >= -1, op, ": profile radius must be >= 0, or -1 for no window, got ", f.radius);
  const int64_t rows = f.head_stride == 0 ? 1 : p.heads;
  const auto table = [&](const std::optional<at::Tensor>& t, const char* name) -> const float* {
    if (!t) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == rows && t->size(1) == f.table_len &&
                    t->is_contiguous(),
                op, ": profile ", name, " must be a contiguous float32 (", rows, ", ", f.table_len, ") tensor, got ",
                t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(t->device() == q.device(), op, ": profile ", name, " must be on q's device ", q.device(), ", got ",
                t->device());
    return t->const_data_ptr<float>();
  };
  f.bias = table(bias, "bias");
  f.scale = table(scale, "scale");
}

// The kernels' parameters of checked inputs, but for the layout (set by the caller; the output strides by the
// caller that owns the output).
TARParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma, double strength,
                      std::string_view mode, double scale, int64_t offset_delta) {
  TARParams p;
  p.batch = q.size(0);
  p.len_q = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.len_k = k.size(1);
  p.q = strides_of(q);
  p.k = strides_of(k);
  p.v = strides_of(v);
  p.scale = static_cast<float>(scale);
  p.gauss_log2_coeff = tar_gauss_log2_coeff(sigma);
  p.strength = static_cast<float>(strength);
  p.offset_delta = offset_delta;
  p.relative = mode == "relative";
  return p;
}

// The public ops' parameters: offsets and the user's layout, checked and clipped.
TARParams make_whole_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma,
                            double strength, std::string_view mode, double scale, int64_t q_offset, int64_t k_offset,
                            int64_t tokens_per_frame, int64_t video_start, std::optional<int64_t> video_tokens) {
  check_inputs(q, k, v, sigma, strength, mode, scale);
  check_offsets(q_offset, k_offset);
  check_layout(q, k, tokens_per_frame, video_start, video_tokens);
  TARParams p = make_params(q, k, v, sigma, strength, mode, scale, q_offset - k_offset);  // exact: both within 2^53
  set_whole_layout(p, tokens_per_frame, video_start, video_tokens);
  return p;
}

// The kernel ops' parameters: the folded layout, checked and taken as given. The layout is the identity (token t is
// frame t) when it spans both sequences one token per frame from local token 0: the temporal path then.
TARParams make_kernel_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma,
                             double strength, std::string_view mode, double scale, int64_t offset_delta,
                             int64_t tokens_per_frame, int64_t video_start_q, int64_t video_start_k,
                             int64_t video_end_q, int64_t video_end_k) {
  check_inputs(q, k, v, sigma, strength, mode, scale);
  TORCH_CHECK(offset_delta >= -kMaxOffset && offset_delta <= kMaxOffset,
              "tar_attention_kernel: offset_delta must be within +-2^53, got ", offset_delta);
  check_kernel_layout(q, k, tokens_per_frame, video_start_q, video_start_k, video_end_q, video_end_k);
  TARParams p = make_params(q, k, v, sigma, strength, mode, scale, offset_delta);
  p.framed = !(tokens_per_frame == 1 && video_start_q == 0 && video_start_k == 0 && video_end_q == p.len_q &&
               video_end_k == p.len_k);
  p.tokens_per_frame = tokens_per_frame;
  p.video_start_q = video_start_q;
  p.video_start_k = video_start_k;
  p.video_end_q = video_end_q;
  p.video_end_k = video_end_k;
  return p;
}

#ifdef VSTAR_WITH_CUDA
// The CUDA kernels' limits (tar_attention.h), checked before any launch with a message naming the argument. The
// layout's values then fit int32 too: they lie within [-tokens_per_frame, max(Lq, Lk, 1)].
void check_cuda_limits(const TARParams& p, const char* op) {
  TORCH_CHECK(p.head_dim <= kMaxCudaHeadDim, op, " (CUDA): head_dim must be <= ", kMaxCudaHeadDim, ", got ",
              p.head_dim);
  TORCH_CHECK(p.len_q <= kMaxCudaFrames && p.len_k <= kMaxCudaFrames, op, " (CUDA): frame counts must be <= 2^30 ",
              "(int32 frame distances), got ", p.len_q, " and ", p.len_k);
  TORCH_CHECK(p.offset_delta >= -kMaxCudaOffsetDelta && p.offset_delta <= kMaxCudaOffsetDelta, op,
              " (CUDA): |offset_delta| (q_offset - k_offset plus the frames before each chunk) must be <= 2^30 ",
              "(int32 frame distances), got ", p.offset_delta);
}

// The CUDA kernels' element type of a checked (float32, float16 or bfloat16) tensor.
DType cuda_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? DType::kFloat32 : t.scalar_type() == at::kHalf ? DType::kFloat16
                                                                                         : DType::kBFloat16;
}
#endif

// The forward of checked inputs: (out, lse), lse float32 (batch, Lq, heads) when asked for, else an empty (0,)
// tensor. `row_max` (checked) replaces the rows' own max in relative mode.
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               TARParams p, const std::optional<at::Tensor>& row_max,
                                               bool return_lse, const char* op) {
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  at::Tensor lse = return_lse ? at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  p.o = strides_of(out);
  if (row_max && p.relative) {
    p.row_max = row_max->const_data_ptr<float>();
    p.row_max_s = row_strides_of(*row_max);
  }
  if (return_lse) {
    p.lse = lse.mutable_data_ptr<float>();
    p.lse_s = row_strides_of(lse);
  }

  if (q.is_cpu()) {
    tar_attention_cpu(p, q, k, v, out);
    return {out, lse};
  }
#ifdef VSTAR_WITH_CUDA
  TORCH_CHECK(q.is_cuda(), op, ": unsupported device ", q.device());
  check_cuda_limits(p, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const int err = tar_attention_cuda_launch(p, cuda_dtype(q), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                                            out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, op, " (CUDA): kernel launch failed with CUDA error ", err);
  return {out, lse};
#else
  TORCH_CHECK(false, op, ": this build of the extension has no CUDA kernel (device ", q.device(), ")");
#endif
}

// The fused backward of checked inputs: (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const TARParams& p, const char* op) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == q.size(0) && grad_out.size(1) == q.size(1) &&
                  grad_out.size(2) == q.size(2) && grad_out.size(3) == v.size(3),
              op, ": grad_out must be shaped like the output ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.device() == q.device(), op,
              ": grad_out must match q's dtype and device");
  if (q.numel() == 0 || k.numel() == 0)  // nothing attends: every gradient is zero
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options())};
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.is_cpu()) {
    tar_attention_backward_cpu(p, grad_out, q, k, v, dq, dk, dv);
    return {dq, dk, dv};
  }
#ifdef VSTAR_WITH_CUDA
  TORCH_CHECK(q.is_cuda(), op, ": unsupported device ", q.device());
  check_cuda_limits(p, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const TARGradStrides g{strides_of(grad_out), strides_of(dq), strides_of(dk), strides_of(dv)};
  at::Tensor workspace = at::empty({kBackwardStatsPerRow, p.batch * p.heads, p.len_q}, q.options().dtype(at::kFloat));
  const int err = tar_attention_backward_cuda_launch(
      p, g, cuda_dtype(q), grad_out.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
      dq.mutable_data_ptr(), dk.mutable_data_ptr(), dv.mutable_data_ptr(), workspace.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, op, " (CUDA): kernel launch failed with CUDA error ", err);
  return {dq, dk, dv};
#else
  TORCH_CHECK(false, op, ": this build of the extension has no CUDA kernel (device ", q.device(), ")");
#endif
}

std::string_view view_of(c10::string_view mode) { return {mode.data(), mode.size()}; }

at::Tensor tar_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma,
                         double strength, c10::string_view mode, double scale, int64_t q_offset, int64_t k_offset,
                         int64_t tokens_per_frame, int64_t video_start, std::optional<int64_t> video_tokens) {
  const TARParams p = make_whole_params(q, k, v, sigma, strength, view_of(mode), scale, q_offset, k_offset,
                                        tokens_per_frame, video_start, video_tokens);
  return std::get<0>(run_forward(q, k, v, p, std::nullopt, false, "tar_attention"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tar_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma,
    double strength, c10::string_view mode, double scale, int64_t q_offset, int64_t k_offset,
    int64_t tokens_per_frame, int64_t video_start, std::optional<int64_t> video_tokens) {
  const TARParams p = make_whole_params(q, k, v, sigma, strength, view_of(mode), scale, q_offset, k_offset,
                                        tokens_per_frame, video_start, video_tokens);
  return run_backward(grad_out, q, k, v, p, "tar_attention_backward");
}

std::tuple<at::Tensor, at::Tensor> tar_attention_kernel(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma, double strength,
    c10::string_view mode, double scale, int64_t offset_delta, int64_t tokens_per_frame, int64_t video_start_q,
    int64_t video_start_k, int64_t video_end_q, int64_t video_end_k, const std::optional<at::Tensor>& row_max,
    bool return_lse, const std::optional<at::Tensor>& k_lengths, const std::optional<at::Tensor>& profile_bias,
    const std::optional<at::Tensor>& profile_scale, std::optional<c10::IntArrayRef> profile) {
  TARParams p = make_kernel_params(q, k, v, sigma, strength, view_of(mode), scale, offset_delta, tokens_per_frame,
                                   video_start_q, video_start_k, video_end_q, video_end_k);
  if (row_max) check_row_max(q, *row_max, p.relative);
  set_key_lengths(p, q, k_lengths, "tar_attention_kernel");
  set_profile(p, q, profile_bias, profile_scale, profile, "tar_attention_kernel");
  return run_forward(q, k, v, p, row_max, return_lse, "tar_attention_kernel");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tar_attention_kernel_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma,
    double strength, c10::string_view mode, double scale, int64_t offset_delta, int64_t tokens_per_frame,
    int64_t video_start_q, int64_t video_start_k, int64_t video_end_q, int64_t video_end_k,
    const std::optional<at::Tensor>& k_lengths, const std::optional<at::Tensor>& profile_bias,
    const std::optional<at::Tensor>& profile_scale, std::optional<c10::IntArrayRef> profile) {
  TARParams p = make_kernel_params(q, k, v, sigma, strength, view_of(mode), scale, offset_delta, tokens_per_frame,
                                   video_start_q, video_start_k, video_end_q, video_end_k);
  set_key_lengths(p, q, k_lengths, "tar_attention_kernel_backward");
  set_profile(p, q, profile_bias, profile_scale, profile, "tar_attention_kernel_backward");
  return run_backward(grad_out, q, k, v, p, "tar_attention_kernel_backward");
}

}  // namespace
}  // namespace vstar

TORCH_LIBRARY(vstar_kernels, m) {
  m.def(
      "tar_attention(Tensor q, Tensor k, Tensor v, float sigma, float strength=1.0, str mode='relative', "
      "float scale=1.0, int q_offset=0, int k_offset=0, int tokens_per_frame=1, int video_start=0, "
      "int? video_tokens=None) -> Tensor");
  m.def(
      "tar_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, float sigma, float strength=1.0, "
      "str mode='relative', float scale=1.0, int q_offset=0, int k_offset=0, int tokens_per_frame=1, "
      "int video_start=0, int? video_tokens=None) -> (Tensor, Tensor, Tensor)");
  // the layout as contract.TARParams.kernel_layout_args gives it, offset_delta as TARParams.offset_delta; a
  // frame-distance profile as backends/profile_tables.KernelProfile gives it: its tables and profile = (table_len,
  // head_stride, radius, sink_limit), None for plain TAR
  m.def(
      "tar_attention_kernel(Tensor q, Tensor k, Tensor v, float sigma, float strength, str mode, float scale, "
      "int offset_delta, int tokens_per_frame, int video_start_q, int video_start_k, int video_end_q, "
      "int video_end_k, Tensor? row_max=None, bool return_lse=False, Tensor? k_lengths=None, "
      "Tensor? profile_bias=None, Tensor? profile_scale=None, int[]? profile=None) -> (Tensor, Tensor)");
  m.def(
      "tar_attention_kernel_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, float sigma, float strength, "
      "str mode, float scale, int offset_delta, int tokens_per_frame, int video_start_q, int video_start_k, "
      "int video_end_q, int video_end_k, Tensor? k_lengths=None, Tensor? profile_bias=None, "
      "Tensor? profile_scale=None, int[]? profile=None) -> (Tensor, Tensor, Tensor)");
  // the CPU kernels' GEMM engines (cpu_gemm.h): what runs for each dtype, and the override of
  // VSTAR_KERNELS_CPU_GEMM (auto, brgemm_native, brgemm_f32, microkernel)
  m.def("cpu_gemm_info() -> str", [] { return vstar::cpu::gemm_info(); });
  m.def("set_cpu_gemm(str engine) -> ()",
        [](c10::string_view engine) { vstar::cpu::set_gemm_override(std::string(engine)); });
}

TORCH_LIBRARY_IMPL(vstar_kernels, CPU, m) {
  m.impl("tar_attention", &vstar::tar_attention);
  m.impl("tar_attention_backward", &vstar::tar_attention_backward);
  m.impl("tar_attention_kernel", &vstar::tar_attention_kernel);
  m.impl("tar_attention_kernel_backward", &vstar::tar_attention_kernel_backward);
}

#ifdef VSTAR_WITH_CUDA
TORCH_LIBRARY_IMPL(vstar_kernels, CUDA, m) {
  m.impl("tar_attention", &vstar::tar_attention);
  m.impl("tar_attention_backward", &vstar::tar_attention_backward);
  m.impl("tar_attention_kernel", &vstar::tar_attention_kernel);
  m.impl("tar_attention_kernel_backward", &vstar::tar_attention_kernel_backward);
}
#endif
