// vstar-kernels: the custom op vstar_kernels::tar_attention (torch.library), its validation and its CPU and CUDA
// implementations. The fake (meta) implementation for torch.compile is registered from Python
// (vstar_kernels/backends/extension.py) next to the loader.
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

#include "tar_attention.h"
#include "tar_attention_cpu.h"

#ifdef VSTAR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace vstar {
namespace {

TensorStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma, double strength,
                  std::string_view mode, double scale, int64_t q_offset, int64_t k_offset) {
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
  constexpr int64_t kMaxOffset = int64_t{1} << 53;  // frame indices exact in double
  TORCH_CHECK(q_offset >= -kMaxOffset && q_offset <= kMaxOffset && k_offset >= -kMaxOffset && k_offset <= kMaxOffset,
              "tar_attention: q_offset and k_offset must be within +-2^53, got ", q_offset, " and ", k_offset);
}

// The token layout (contract.TokenFrames): counts in range, the video span inside both sequences.
void check_layout(const at::Tensor& q, const at::Tensor& k, int64_t tokens_per_frame, int64_t video_start,
                  std::optional<int64_t> video_tokens) {
  constexpr int64_t kMaxTokens = int64_t{1} << 53;
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

// Clip a checked layout to the sequences (every field then <= the longer length, so int32 wherever lengths are).
void set_layout(TARParams& p, int64_t tokens_per_frame, int64_t video_start, std::optional<int64_t> video_tokens) {
  p.framed = !(tokens_per_frame == 1 && video_start == 0 && !video_tokens);
  const int64_t longest = std::max<int64_t>({p.len_q, p.len_k, 1});
  p.tokens_per_frame = std::min(tokens_per_frame, longest);
  p.video_start = std::min(video_start, longest);
  const auto end = [&](int64_t len) {
    const int64_t stop = video_tokens ? std::min(len, p.video_start + *video_tokens) : len;
    return std::max(p.video_start, stop);
  };
  p.video_end_q = end(p.len_q);
  p.video_end_k = end(p.len_k);
}

// The kernels' parameters of checked inputs (the output strides are set by the caller that owns the output).
TARParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma, double strength,
                      std::string_view mode, double scale, int64_t q_offset, int64_t k_offset,
                      int64_t tokens_per_frame, int64_t video_start, std::optional<int64_t> video_tokens) {
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
  p.offset_delta = q_offset - k_offset;  // exact: both within 2^53
  p.relative = mode == "relative";
  set_layout(p, tokens_per_frame, video_start, video_tokens);
  return p;
}

#ifdef VSTAR_WITH_CUDA
// The CUDA kernels' limits (tar_attention.h), checked before any launch with a message naming the argument.
void check_cuda_limits(const TARParams& p, const char* op) {
  TORCH_CHECK(p.head_dim <= kMaxCudaHeadDim, op, " (CUDA): head_dim must be <= ", kMaxCudaHeadDim, ", got ",
              p.head_dim);
  TORCH_CHECK(p.len_q <= kMaxCudaFrames && p.len_k <= kMaxCudaFrames, op, " (CUDA): frame counts must be <= 2^30 ",
              "(int32 frame distances), got ", p.len_q, " and ", p.len_k);
  TORCH_CHECK(p.offset_delta >= -kMaxCudaOffsetDelta && p.offset_delta <= kMaxCudaOffsetDelta, op,
              " (CUDA): |q_offset - k_offset| must be <= 2^30 (int32 frame distances), got ", p.offset_delta);
}

// The CUDA kernels' element type of a checked (float32, float16 or bfloat16) tensor.
DType cuda_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? DType::kFloat32 : t.scalar_type() == at::kHalf ? DType::kFloat16
                                                                                         : DType::kBFloat16;
}
#endif

