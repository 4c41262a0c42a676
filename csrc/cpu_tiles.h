// vstar-kernels: the CPU kernels' building blocks (fp32 tiles, at::vec), shared by the whole-row kernel
// (tar_attention_cpu.cpp: temporal attention, the backward) and the long-row kernel (tar_attention_cpu_long.cpp:
// video transformers' 3D attention). Internal to the CPU sources: everything here is inline.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "tar_attention.h"

namespace vstar {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int kRows = 6;          // micro-kernel rows
constexpr int kColVecs = 2;       // micro-kernel columns, in vectors
constexpr int64_t kStripFloats = 1 << 15;  // target size of one thread's score strip (128 KiB)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Row stride of a packed fp32 buffer with `cols` columns: strides that are multiples of 256 bytes map the rows a
// micro-kernel walks onto a few L1 sets (K^T at 256 frames thrashed), so they are skewed by one 32-byte vector.
inline int64_t skewed_stride(int64_t cols) { return cols % 64 == 0 ? cols + 8 : cols; }

// C[r, 0:ncols] (+)= sum_c A[r, c] * B[c, 0:ncols] for RB rows; A rows are `lda` apart, B rows `ldb` apart.
// ncols is a multiple of kVec; columns are processed kColVecs vectors at a time, then one vector at a time.
// Accumulate: add to C instead of overwriting it (the backward's dK and dV sums over query blocks).
template <int RB, bool Accumulate = false>
void micro_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t inner,
                int64_t ncols) {
  int64_t j = 0;
  for (; j + kColVecs * kVec <= ncols; j += kColVecs * kVec) {
    Vec acc[RB][kColVecs];
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < kColVecs; ++v) acc[r][v] = Accumulate ? Vec::loadu(c + r * ldc + j + v * kVec) : Vec(0.f);
    for (int64_t x = 0; x < inner; ++x) {
      Vec bv[kColVecs];
      for (int v = 0; v < kColVecs; ++v) bv[v] = Vec::loadu(b + x * ldb + j + v * kVec);
      for (int r = 0; r < RB; ++r) {
        const Vec av(a[r * lda + x]);
        for (int v = 0; v < kColVecs; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < kColVecs; ++v) acc[r][v].store(c + r * ldc + j + v * kVec);
  }
  for (; j < ncols; j += kVec) {
    Vec acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = Accumulate ? Vec::loadu(c + r * ldc + j) : Vec(0.f);
    for (int64_t x = 0; x < inner; ++x) {
      const Vec bv = Vec::loadu(b + x * ldb + j);
      for (int r = 0; r < RB; ++r) acc[r] = at::vec::fmadd(Vec(a[r * lda + x]), bv, acc[r]);
    }
    for (int r = 0; r < RB; ++r) acc[r].store(c + r * ldc + j);
  }
}

// C (m x ncols) (+)= A (m x inner) B (inner x ncols), rows blocked by kRows.
template <bool Accumulate = false>
void gemm_rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
               int64_t inner, int64_t ncols) {
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows)
    micro_gemm<kRows, Accumulate>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, inner, ncols);
  const float* ar = a + r * lda;
  float* cr = c + r * ldc;
  switch (m - r) {
    case 5: micro_gemm<5, Accumulate>(ar, lda, b, ldb, cr, ldc, inner, ncols); break;
    case 4: micro_gemm<4, Accumulate>(ar, lda, b, ldb, cr, ldc, inner, ncols); break;
    case 3: micro_gemm<3, Accumulate>(ar, lda, b, ldb, cr, ldc, inner, ncols); break;
    case 2: micro_gemm<2, Accumulate>(ar, lda, b, ldb, cr, ldc, inner, ncols); break;
    case 1: micro_gemm<1, Accumulate>(ar, lda, b, ldb, cr, ldc, inner, ncols); break;
    default: break;
  }
}

// s *= scale over a row (n a multiple of kVec).
inline void scale_row(float* s, float scale, int64_t n) {
  const Vec sv(scale);
  for (int64_t j = 0; j < n; j += kVec) (Vec::loadu(s + j) * sv).store(s + j);
}

inline float row_max(const float* s, int64_t n) {  // n is a multiple of kVec
  Vec m(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += kVec) m = at::vec::maximum(m, Vec::loadu(s + j));
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, m);
}

