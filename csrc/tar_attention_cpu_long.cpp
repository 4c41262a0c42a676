// vstar-kernels: TAR attention on the CPU for long rows (a video transformer's 3D attention, L of 10^3-10^5).
//
// The band of a framed layout depends on the (query frame, key frame) pair only, so the bias is constant over the
// keys of one frame. Keys are grouped by the band they get (KeyGroups: group 0 = keys without a frame, or every key
// when there is no bias; group 1 + f = the keys of frame f) and the kernel runs flash tiles, one online softmax per
// (query row, key group), on the *unbiased* logits:
//     M_g = max_{j in g} S_ij,   l_g = sum_{j in g} exp(S_ij - M_g),   acc_g = sum_{j in g} exp(S_ij - M_g) v_j.
// After the last key the row max of relative mode is exact (m = max_g M_g, over every key; a row max given by the
// call replaces it), and with the bias of each group b_g = coeff(m) * G(fi - f_g) (tar_attention.h; 0 for group 0
// and for rows without a frame)
//     out_i = sum_g exp(M_g + b_g - M*) acc_g / sum_g exp(M_g + b_g - M*) l_g,   M* = max_g (M_g + b_g),
// which is softmax(S + b) V exactly (exp(S - M_g) exp(M_g + b_g - M*) = exp(S + b_g - M*)), and the row's
// log-sum-exp is M* + log(sum_g exp(M_g + b_g - M*) l_g). One pass over K and V
// in both modes (relative mode needs no second sweep for its row max), and the Gaussian costs one exp2 per
// (row, group) instead of one per logit: a band that is zero almost everywhere (small sigma) costs nothing.
// Memory per thread: K^T and V of one (batch, head) packed in fp32, one BM x BN score tile, and BM x d accumulators
// per key group; never an Lq x Lk tensor.
// A frame-distance profile (p.profile.on) is constant over a (query frame, key group) pair too (tar_profile_pair):
// a tile's rows are scaled by their pair's positive-logit scale before the online softmax (the max of the scaled
// row is the scaled max: the scale is positive), rows whose pair is masked take no part (zeros into P V, no
// statistics), the pair's bias joins b_g, and the relative row max is tracked over the kept keys' unscaled logits.
// Key groups no query row of the task keeps (outside every row's window and not sinks, or masked by the bias table)
// are skipped: their tiles are never computed, nor their accumulators touched.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_tiles.h"
#include "tar_attention_cpu.h"

namespace vstar {
namespace {

using namespace cpu;  // NOLINT: the tiles of this kernel family

constexpr int64_t kLongRowKeys = 1024;  // from here on a row is long: flash tiles beat the whole-row strip
constexpr int64_t kMaxKeyGroups = 512;  // accumulators per query row (frames + 1); beyond, the strip kernel runs
constexpr int64_t kBlockM = 192;        // query rows per task (a multiple of the micro-kernel's 6): K and V
                                        // stream from L3 once per 192 rows (48 rows ran 1.3x SDPA at L = 8192)
constexpr int64_t kBlockN = 256;        // keys per score tile (512 measured no faster)
constexpr int64_t kAccFloats = 1 << 22; // the group accumulators' budget per thread (16 MiB): fewer rows per task
                                        // when there are many key groups

// Keys grouped by the band (and profile) they get: group 0 holds the keys without a frame (every key when the call
// has neither bias nor profile), group 1 + f the keys of local key frame f (frames of tokens_per_frame consecutive
// tokens from the keys' own start video_start_k, which is negative when the key chunk begins inside a frame: its
// first group is short).
class KeyGroups {
 public:
  explicit KeyGroups(const TARParams& p)
      : biased_(tar_has_bias(p) || p.profile.on), start_(p.video_start_k), end_(p.video_end_k),
        per_frame_(p.tokens_per_frame), len_(p.len_k) {}

  int64_t count() const { return biased_ ? 1 + tar_frame_count(per_frame_, start_, end_) : 1; }
  int64_t of(int64_t j) const {
    return biased_ && j >= start_ && j < end_ ? 1 + (j - start_) / per_frame_ : 0;
  }
  // One past the last key of the run of same-group keys that starts at j, at most `width` keys.
  int64_t run_end(int64_t j, int64_t width) const {
    int64_t stop = len_;
    if (biased_) {
      if (j < start_) stop = start_;
      else if (j < end_) stop = std::min(end_, start_ + ((j - start_) / per_frame_ + 1) * per_frame_);
    }
    return std::min({stop, j + width, len_});
  }