at::Tensor tar_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma,
                         double strength, c10::string_view mode, double scale, int64_t q_offset, int64_t k_offset,
                         int64_t tokens_per_frame, int64_t video_start, std::optional<int64_t> video_tokens) {
  const std::string_view mode_sv(mode.data(), mode.size());
  check_inputs(q, k, v, sigma, strength, mode_sv, scale, q_offset, k_offset);
  check_layout(q, k, tokens_per_frame, video_start, video_tokens);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  if (out.numel() == 0) return out;
  TARParams p = make_params(q, k, v, sigma, strength, mode_sv, scale, q_offset, k_offset, tokens_per_frame, video_start,
                            video_tokens);
  p.o = strides_of(out);

  if (q.is_cpu()) {
    tar_attention_cpu(p, q, k, v, out);
    return out;
  }
#ifdef VSTAR_WITH_CUDA
  TORCH_CHECK(q.is_cuda(), "tar_attention: unsupported device ", q.device());
  check_cuda_limits(p, "tar_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  const int err = tar_attention_cuda_launch(p, cuda_dtype(q), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                                            out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "tar_attention (CUDA): kernel launch failed with CUDA error ", err);
  return out;
#else
  TORCH_CHECK(false, "tar_attention: this build of the extension has no CUDA kernel (device ", q.device(), ")");
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tar_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma,
    double strength, c10::string_view mode, double scale, int64_t q_offset, int64_t k_offset,
    int64_t tokens_per_frame, int64_t video_start, std::optional<int64_t> video_tokens) {
  const std::string_view mode_sv(mode.data(), mode.size());
  check_inputs(q, k, v, sigma, strength, mode_sv, scale, q_offset, k_offset);
  check_layout(q, k, tokens_per_frame, video_start, video_tokens);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == q.size(0) && grad_out.size(1) == q.size(1) &&
                  grad_out.size(2) == q.size(2) && grad_out.size(3) == v.size(3),
              "tar_attention_backward: grad_out must be shaped like the output ", q.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.device() == q.device(),
              "tar_attention_backward: grad_out must match q's dtype and device");
  if (q.numel() == 0 || k.numel() == 0)  // nothing attends: every gradient is zero
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options())};
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const TARParams p = make_params(q, k, v, sigma, strength, mode_sv, scale, q_offset, k_offset, tokens_per_frame,
                                  video_start, video_tokens);
  if (q.is_cpu()) {
    tar_attention_backward_cpu(p, grad_out, q, k, v, dq, dk, dv);
    return {dq, dk, dv};
  }
#ifdef VSTAR_WITH_CUDA
  TORCH_CHECK(q.is_cuda(), "tar_attention_backward: unsupported device ", q.device());
  check_cuda_limits(p, "tar_attention_backward");
  const c10::cuda::CUDAGuard guard(q.device());
  const TARGradStrides g{strides_of(grad_out), strides_of(dq), strides_of(dk), strides_of(dv)};
  at::Tensor workspace = at::empty({kBackwardStatsPerRow, p.batch * p.heads, p.len_q}, q.options().dtype(at::kFloat));
  const int err = tar_attention_backward_cuda_launch(
      p, g, cuda_dtype(q), grad_out.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
      dq.mutable_data_ptr(), dk.mutable_data_ptr(), dv.mutable_data_ptr(), workspace.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "tar_attention_backward (CUDA): kernel launch failed with CUDA error ", err);
  return {dq, dk, dv};
#else
  TORCH_CHECK(false, "tar_attention_backward: this build of the extension has no CUDA kernel (device ", q.device(),
              ")");
#endif
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
}

TORCH_LIBRARY_IMPL(vstar_kernels, CPU, m) {
  m.impl("tar_attention", &vstar::tar_attention);
  m.impl("tar_attention_backward", &vstar::tar_attention_backward);
}

#ifdef VSTAR_WITH_CUDA
TORCH_LIBRARY_IMPL(vstar_kernels, CUDA, m) {
  m.impl("tar_attention", &vstar::tar_attention);
  m.impl("tar_attention_backward", &vstar::tar_attention_backward);
}
#endif