// s += coeff * g over the row, returning the new row max.
inline float add_bias_max(float* s, const float* g, float coeff, int64_t n) {
  const Vec cv(coeff);
  Vec m(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += kVec) {
    const Vec x = at::vec::fmadd(cv, Vec::loadu(g + j), Vec::loadu(s + j));
    x.store(s + j);
    m = at::vec::maximum(m, x);
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, m);
}

// s = exp(s - max), returning the row sum.
inline float exp_sum(float* s, float max, int64_t n) {
  const Vec mv(max);
  Vec sum(0.f);
  for (int64_t j = 0; j < n; j += kVec) {
    const Vec e = (Vec::loadu(s + j) - mv).exp_u20();
    e.store(s + j);
    sum = sum + e;
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
}

// The softmax backward of one row, in two passes: normalize_dot scales p[0:keys] by inv (P from exp(S - max)) and
// returns rowsum(P dP); softmax_grad writes dS' = P (dP - dot) over [0, keys), 0 over [keys, n) (n a multiple of
// kVec), and returns rowsum(dS' G) when g is given (the relative row max's coupling), else 0.
inline float normalize_dot(float* p, const float* dp, float inv, int64_t keys) {
  const Vec iv(inv);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= keys; j += kVec) {
    const Vec x = Vec::loadu(p + j) * iv;
    x.store(p + j);
    acc = at::vec::fmadd(x, Vec::loadu(dp + j), acc);
  }
  float dot = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; j < keys; ++j) {
    p[j] *= inv;
    dot += p[j] * dp[j];
  }
  return dot;
}

inline float softmax_grad(float* dp, const float* p, float dot, const float* g, int64_t keys, int64_t n) {
  const Vec dv(dot);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= keys; j += kVec) {
    const Vec x = Vec::loadu(p + j) * (Vec::loadu(dp + j) - dv);
    x.store(dp + j);
    if (g != nullptr) acc = at::vec::fmadd(x, Vec::loadu(g + j), acc);
  }
  float coupling = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; j < keys; ++j) {
    dp[j] = p[j] * (dp[j] - dot);
    if (g != nullptr) coupling += dp[j] * g[j];
  }
  std::fill(dp + keys, dp + n, 0.f);
  return coupling;
}

// The band row G(fi - fj) of each query token over `cols` key columns (0 where the query or the key token has no
// frame, and past Lk). The Gaussian is a table over the frame distances, computed once per call with tar_gaussian().
// Temporal layout (token = frame): row i is a slice of the table. Framed layout (tokens_per_frame > 1, text tokens):
// row() writes it into the caller's per-thread buffer, once per run of rows sharing a frame.
class GaussianRows {
 public:
  GaussianRows(const TARParams& p, int64_t cols) : framed_(p.framed), cols_(cols) {
    if (cols == 0) return;
    // local frames of each side (their own starts: chunks of a sequence fold differently); the table covers every
    // distance offset_delta + fi - fk between them
    q_frames_ = p.framed ? tar_frame_count(p.tokens_per_frame, p.video_start_q, p.video_end_q) : p.len_q;
    const int64_t k_frames = p.framed ? tar_frame_count(p.tokens_per_frame, p.video_start_k, p.video_end_k) : cols;
    table_.assign(q_frames_ > 0 ? q_frames_ - 1 + std::max<int64_t>(k_frames, 1) : 0, 0.f);
    for (int64_t t = 0; t < static_cast<int64_t>(table_.size()); ++t) {
      const int64_t dist = p.offset_delta + (q_frames_ - 1 - t);
      table_[t] = tar_gaussian(static_cast<float>(dist), p.gauss_log2_coeff);
    }
    if (p.framed) {
      key_frames_.resize(cols);
      for (int64_t j = 0; j < cols; ++j) key_frames_[j] = j < p.len_k ? tar_key_frame<int64_t>(p, j) : -1;
    }
  }

  // Query token i's row; `scratch` (cols floats, one per thread) and `cached` (the frame it holds, start with
  // kNoRow) carry it between calls of one thread.
  const float* row(const TARParams& p, int64_t i, float* scratch, int64_t& cached) const {
    if (!framed_) return table_.data() + (q_frames_ - 1 - i);
    const int64_t fi = tar_query_frame<int64_t>(p, i);
    if (fi != cached) {
      const float* t = fi >= 0 ? table_.data() + (q_frames_ - 1 - fi) : nullptr;
      for (int64_t j = 0; j < cols_; ++j) scratch[j] = t != nullptr && key_frames_[j] >= 0 ? t[key_frames_[j]] : 0.f;
      cached = fi;
    }
    return scratch;
  }