 private:
  bool biased_;
  int64_t start_, end_, per_frame_, len_;
};

// A profiled task's query frames (frames[r] of row m0 + r, -1 without a frame) and the key groups some of its rows
// keep (tar_profile_pair of each distinct query frame and each key frame; group 0, the keys without a frame, and
// every group of a row without a frame are always kept). Exact: a group marked inactive has no kept pair in the task.
void mark_kept_groups(const TARParams& p, int64_t h, int64_t m0, int64_t mb, int64_t* frames,
                      std::vector<char>& active) {
  const int64_t num_groups = static_cast<int64_t>(active.size());
  std::fill(active.begin() + 1, active.end(), 0);
  active[0] = 1;
  bool every_group = false;
  for (int64_t r = 0; r < mb; ++r) {
    frames[r] = tar_query_frame<int64_t>(p, m0 + r);
    if (r > 0 && frames[r] == frames[r - 1]) continue;
    if (frames[r] < 0) {
      every_group = true;
      continue;
    }
    for (int64_t g = 1; g < num_groups; ++g)
      if (!active[g] && tar_profile_pair<int64_t>(p.profile, h, p.offset_delta, frames[r], g - 1).kept) active[g] = 1;
  }
  if (every_group) std::fill(active.begin(), active.end(), 1);
}

// The native engine's keys of one (batch, head) slice: K^T and V in the input dtype, laid out per segment (a run of
// keys of one group: the text before the video, each frame, the text after), so that every tile, which starts at its
// segment's start or 256 keys further, starts a packed block of K^T (64 columns) and an even row of V.
struct KeySegment {
  int64_t start, end, kt_at, v_at;  // keys [start, end); where its K^T and V begin in the slice's buffers
};

std::vector<KeySegment> key_segments(const KeyGroups& groups, int64_t lk, int64_t d_e, int64_t d16) {
  std::vector<KeySegment> segments;
  int64_t kt_at = 0, v_at = 0;
  for (int64_t j = 0; j < lk;) {
    const int64_t end = groups.run_end(j, lk);
    segments.push_back({j, end, kt_at, v_at});
    kt_at += d_e * round_up(end - j, kPackAlign);
    v_at += round_up(end - j, 2) * d16;
    j = end;
  }
  return segments;
}

// Packs K^T (d_e x width16) and V (width2 x d16) of each segment of slice (b, h) into kt, v (zero past `keys` and in
// the padding), in oneDNN's layout when `packed` (row-major scratch in tmp_kt, tmp_v first), else row-major in place.
template <typename op_t>
void pack_segments(const TARParams& p, const op_t* k, const op_t* v, int64_t b, int64_t h, int64_t keys,
                   const std::vector<KeySegment>& segments, int64_t d_e, int64_t d16, bool packed, op_t* kt, op_t* vv,
                   op_t* tmp_kt, op_t* tmp_v) {
  const op_t* kb = k + b * p.k.batch + h * p.k.head;
  const op_t* vb = v + b * p.v.batch + h * p.v.head;
  for (const KeySegment& seg : segments) {
    const int64_t width = round_up(seg.end - seg.start, kPackAlign), rows = round_up(seg.end - seg.start, 2);
    op_t* kd = packed ? tmp_kt : kt + seg.kt_at;
    op_t* vd = packed ? tmp_v : vv + seg.v_at;
    std::fill(kd, kd + d_e * width, op_t(0.f));
    std::fill(vd, vd + rows * d16, op_t(0.f));
    for (int64_t j = seg.start; j < std::min(seg.end, keys); ++j)
      for (int64_t c = 0; c < p.head_dim; ++c) {
        kd[c * width + (j - seg.start)] = kb[j * p.k.frame + c * p.k.dim];
        vd[(j - seg.start) * d16 + c] = vb[j * p.v.frame + c * p.v.dim];
      }
    if (packed) {
      pack_native_b(kd, width, d_e, width, true, kt + seg.kt_at);
      pack_native_b(vd, d16, rows, d16, true, vv + seg.v_at);
    }
  }
}

// op_t: the products' operand type, as in the whole-row kernel: float (brgemm_f32, the micro-kernel; bf16/fp16
// widened while packing) or scalar_t (brgemm_native: Q, K^T, V and P in the dtype, S scaled in fp32).
template <typename scalar_t, typename op_t>
void long_row_forward(const TARParams& p, const GemmPlan plan, const scalar_t* q, const scalar_t* k,
                      const scalar_t* v, scalar_t* o) {
  constexpr bool native = !std::is_same_v<op_t, float>;
  const int64_t lq = p.len_q, lk = p.len_k, d = p.head_dim;
  const int64_t d_pad = round_up(d, native ? std::max(kVec, kPackAlign) : kVec);
  // K^T rows hold kVec spare zero columns: a tile starting mid-vector reads up to kVec - 1 columns past Lk
  const int64_t ld_k = skewed_stride(round_up(lk + kVec, kVec)), ld_v = skewed_stride(d_pad);
  const int64_t ld_s = skewed_stride(round_up(kBlockN, std::max(kVec, kPackAlign)));
  const KeyGroups groups(p);
  const int64_t num_groups = groups.count();
  const int64_t block_m = std::clamp<int64_t>(kAccFloats / (num_groups * d_pad) / kRows * kRows, kRows, kBlockM);
  const int64_t bm = std::min(block_m, lq);
  const int64_t num_qb = (lq + bm - 1) / bm;
  const bool has_bias = tar_has_bias(p);
  const bool profiled = p.profile.on;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  // the native engine: reduction dims even, B's columns by kPackAlign, keys by segment
  const int64_t d_e = round_up(d, 2);
  const std::vector<KeySegment> segments = native ? key_segments(groups, lk, d_e, d_pad) : std::vector<KeySegment>{};
  const int64_t native_kt = native ? segments.back().kt_at + d_e * round_up(segments.back().end -
                                                                            segments.back().start, kPackAlign) : 0;
  const int64_t native_v = native ? segments.back().v_at + round_up(segments.back().end - segments.back().start, 2) *
                                                               d_pad : 0;
  int64_t widest = 0;  // the longest segment, padded: the packing's row-major scratch
  for (const KeySegment& seg : segments) widest = std::max(widest, round_up(seg.end - seg.start, kPackAlign));
  const int64_t ld_p = round_up(kBlockN, kPackAlign);

  at::parallel_for(0, p.batch * p.heads * num_qb, 1, [&](int64_t begin, int64_t end) {
    const int64_t stats = num_groups * bm;
    const int64_t fp32_operands = native ? 0 : d * ld_k + lk * ld_v + bm * d;
    std::unique_ptr<float[]> scratch(
        new float[fp32_operands + bm * ld_s + stats * ld_v + 2 * stats + num_groups + bm]);
    float* kt = scratch.get();          // d x (lk + kVec), row stride ld_k (fp32 operands)
    float* vp = kt + d * ld_k;          // lk x d_pad, row stride ld_v
    float* qp = vp + lk * ld_v;         // bm x d: scale * Q of the block
    float* s = scratch.get() + fp32_operands;  // bm x kBlockN score tile, row stride ld_s
    float* acc = s + bm * ld_s;         // per group: bm x d_pad, row stride ld_v
    float* run_max = acc + stats * ld_v;  // per group: bm running maxima M_g
    float* run_sum = run_max + stats;     // per group: bm sums l_g
    float* weight = run_sum + stats;      // num_groups: one row's exp(M_g + b_g - M*)
    float* peak = weight + num_groups;    // bm: a profiled row's max over its kept keys (unscaled logits)
    // native operands: K^T and V by segment, the row-major scratch of the packing, the query block, P
    const int64_t packing = native && plan.packed ? d_e * widest + widest * d_pad : 0;
    std::unique_ptr<op_t[]> native_scratch(new op_t[native ? native_kt + native_v + packing + bm * d_e + bm * ld_p
                                                           : 0]);
    op_t* nkt = native_scratch.get();
    op_t* nv = nkt + native_kt;
    op_t* tmp_kt = nv + native_v;
    op_t* tmp_v = tmp_kt + d_e * widest;
    op_t* nq = tmp_kt + packing;
    op_t* np = nq + bm * d_e;
    std::vector<int64_t> frames(profiled ? bm : 0);     // a profiled task's query frames (-1: no frame)
    std::vector<char> active(num_groups, 1);            // key groups some row of the task keeps
    int64_t packed_bh = -1;
    for (int64_t task = begin; task < end; ++task) {
      QueryTask t;
      if constexpr (native) {
        t = task_at(p, task, num_qb, bm);
        if (t.slice != packed_bh) {
          pack_segments(p, k, v, t.b, t.h, tar_key_count(p, t.b), segments, d_e, d_pad, plan.packed, nkt, nv,
                        tmp_kt, tmp_v);
          packed_bh = t.slice;
        }
        copy_query_block(p, q, t, nq, d_e);
      } else {
        t = begin_task(p, q, k, v, task, num_qb, bm, packed_bh, kt, ld_k, vp, ld_v, qp);
      }
      const auto [slice, b, h, m0, mb] = t;
      if (profiled) {
        mark_kept_groups(p, h, m0, mb, frames.data(), active);
        for (int64_t g = 0; g < num_groups; ++g)
          if (active[g]) std::fill(acc + g * bm * ld_v, acc + (g + 1) * bm * ld_v, 0.f);
        std::fill(peak, peak + mb, minus_inf);
      } else {
        std::fill(acc, acc + stats * ld_v, 0.f);
      }
      std::fill(run_max, run_max + stats, minus_inf);
      std::fill(run_sum, run_sum + stats, 0.f);
      const int64_t keys = tar_key_count(p, b);  // varlen keys: the tiles stop there

      // one online softmax per (row, key group) over the unbiased logits (a profile's scaled ones)
      size_t segment = 0;  // native: the segment holding j0
      for (int64_t j0 = 0; j0 < keys;) {
        const int64_t g = groups.of(j0);
        if (!active[g]) {  // no row of the task keeps a key of this group: skip it whole
          j0 = std::min(groups.run_end(j0, keys), keys);
          continue;
        }
        const int64_t j1 = std::min(groups.run_end(j0, kBlockN), keys);
        const int64_t n = j1 - j0, n_pad = round_up(n, kVec);
        if constexpr (native) {  // the tile's blocks of K^T: it starts its segment or 256 keys into it
          while (segments[segment].end <= j0) ++segment;
          const KeySegment& seg = segments[segment];
          const int64_t width = round_up(seg.end - seg.start, kPackAlign), at = j0 - seg.start;
          // the view runs to the segment's end (its packed blocks' widths); the product stops at the tile's end
          const NativeB<op_t> tile{plan.packed ? nkt + seg.kt_at + at * d_e : nkt + seg.kt_at + at, width, d_e,
                                   width - at, plan.packed};
          gemm_native(nq, d_e, tile, s, ld_s, mb, d_e, false, 0, round_up(n, kPackAlign));
          for (int64_t r = 0; r < mb; ++r) scale_row(s + r * ld_s, p.scale, n_pad);
        } else {
          gemm_f32(plan, qp, d, kt + j0, ld_k, s, ld_s, mb, d, n_pad, false);
        }
        float* acc_g = acc + g * bm * ld_v;
        for (int64_t r = 0; r < mb; ++r) {
          float* row = s + r * ld_s;
          std::fill(row + n, row + n_pad, minus_inf);
          float tile_max;
          if (profiled) {
            const ProfilePair pr = tar_profile_pair<int64_t>(p.profile, h, p.offset_delta, frames[r], g - 1);
            if (!pr.kept) {  // this row keeps none of the group: no weight into P V, no statistics
              std::fill(row, row + n_pad, 0.f);
              continue;
            }
            const float raw = row_max(row, n_pad);
            peak[r] = std::max(peak[r], raw);
            if (pr.scale != 1.f) scale_positive(row, pr.scale, n_pad);
            tile_max = tar_profile_scaled(pr, raw);  // a positive scale keeps the argmax
          } else {
            tile_max = row_max(row, n_pad);
          }
          float& m = run_max[g * bm + r];
          const float m_new = std::max(m, tile_max);
          const float rescale = std::exp(m - m_new);  // 0 for the group's first tile
          run_sum[g * bm + r] = run_sum[g * bm + r] * rescale + exp_sum(row, m_new, n_pad);
          if (rescale != 1.f)
            for (int64_t c = 0; c < d_pad; ++c) acc_g[r * ld_v + c] *= rescale;
          m = m_new;
        }
        if constexpr (native) {  // P rounded to the dtype (the reduction padded to even with zeros) times V
          const KeySegment& seg = segments[segment];
          const int64_t n_e = round_up(n, 2);
          for (int64_t r = 0; r < mb; ++r) {
            at::vec::convert(s + r * ld_s, np + r * ld_p, n);
            std::fill(np + r * ld_p + n, np + r * ld_p + n_e, op_t(0.f));
          }
          const NativeB<op_t> values{nv + seg.v_at, d_pad, round_up(seg.end - seg.start, 2), d_pad, plan.packed};
          gemm_native(np, ld_p, values, acc_g, ld_v, mb, n_e, true, j0 - seg.start);
        } else {
          gemm_f32(plan, s, ld_s, vp + j0 * ld_v, ld_v, acc_g, ld_v, mb, n, d_pad, true);
        }
        j0 = j1;
      }

      // the bias per (row, group), now that the row max is known; then the groups merged
      scalar_t* orow = o + b * p.o.batch + h * p.o.head + m0 * p.o.frame;
      for (int64_t r = 0; r < mb; ++r) {
        float row_max_all = minus_inf;
        if (p.relative && p.row_max != nullptr) {
          row_max_all = p.row_max[tar_row_offset(p.row_max_s, b, m0 + r, h)];
        } else if (profiled) {
          row_max_all = peak[r];
        } else {
          for (int64_t g = 0; g < num_groups; ++g) row_max_all = std::max(row_max_all, run_max[g * bm + r]);
        }
        const int64_t fi = has_bias || profiled ? tar_query_frame<int64_t>(p, m0 + r) : -1;
        const float coeff = has_bias ? tar_bias_coeff(p, row_max_all, 1.f) : 0.f;
        float top = minus_inf;
        for (int64_t g = 0; g < num_groups; ++g) {
          const float m = run_max[g * bm + r];
          float biased = m;
          if (g > 0 && fi >= 0 && m != minus_inf) {
            if (profiled) biased += tar_profile_pair<int64_t>(p.profile, h, p.offset_delta, fi, g - 1).bias;
            if (has_bias)
              biased += coeff * tar_gaussian(static_cast<float>(p.offset_delta + fi - (g - 1)), p.gauss_log2_coeff);
          }
          weight[g] = biased;
          top = std::max(top, biased);
        }
        float total = 0.f;
        for (int64_t g = 0; g < num_groups; ++g) {
          weight[g] = run_max[g * bm + r] == minus_inf ? 0.f : std::exp(weight[g] - top);
          total += weight[g] * run_sum[g * bm + r];
        }
        float* out_row = acc + r * ld_v;  // group 0's row, overwritten with the merged row
        for (int64_t c = 0; c < d_pad; ++c) out_row[c] *= weight[0];
        for (int64_t g = 1; g < num_groups; ++g) {
          if (weight[g] == 0.f) continue;
          const float* acc_row = acc + (g * bm + r) * ld_v;
          for (int64_t c = 0; c < d_pad; ++c) out_row[c] += weight[g] * acc_row[c];
        }
        if (profiled && top == minus_inf) {  // no kept key in the row: output 0, lse -inf
          store_row(out_row, d, 0.f, orow + r * p.o.frame, p.o.dim);
          if (p.lse != nullptr) p.lse[tar_row_offset(p.lse_s, b, m0 + r, h)] = minus_inf;
          continue;
        }
        store_row(out_row, d, 1.f / total, orow + r * p.o.frame, p.o.dim);
        if (p.lse != nullptr) p.lse[tar_row_offset(p.lse_s, b, m0 + r, h)] = top + std::log(total);
      }
    }
    release_engine(plan);
  });
}

template <typename scalar_t>
void tar_attention_cpu_long_impl(const TARParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                 scalar_t* o) {
  with_operand_type<scalar_t>([&](const GemmPlan& plan, auto op) {
    long_row_forward<scalar_t, decltype(op)>(p, plan, q, k, v, o);
  });
}

}  // namespace

bool tar_attention_cpu_long_applies(const TARParams& p) {
  if (p.len_k < kLongRowKeys) return false;
  if (!tar_has_bias(p) && !p.profile.on) return true;  // plain attention: one key group
  return p.framed && KeyGroups(p).count() <= kMaxKeyGroups;
}

void tar_attention_cpu_long(const TARParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& out) {
  cpu::dispatch_input_dtype(q.scalar_type(), "tar_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    tar_attention_cpu_long_impl<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                          v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace vstar