  static constexpr int64_t kNoRow = std::numeric_limits<int64_t>::min();

 private:
  bool framed_;
  int64_t cols_, q_frames_ = 0;
  std::vector<float> table_;
  std::vector<int64_t> key_frames_;
};

// ---- frame-distance profiles (tar_attention.h: FrameProfileView, tar_profile_pair, tar_profile_logit)

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// The profile of a query token's row over `cols` key columns: the positive-logit scale and the bias of every key
// (-inf where the pair is masked, and past Lk), written into the caller's per-thread buffers once per run of rows
// sharing a (frame, head). Like GaussianRows, the pairs come from tables over the frame distances, evaluated once per
// call with tar_profile_pair() (one table without the window's sinks, one for sink keys without the window):
// temporal rows are slices of them, framed rows gather them by key frame.
class ProfileRows {
 public:
  ProfileRows(const TARParams& p, int64_t cols) : framed_(p.framed), cols_(cols), len_k_(p.len_k) {
    if (cols == 0) return;
    q_frames_ = p.framed ? tar_frame_count(p.tokens_per_frame, p.video_start_q, p.video_end_q) : p.len_q;
    const int64_t k_frames = p.framed ? tar_frame_count(p.tokens_per_frame, p.video_start_k, p.video_end_k) : cols;
    span_ = q_frames_ > 0 ? q_frames_ - 1 + std::max<int64_t>(k_frames, 1) : 0;
    const int64_t heads = p.profile.head_stride == 0 ? 1 : p.heads;
    sink_limit_ = p.profile.radius >= 0 ? p.profile.sink_limit : kNoSinks;
    FrameProfileView windowed = p.profile, sinks = p.profile;
    windowed.sink_limit = kNoSinks;  // the pairs of keys that are no sinks
    sinks.radius = -1;               // the pairs of sink keys: no window
    scale_.resize(heads * span_);
    bias_.resize(heads * span_);
    sink_bias_.resize(heads * span_);
    // entry t of a head: query frame q_frames - 1 against key frame t, i.e. the frame distance
    // offset_delta + q_frames - 1 - t; query frame fi and key frame fk meet at t = q_frames - 1 - fi + fk
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < span_; ++t) {
        const ProfilePair pr = tar_profile_pair<int64_t>(windowed, h, p.offset_delta, q_frames_ - 1, t);
        const ProfilePair ps = tar_profile_pair<int64_t>(sinks, h, p.offset_delta, q_frames_ - 1, t);
        scale_[h * span_ + t] = pr.scale;
        bias_[h * span_ + t] = pr.kept ? pr.bias : kMinusInf;
        sink_bias_[h * span_ + t] = ps.kept ? ps.bias : kMinusInf;
      }
    heads_ = heads;
    if (p.framed) {
      key_frames_.resize(cols);
      for (int64_t j = 0; j < cols; ++j) key_frames_[j] = j < p.len_k ? tar_key_frame<int64_t>(p, j) : kPastKeys;
    }
  }

  // Query token i's row for head h into scale[0:cols], bias[0:cols]; `cached` (start with {kNoRow, -1}) holds the
  // (frame, head) they hold.
  void row(const TARParams& p, int64_t i, int64_t h, float* scale, float* bias, int64_t (&cached)[2]) const {
    const int64_t fi = tar_query_frame<int64_t>(p, i);
    if (cached[0] == fi && cached[1] == h) return;
    const int64_t at = (heads_ == 1 ? 0 : h) * span_ + (q_frames_ - 1 - fi);
    if (!framed_) {  // token = frame: slices of the tables, the sink keys (a prefix) patched, -inf past Lk
      std::copy(scale_.data() + at, scale_.data() + at + cols_, scale);
      std::copy(bias_.data() + at, bias_.data() + at + cols_, bias);
      const int64_t sinks = std::clamp<int64_t>(sink_limit_, 0, len_k_);
      std::copy(sink_bias_.data() + at, sink_bias_.data() + at + sinks, bias);
      std::fill(bias + len_k_, bias + cols_, kMinusInf);
    } else {
      for (int64_t j = 0; j < cols_; ++j) {
        const int64_t fk = key_frames_[j];
        if (fi < 0 || fk < 0) {  // a text token: never masked, scaled or biased (past Lk: -inf)
          scale[j] = 1.f;
          bias[j] = fk == kPastKeys ? kMinusInf : 0.f;
          continue;
        }
        scale[j] = scale_[at + fk];
        bias[j] = fk < sink_limit_ ? sink_bias_[at + fk] : bias_[at + fk];
      }
    }
    cached[0] = fi;
    cached[1] = h;
  }

  static constexpr int64_t kNoRow = std::numeric_limits<int64_t>::min();

 private:
  static constexpr int64_t kPastKeys = std::numeric_limits<int64_t>::min();
  static constexpr int64_t kNoSinks = std::numeric_limits<int64_t>::min();
  bool framed_;
  int64_t cols_, len_k_, q_frames_ = 0, span_ = 0, heads_ = 1, sink_limit_ = kNoSinks;
  std::vector<float> scale_, bias_, sink_bias_;
  std::vector<int64_t> key_frames_;
};

// max_j s[j] over the kept keys of a row (bias[j] > -inf), -inf when none: the relative row max of a profile.
inline float kept_row_max(const float* s, const float* bias, int64_t n) {  // n is a multiple of kVec
  const Vec none(kMinusInf);
  Vec m(kMinusInf);
  for (int64_t j = 0; j < n; j += kVec) {
    const Vec x = Vec::blendv(none, Vec::loadu(s + j), Vec::loadu(bias + j) > none);
    m = at::vec::maximum(m, x);
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, m);
}

// s[j] = (s[j] > 0 ? scale[j] * s[j] : s[j]) + bias[j] over a row: tar_profile_logit (natural units) with the row's
// ProfileRows; -inf where the pair is masked.
inline void apply_profile(float* s, const float* scale, const float* bias, int64_t n) {  // n: multiple of kVec
  const Vec zero(0.f);
  for (int64_t j = 0; j < n; j += kVec) {
    const Vec x = Vec::loadu(s + j);
    (Vec::blendv(x, x * Vec::loadu(scale + j), x > zero) + Vec::loadu(bias + j)).store(s + j);
  }
}

// s[j] = s[j] > 0 ? scale * s[j] : s[j] (tar_profile_scaled) over a row with one scale.
inline void scale_positive(float* s, float scale, int64_t n) {  // n is a multiple of kVec
  const Vec zero(0.f), sv(scale);
  for (int64_t j = 0; j < n; j += kVec) {
    const Vec x = Vec::loadu(s + j);
    Vec::blendv(x, x * sv, x > zero).store(s + j);
  }
}

// The backward through a profile's positive-logit scale: g[j] *= scale[j] where the unscaled logit s[j] > 0.
inline void scale_positive_grad(float* g, const float* s, const float* scale, int64_t n) {  // n: multiple of kVec
  const Vec zero(0.f);
  for (int64_t j = 0; j < n; j += kVec) {
    const Vec x = Vec::loadu(g + j);
    Vec::blendv(x, x * Vec::loadu(scale + j), Vec::loadu(s + j) > zero).store(g + j);
  }
}

// The relative row max's tied argmax over the kept keys of a row: the keys with s[j] == max and bias[j] > -inf.
inline Vec kept_ties(const float* s, const float* bias, float max, int64_t j) {
  return (Vec::loadu(s + j) == Vec(max)) & (Vec::loadu(bias + j) > Vec(kMinusInf));
}

// How many kept keys tie at the row max `max` (n a multiple of kVec).
inline int64_t count_kept_ties(const float* s, const float* bias, float max, int64_t n) {
  Vec count(0.f);
  for (int64_t j = 0; j < n; j += kVec) count = count + (kept_ties(s, bias, max, j) & Vec(1.f));
  return static_cast<int64_t>(at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, count));
}

// g[j] += share at the kept keys tied at the row max (n a multiple of kVec).
inline void add_at_kept_ties(float* g, const float* s, const float* bias, float max, float share, int64_t n) {
  for (int64_t j = 0; j < n; j += kVec)
    (Vec::loadu(g + j) + (kept_ties(s, bias, max, j) & Vec(share))).store(g + j);
}

template <typename scalar_t>
struct Strided {  // one (batch, head) slice of a (batch, frames, heads, head_dim) tensor
  const scalar_t* base;
  int64_t frame, dim;
  float at(int64_t f, int64_t c) const { return static_cast<float>(base[f * frame + c * dim]); }
};

// dst[0:n:stride] = scalar_t(src[0:n] * mul).
template <typename scalar_t>
inline void store_row(const float* src, int64_t n, float mul, scalar_t* dst, int64_t stride) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 1) {
      const Vec mv(mul);
      int64_t c = 0;
      for (; c + kVec <= n; c += kVec) (Vec::loadu(src + c) * mv).store(dst + c);
      for (; c < n; ++c) dst[c] = src[c] * mul;
      return;
    }
  }
  for (int64_t c = 0; c < n; ++c) dst[c * stride] = static_cast<scalar_t>(src[c] * mul);
}

// K^T (d rows of stride ld_k) and V (Lk rows of stride ld_v) of the (batch b, head h) slice, widened to fp32, with
// zero padding: what the forward kernels multiply against, packed once per run of tasks sharing the slice.
template <typename scalar_t>
inline void pack_keys_values(const TARParams& p, const scalar_t* k, const scalar_t* v, int64_t b, int64_t h,
                             float* kt, int64_t ld_k, float* vp, int64_t ld_v) {
  const Strided<scalar_t> ks{k + b * p.k.batch + h * p.k.head, p.k.frame, p.k.dim};
  const Strided<scalar_t> vs{v + b * p.v.batch + h * p.v.head, p.v.frame, p.v.dim};
  std::fill(kt, kt + p.head_dim * ld_k, 0.f);
  std::fill(vp, vp + p.len_k * ld_v, 0.f);
  for (int64_t j = 0; j < p.len_k; ++j)
    for (int64_t c = 0; c < p.head_dim; ++c) {
      kt[c * ld_k + j] = ks.at(j, c);
      vp[j * ld_v + c] = vs.at(j, c);
    }
}

// Query rows [m0, m0 + rows) of the (batch b, head h) slice, scaled by p.scale, as a rows x head_dim fp32 block.
template <typename scalar_t>
inline void pack_query_block(const TARParams& p, const scalar_t* q, int64_t b, int64_t h, int64_t m0, int64_t rows,
                             float* qp) {
  const Strided<scalar_t> qs{q + b * p.q.batch + h * p.q.head, p.q.frame, p.q.dim};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < p.head_dim; ++c) qp[r * p.head_dim + c] = qs.at(m0 + r, c) * p.scale;
}

// One task of the forward kernels: query rows [m0, m0 + rows) of the (batch b, head h) slice; tasks are numbered
// slice-major over blocks of `block` rows.
struct QueryTask {
  int64_t slice, b, h, m0, rows;
};

// Starts task `task`: its query rows packed into qp, and K, V of its slice into kt, vp unless `packed_slice` (the
// slice packed last by this thread) is already it.
inline QueryTask task_at(const TARParams& p, int64_t task, int64_t blocks, int64_t block) {
  const int64_t slice = task / blocks, m0 = (task % blocks) * block;
  return {slice, slice / p.heads, slice % p.heads, m0, std::min(block, p.len_q - m0)};
}

// The native engine's A of a task: its query rows, unscaled, in the input dtype, zero-padded to `ld` columns.
template <typename scalar_t>
inline void copy_query_block(const TARParams& p, const scalar_t* q, const QueryTask& t, scalar_t* out, int64_t ld) {
  const scalar_t* qb = q + t.b * p.q.batch + t.h * p.q.head;
  std::fill(out, out + t.rows * ld, scalar_t(0.f));
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t c = 0; c < p.head_dim; ++c) out[r * ld + c] = qb[(t.m0 + r) * p.q.frame + c * p.q.dim];
}

template <typename scalar_t>
inline QueryTask begin_task(const TARParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t task,
                            int64_t blocks, int64_t block, int64_t& packed_slice, float* kt, int64_t ld_k, float* vp,
                            int64_t ld_v, float* qp) {
  const QueryTask t = task_at(p, task, blocks, block);
  const int64_t slice = t.slice;
  if (slice != packed_slice) {
    pack_keys_values(p, k, v, t.b, t.h, kt, ld_k, vp, ld_v);
    packed_slice = slice;
  }
  pack_query_block(p, q, t.b, t.h, t.m0, t.rows, qp);
  return t;
}

// Calls fn(scalar_t{}) for the kernels' input dtypes.
template <typename Fn>
inline void dispatch_input_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "vstar_kernels::", op, " (CPU): unsupported dtype ", dtype);
  }
}

}  // namespace cpu
}  // namespace vstar
