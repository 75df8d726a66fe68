// gpt2's own CPU kernels: the matrix products of a decode step (a few rows times a
// weight matrix) at the machine's memory bandwidth.
//
// Decoding a token on a CPU reads every weight once and does two flops with each, so
// its speed is the rate at which the weights stream from memory. PyTorch's kernels
// for one to eight rows of bf16 or int8 weights read them at about half that rate
// (bench/CPU_NOTES.md); these read them at close to the full rate:
//
//   gpt2::bf16_linear(x, weight, bias?)  bf16 rows x bf16 weight (out, in), fp32 sums
//       (AVX512-BF16 `vdpbf16ps`), bias added in fp32, result rounded to bf16.
//   gpt2::int8_linear(x, weight, weight_sum, weight_scale, bias?)  fp32 rows, each
//       quantized on the fly to 8 bits over its own range (asymmetric, as FBGEMM does
//       for one row), times an int8 weight (out, in) with one scale per output channel
//       (AVX512-VNNI `vpdpbusd`, exact int32 sums), rescaled to fp32 with the bias.
//   gpt2::int8_quantize_rows(x, scale!, zero!), gpt2::int8_rescale(acc, scale, zero,
//       weight_sum, weight_scale, bias?)  int8_linear in two halves, around
//       oneDNN's int8 x int8 product (torch._int_mm) for prompts
//   gpt2::bf16_linear_amx / int8_linear_amx / int8wo_linear_amx  the same products on Intel AMX
//       tiles, over a copy of the weight laid out for them (see "AMX" below).
//   gpt2::int8_linear_avx2  int8 on CPUs with AVX2 only (7-bit activations).
//   gpt2::int8wo_linear(x, weight, weight_scale, bias?)  int8 weights x bf16 rows (the
//       "int8-weight-only" method), AVX512-BF16, fp32 sums and result.
//   gpt2::fp32_linear / fp32_linear_avx2  fp32 rows x fp32 weight, 2-8 rows (AVX-512 / AVX2 FMA).
//   gpt2::argmax_rows, gpt2::gelu_tanh (each also _avx2)  greedy decoding's argmax; GPT-2's GELU.
//   gpt2::amx_ready()  whether this CPU and OS run the AMX kernels.
//
// The AVX-512 kernels keep every row's running sums in registers for a few output
// channels at once, so each weight is loaded once for all rows, and prefetch the
// next channels' weights while the current ones are summed: that prefetch is most of
// the speed (without it the rows stream at 8-16 GB/s, with it at 20-22 on a 22 GB/s
// machine). The work is split over PyTorch's threads by output channel; more rows than
// one block (prompts) take the weight a cache-sized slice at a time (rows_by_slices).
//
// Built by `gpt2/cpu_kernels.py` on first use against PyTorch's stable C ABI (no
// ATen headers: ~10 s to compile); each kernel is compiled for its instruction set
// with a target attribute and refuses to run on a CPU without it.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

namespace {

constexpr int kMaxRows = 8;  // rows summed together per pass over the weights (AVX-512, AVX2)
// How far ahead the weights are prefetched: channel groups (AVX-512 kernels), 2 KB
// slices (AMX). Measured: 2 groups ~5% faster than 1 at 8 rows, no better at 4 or 8;
// AMX 4 or 8 slices ~25% faster than 2, and than prefetching one line per slice.
constexpr int kGroupsAhead = 2;

// Where the int8 and fp32 AVX-512/AVX2 kernels prefetch the weights to: L2 on AMD CPUs,
// L1 elsewhere. On a 2-core AMD EPYC (Zen 4), 1-8 rows of a 160 MB int8 weight streamed
// 1.2-2x faster with L2, and 124M decoded 1.37x faster in int8 at batch 1, 1.15x at 8,
// fp32 1.12-1.29x at 8 (bench/CPU_NOTES.md); the bf16 tiles were not faster with L2
// there and keep L1, as do all kernels on the Intel Xeons (AMX) they were tuned on.
inline bool prefetch_to_l2() {
  static const bool amd = [] {
    __builtin_cpu_init();
    return (bool)__builtin_cpu_is("amd");
  }();
  return amd;
}

inline void prefetch_weights(const void* p, bool l2) {
  if (l2) {
    _mm_prefetch((const char*)p, _MM_HINT_T1);
  } else {
    _mm_prefetch((const char*)p, _MM_HINT_T0);
  }
}
constexpr int kSlicesAhead = 4;

#define GPT2_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define GPT2_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define GPT2_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))  // shared helpers, fp32

bool has_avx512() {  // what GPT2_AVX512 code needs
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

void check_matrix(const Tensor& t, ScalarType dtype, const char* name) {
  STD_TORCH_CHECK(t.is_cpu() && t.dim() == 2 && t.is_contiguous() && t.scalar_type() == dtype,
                  "gpt2 CPU kernel: ", name, " must be a contiguous 2-d CPU tensor of the kernel's dtype");
}

void check_vector(const Tensor& t, ScalarType dtype, int64_t n, const char* name) {
  STD_TORCH_CHECK(t.is_cpu() && t.dim() == 1 && t.is_contiguous() && t.scalar_type() == dtype &&
                      t.size(0) == n,
                  "gpt2 CPU kernel: ", name, " must be a contiguous CPU vector, one per output");
}

// Channels [o0, o1) of `out` per thread, in whole groups of `group`.
template <class F>
void split_channels(int64_t out, int64_t group, const F& f) {
  const int64_t groups = (out + group - 1) / group;
  torch::stable::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    f(g0 * group, std::min(g1 * group, out));
  });
}

// f(std::integral_constant<int, n>) for 1 <= n <= kMaxRows: each row count has its own
// compiled tile, with its sums in registers.
template <class F>
void with_rows(int64_t n, const F& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, kMaxRows>{}); break;
  }
}

// f(r, rows_now, s0, s1) for every block of up to kMaxRows rows from row r (rows_now as
// an integral_constant) and slice [s0, s1) of the `out` channels, the channels split
// over PyTorch's threads. One block of rows (decoding) takes each thread's channels in
// one pass. Past that, the channels go in slices of about kSliceBytes of weight (rows of
// `row_bytes` each), each slice through every block of rows while it is in the core's
// cache, so the weight streams from memory once whatever the rows (a block at a time
// over the whole weight read it once per block: 124M's LM head is 38-154 MB).
constexpr int64_t kSliceBytes = 128 * 1024;
constexpr int64_t kChannelGroup = 24;  // a multiple of every kernel's channels per tile

template <class F>
void rows_by_slices(int64_t rows, int64_t out, int64_t row_bytes, const F& f) {
  const int64_t slice = rows <= kMaxRows ? out
      : std::max<int64_t>(1, kSliceBytes / (row_bytes * kChannelGroup)) * kChannelGroup;
  split_channels(out, kChannelGroup, [&](int64_t o0, int64_t o1) {
    for (int64_t s0 = o0; s0 < o1; s0 += slice) {
      const int64_t s1 = std::min(o1, s0 + slice);
      for (int64_t r = 0; r < rows; r += kMaxRows)
        with_rows(std::min<int64_t>(kMaxRows, rows - r), [&](auto rows_now) { f(r, rows_now, s0, s1); });
    }
  });
}

// ---- sums across the 16 lanes of 16 registers at once ----------------------------------
//
// A tile ends with R x OB registers of 16 partial sums each. Summing each register's
// lanes on its own costs ~10 dependent shuffles and adds per register; these trees sum
// 16 registers in 45 operations: lane j of the result is the sum of v[j]'s lanes.
// Pairs of registers are interleaved and added (32-bit, then 64-bit elements within
// each 128-bit lane), then 128-bit lanes are exchanged and added twice.

GPT2_VNNI inline __m512i lane_sums16(const __m512i* v) {
  __m512i a[8], b[4], c[2];
  for (int k = 0; k < 8; k++)
    a[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]),
                            _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; k++)
    b[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * k], a[2 * k + 1]),
                            _mm512_unpackhi_epi64(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 2; k++)
    c[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * k], b[2 * k + 1], 0x88),
                            _mm512_shuffle_i32x4(b[2 * k], b[2 * k + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88),
                          _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

GPT2_AVX512 inline __m512 lane_sums16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; k++)
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; k++) {
    const __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
    b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int k = 0; k < 2; k++)
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// After lane_sums16, lane j of a tile's sums belongs to row j / OB and channel j % OB.
// lanes_of_channel(OB): each lane's channel, for spreading per-channel values (weight
// scale, bias) over the lanes with one permute; then row r's OB results are lanes
// r * OB ... r * OB + OB - 1, moved to the front by a permute by (lane + r * OB).
GPT2_AVX512 inline __m512i lanes_of_channel(int ob) {
  alignas(64) int32_t idx[16];
  for (int j = 0; j < 16; j++) idx[j] = j % ob;
  return _mm512_load_si512(idx);
}

GPT2_AVX512 inline __m512i lanes_from(int first) {
  return _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                          _mm512_set1_epi32(first));
}

// ---- bf16 ----------------------------------------------------------------------------

GPT2_BF16 inline __m512bh load_bf16(const uint16_t* p, int64_t left) {
  // 32 bf16 values, or the `left` < 32 that remain with zeros after them
  if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << left) - 1), p);
}

// int8-weight-only's weights (below): 32 int8 widened to bf16, or the `left` < 32 that
// remain with zeros after them.
GPT2_BF16 inline __m512bh load_int8_as_bf16(const int8_t* p, int64_t left) {
  const __m256i v = left >= 32 ? _mm256_loadu_si256((const __m256i*)p)
                               : _mm256_maskz_loadu_epi8((__mmask32)((1u << left) - 1), p);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
  // an int8 is exact in bf16, which is the high half of its fp32 bits: lo's, then hi's
  // (one permute; vcvtne2ps2bf16 made the kernels ~30% slower)
  const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                       31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return (__m512bh)_mm512_permutex2var_epi16(_mm512_castps_si512(lo), odd, _mm512_castps_si512(hi));
}

GPT2_BF16 inline __m512bh load_weights(const uint16_t* p, int64_t left) { return load_bf16(p, left); }
GPT2_BF16 inline __m512bh load_weights(const int8_t* p, int64_t left) { return load_int8_as_bf16(p, left); }

// The sums of R bf16 rows x (in each) times OB weight rows from wo (bf16, or int8 widened
// to bf16; nb <= OB of them real): R * OB accumulators of 16 fp32 partial sums, then
// lane j of the result = row j / OB, channel j % OB. (Inlined by force: left to GCC,
// both kernels ran 3-6% slower at 8 rows.)
template <int R, int OB, class W>
GPT2_BF16 __attribute__((always_inline)) inline __m512 bf16_tile(const uint16_t* x, const W* wo, int64_t in, int nb) {
  const bool l2 = false;  // (L2 measured slower here on the AMD EPYC: 0.8-0.95x decoding)
  static_assert(R * OB <= 16, "a tile's sums must fit one register");
  __m512 acc[R][OB];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < OB; c++) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 32) {
    const int64_t left = in - i;
    __m512bh wv[OB];
    for (int c = 0; c < OB; c++) {
      // the next group's weights, a cache line each, while this group is summed
      if (sizeof(W) == 2 || (i & 63) == 0)  // (bf16: every step is a new line)
        prefetch_weights(wo + (OB * kGroupsAhead + c) * in + i, l2);
      wv[c] = c < nb ? load_weights(wo + c * in + i, left) : (__m512bh)_mm512_setzero_si512();
    }
    for (int r = 0; r < R; r++) {
      const __m512bh xv = load_bf16(x + r * in + i, left);
      for (int c = 0; c < OB; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv[c], xv);
    }
  }
  __m512 tile[16];
  for (int j = 0; j < 16; j++) tile[j] = j < R * OB ? acc[j / OB][j % OB] : _mm512_setzero_ps();
  return lane_sums16(tile);
}

// y[r, o] = sum_i x[r, i] w[o, i] (+ b[o]) for channels [o0, o1): OB channels at a time
// against R rows (bf16_tile), rounded to bf16.
template <int R, int OB>
GPT2_BF16 void bf16_channels(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y,
                             int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const __m512i by_channel = lanes_of_channel(OB);
  for (int64_t o = o0; o < o1; o += OB) {
    const int nb = (int)std::min<int64_t>(OB, o1 - o);
    __m512 sums = bf16_tile<R, OB>(x, w + o * in, in, nb);
    const __mmask16 valid = (__mmask16)((1u << nb) - 1);
    if (b) {  // bf16 -> fp32 is a 16-bit shift
      const __m512i bias = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, b + o));
      sums = _mm512_add_ps(sums, _mm512_permutexvar_ps(by_channel, _mm512_castsi512_ps(
                                                                  _mm512_slli_epi32(bias, 16))));
    }
    const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(sums);  // to bf16, nearest even
    for (int r = 0; r < R; r++) {
      const __m256i first = _mm256_add_epi16(
          _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          _mm256_set1_epi16((short)(r * OB)));
      _mm256_mask_storeu_epi16(y + r * out + o, valid, _mm256_permutexvar_epi16(first, rounded));
    }
  }
}

// R rows x channels [o0, o1) (the caller splits the channels: rows_by_slices)
template <int R>
GPT2_BF16 void bf16_rows(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y,
                         int64_t in, int64_t out, int64_t o0, int64_t o1) {
  constexpr int OB = R <= 2 ? 4 : 2;  // R * OB accumulators within the 32 registers
  bf16_channels<R, OB>(x, w, b, y, in, out, o0, o1);
}

// Rows x (rows, in) times weight (out, in) (+ bias), both of one element type E (float,
// or uint16_t holding bf16), through run(rows as an integral_constant, the block's
// arguments for a *_rows<R>, channels [s0, s1)) over rows_by_slices: checked, result
// allocated.
template <class E, class Run>
Tensor dense_in_row_blocks(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                           ScalarType dtype, Run run) {
  check_matrix(x, dtype, "x");
  check_matrix(weight, dtype, "weight");
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  STD_TORCH_CHECK(weight.size(1) == in, "gpt2 CPU kernel: x and weight widths differ");
  const E* b = nullptr;
  if (bias.has_value()) {
    check_vector(*bias, dtype, out, "bias");
    b = (const E*)bias->const_data_ptr();
  }
  Tensor y = torch::stable::new_empty(x, {rows, out});
  const auto* xp = (const E*)x.const_data_ptr();
  const auto* wp = (const E*)weight.const_data_ptr();
  auto* yp = (E*)y.mutable_data_ptr();
  rows_by_slices(rows, out, in * (int64_t)sizeof(E), [&](int64_t r, auto rows_now, int64_t s0, int64_t s1) {
    run(rows_now, xp + r * in, wp, b, yp + r * out, in, out, s0, s1);
  });
  return y;
}

Tensor bf16_linear(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("avx512bf16"),
                  "gpt2 CPU kernel bf16_linear: this CPU has no AVX512-BF16");
  return dense_in_row_blocks<uint16_t>(x, weight, bias, ScalarType::BFloat16,
                                       [](auto rows_now, auto... args) {
                                         bf16_rows<decltype(rows_now)::value>(args...);
                                       });
}

// ---- int8 weights x bf16 activations ("int8-weight-only") -----------------------------
//
// Each fp32 row rounded to bf16 (nearest even, as x.to(torch.bfloat16)), the int8 weight
// widened to bf16 in registers (exact: every int8 is a bf16), fp32 sums (`vdpbf16ps`),
// then each channel's scale and the bias in fp32. Half the bytes of the bf16 kernel's
// weights for five more instructions per 32 weights. PyTorch's kernel for this
// (_weight_int8pack_mm) reads them at a third of the bandwidth (bench/CPU_NOTES.md).
// The widening is load_int8_as_bf16, above, beside the bf16 kernel's tile (bf16_tile).

// y[r, o] = ws[o] sum_i x[r, i] w[o, i] (+ b[o]) for channels [o0, o1), x in bf16: the
// bf16 kernel's tiles with int8 weights and an fp32 result.
template <int R, int OB>
GPT2_BF16 void int8wo_channels(const uint16_t* x, const int8_t* w, const float* ws, const float* b,
                               float* y, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const __m512i by_channel = lanes_of_channel(OB);
  for (int64_t o = o0; o < o1; o += OB) {
    const int nb = (int)std::min<int64_t>(OB, o1 - o);
    const __m512 sums = bf16_tile<R, OB>(x, w + o * in, in, nb);
    const __mmask16 valid = (__mmask16)((1u << nb) - 1);
    __m512 yv = _mm512_mul_ps(sums, _mm512_permutexvar_ps(by_channel, _mm512_maskz_loadu_ps(valid, ws + o)));
    if (b) yv = _mm512_add_ps(yv, _mm512_permutexvar_ps(by_channel, _mm512_maskz_loadu_ps(valid, b + o)));
    for (int r = 0; r < R; r++)
      _mm512_mask_storeu_ps(y + r * out + o, valid, _mm512_permutexvar_ps(lanes_from(r * OB), yv));
  }
}

template <int R>
GPT2_BF16 void int8wo_rows(const uint16_t* x, const int8_t* w, const float* ws, const float* b,
                           float* y, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  constexpr int OB = R <= 2 ? 4 : 2;  // as bf16_rows
  int8wo_channels<R, OB>(x, w, ws, b, y, in, out, o0, o1);
}

GPT2_BF16 void round_to_bf16(const float* x, uint16_t* xb, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(xb + i, valid, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, x + i)));
  }
}

// What both int8-weight-only ops take besides the weight: fp32 rows x (rows, in), here
// rounded to bf16, and per output channel the weight's scale and the bias (optional);
// checked, with the result (rows, out) allocated.
struct Int8woCall {
  int64_t rows, in;
  std::vector<uint16_t> xb;
  const float* ws;
  const float* b;  // nullptr: no bias
  Tensor y;
  float* yp;
};

Int8woCall int8wo_call(const Tensor& x, int64_t out, const Tensor& weight_scale,
                       const std::optional<Tensor>& bias, bool whole_blocks = false) {
  check_matrix(x, ScalarType::Float, "x");
  check_vector(weight_scale, ScalarType::Float, out, "weight_scale");
  const float* b = nullptr;
  if (bias.has_value()) {
    check_vector(*bias, ScalarType::Float, out, "bias");
    b = (const float*)bias->const_data_ptr();
  }
  const int64_t rows = x.size(0), in = x.size(1);
  // whole_blocks: past 16 rows, zero rows up to a whole block of 16 (the AMX kernel's)
  std::vector<uint16_t> xb((whole_blocks && rows > 16 ? (rows + 15) / 16 * 16 : rows) * in);
  round_to_bf16((const float*)x.const_data_ptr(), xb.data(), rows * in);
  Tensor y = torch::stable::new_empty(x, {rows, out});
  return {rows, in, std::move(xb), (const float*)weight_scale.const_data_ptr(), b, y,
          (float*)y.mutable_data_ptr()};
}

// x (rows, in) fp32, weight (out, in) int8, weight_scale (out,) fp32, bias (out,) fp32.
Tensor int8wo_linear(Tensor x, Tensor weight, Tensor weight_scale, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("avx512bf16"),
                  "gpt2 CPU kernel int8wo_linear: this CPU has no AVX512-BF16");
  check_matrix(weight, ScalarType::Char, "weight");
  const int64_t out = weight.size(0);
  Int8woCall c = int8wo_call(x, out, weight_scale, bias);
  STD_TORCH_CHECK(weight.size(1) == c.in, "gpt2 CPU kernel: x and weight widths differ");
  const auto* wp = (const int8_t*)weight.const_data_ptr();
  rows_by_slices(c.rows, out, c.in, [&](int64_t r, auto rows_now, int64_t s0, int64_t s1) {
    int8wo_rows<decltype(rows_now)::value>(c.xb.data() + r * c.in, wp, c.ws, c.b, c.yp + r * out,
                                           c.in, out, s0, s1);
  });
  return c.y;
}

// ---- fp32 ----------------------------------------------------------------------------
//
// The bf16 kernel's tiles with fp32 weights and fused multiply-adds: 16 weights per
// cache line instead of 32. PyTorch's fp32 products are close to the bandwidth at one
// row (MKL's matrix-vector product) but not at 2-8, where MKL re-packs the weight on
// every call and oneDNN reads a blocked copy of it (as much memory again) at ~70%.

GPT2_AVX512 inline __m512 load_f32(const float* p, int64_t left) {
  // 16 floats, or the `left` < 16 that remain with zeros after them
  if (left >= 16) return _mm512_loadu_ps(p);
  return _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), p);
}

template <int R, int OB>
GPT2_AVX512 void fp32_channels(const float* x, const float* w, const float* b, float* y,
                               int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const bool l2 = prefetch_to_l2();
  static_assert(R * OB <= 16, "a tile's sums must fit one register");
  const __m512i by_channel = lanes_of_channel(OB);
  for (int64_t o = o0; o < o1; o += OB) {
    const int nb = (int)std::min<int64_t>(OB, o1 - o);
    __m512 acc[R][OB];
    for (int r = 0; r < R; r++)
      for (int c = 0; c < OB; c++) acc[r][c] = _mm512_setzero_ps();
    const float* wo = w + o * in;
    for (int64_t i = 0; i < in; i += 16) {
      const int64_t left = in - i;
      __m512 wv[OB];
      for (int c = 0; c < OB; c++) {
        prefetch_weights(wo + (OB * kGroupsAhead + c) * in + i, l2);
        wv[c] = c < nb ? load_f32(wo + c * in + i, left) : _mm512_setzero_ps();
      }
      for (int r = 0; r < R; r++) {
        const __m512 xv = load_f32(x + r * in + i, left);
        for (int c = 0; c < OB; c++) acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
      }
    }
    __m512 tile[16];  // lane j of the sums: row j / OB, channel j % OB
    for (int j = 0; j < 16; j++) tile[j] = j < R * OB ? acc[j / OB][j % OB] : _mm512_setzero_ps();
    __m512 sums = lane_sums16(tile);
    const __mmask16 valid = (__mmask16)((1u << nb) - 1);
    if (b) sums = _mm512_add_ps(sums, _mm512_permutexvar_ps(by_channel, _mm512_maskz_loadu_ps(valid, b + o)));
    for (int r = 0; r < R; r++)
      _mm512_mask_storeu_ps(y + r * out + o, valid, _mm512_permutexvar_ps(lanes_from(r * OB), sums));
  }
}

template <int R>
GPT2_AVX512 void fp32_rows(const float* x, const float* w, const float* b, float* y, int64_t in,
                           int64_t out, int64_t o0, int64_t o1) {
  // R * OB accumulators, OB weights and a row within the 32 registers
  constexpr int OB = R <= 2 ? 8 : R <= 4 ? 4 : 2;
  fp32_channels<R, OB>(x, w, b, y, in, out, o0, o1);
}

Tensor fp32_linear(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(has_avx512(), "gpt2 CPU kernel fp32_linear: this CPU has no AVX-512");
  return dense_in_row_blocks<float>(x, weight, bias, ScalarType::Float, [](auto rows_now, auto... args) {
    fp32_rows<decltype(rows_now)::value>(args...);
  });
}

// ---- int8 ----------------------------------------------------------------------------

// A row holding NaN or inf: its 8-bit values are zeros and its scale NaN, so the
// product's row is NaN, as a float product's would be (and the model's NaN check sees
// it), not finite garbage. (min/max drop a NaN, so the quantizers also sum x * 0: NaN
// from a NaN or an inf, else exactly 0.)
inline bool not_finite_row(float zeros_sum, int64_t in, uint8_t* q, float* scale, int32_t* zero) {
  if (zeros_sum == 0.0f) return false;
  std::memset(q, 0, (size_t)in);
  *scale = NAN;
  *zero = 0;
  return true;
}

// One row to 8 bits over its own range [lo, hi] (which includes 0): q = round(x / s) + z,
// clamped to [0, 255], so x ~= s * (q - z). An all-zero row gets s = 1, z = 0.
GPT2_VNNI void quantize_row(const float* x, int64_t in, uint8_t* q, float* scale, int32_t* zero) {
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps(), zeros = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
    zeros = _mm512_add_ps(zeros, _mm512_mul_ps(v, _mm512_setzero_ps()));
  }
  float l = _mm512_reduce_min_ps(lo), h = _mm512_reduce_max_ps(hi);
  float zeros_sum = _mm512_reduce_add_ps(zeros);
  for (; i < in; i++) {
    l = std::min(l, x[i]);
    h = std::max(h, x[i]);
    zeros_sum += x[i] * 0.0f;
  }
  if (not_finite_row(zeros_sum, in, q, scale, zero)) return;
  float s = (h - l) / 255.0f;
  if (!(s > 0.0f)) s = 1.0f;  // all zeros
  const int32_t z = (int32_t)std::nearbyint(std::min(255.0f, std::max(0.0f, -l / s)));
  const float inv = 1.0f / s;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i vz = _mm512_set1_epi32(z), v0 = _mm512_setzero_si512(),
                v255 = _mm512_set1_epi32(255);
  for (i = 0; i + 16 <= in; i += 16) {
    // cvtps rounds to nearest even (the default rounding mode)
    __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv)), vz);
    v = _mm512_min_epi32(_mm512_max_epi32(v, v0), v255);
    _mm_storeu_si128((__m128i*)(q + i), _mm512_cvtepi32_epi8(v));
  }
  for (; i < in; i++) {
    const int32_t v = (int32_t)std::nearbyint(x[i] * inv) + z;
    q[i] = (uint8_t)std::min(255, std::max(0, v));
  }
  *scale = s;
  *zero = z;
}

GPT2_VNNI inline __m512i load_i8(const void* p, int64_t left) {
  // 64 bytes, or the `left` < 64 that remain with zeros after them
  if (left >= 64) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi8((__mmask64)((1ull << left) - 1), p);
}

// y[r, o] = xs[r] ws[o] (sum_i q[r, i] w[o, i] - z[r] wsum[o]) (+ b[o]) for [o0, o1).
template <int R, int OB>
GPT2_VNNI void int8_channels(const uint8_t* q, const float* xs, const int32_t* xz, const int8_t* w,
                             const int32_t* wsum, const float* ws, const float* b, float* y,
                             int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const bool l2 = prefetch_to_l2();
  static_assert(R * OB <= 16, "a tile's sums must fit one register");
  const __m512i by_channel = lanes_of_channel(OB);
  alignas(64) int32_t zero_of_lane[16] = {};
  alignas(64) float scale_of_lane[16] = {};
  for (int j = 0; j < R * OB; j++) {
    zero_of_lane[j] = xz[j / OB];
    scale_of_lane[j] = xs[j / OB];
  }
  const __m512i row_zero = _mm512_load_si512(zero_of_lane);
  const __m512 row_scale = _mm512_load_ps(scale_of_lane);
  for (int64_t o = o0; o < o1; o += OB) {
    const int nb = (int)std::min<int64_t>(OB, o1 - o);
    __m512i acc[R][OB];
    for (int r = 0; r < R; r++)
      for (int c = 0; c < OB; c++) acc[r][c] = _mm512_setzero_si512();
    const int8_t* wo = w + o * in;
    for (int64_t i = 0; i < in; i += 64) {
      const int64_t left = in - i;
      __m512i wv[OB];
      for (int c = 0; c < OB; c++) {
        prefetch_weights(wo + (OB * kGroupsAhead + c) * in + i, l2);
        wv[c] = c < nb ? load_i8(wo + c * in + i, left) : _mm512_setzero_si512();
      }
      for (int r = 0; r < R; r++) {
        const __m512i xv = load_i8(q + r * in + i, left);  // u8 (first operand: unsigned)
        for (int c = 0; c < OB; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], xv, wv[c]);
      }
    }
    __m512i tile[16];  // lane j of the sums: row j / OB, channel j % OB
    for (int j = 0; j < 16; j++) tile[j] = j < R * OB ? acc[j / OB][j % OB] : _mm512_setzero_si512();
    const __m512i sums = lane_sums16(tile);
    const __mmask16 valid = (__mmask16)((1u << nb) - 1);
    const __m512i wsum_c = _mm512_permutexvar_epi32(by_channel, _mm512_maskz_loadu_epi32(valid, wsum + o));
    const __m512 ws_c = _mm512_permutexvar_ps(by_channel, _mm512_maskz_loadu_ps(valid, ws + o));
    const __m512i dot = _mm512_sub_epi32(sums, _mm512_mullo_epi32(row_zero, wsum_c));
    __m512 yv = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(row_scale, ws_c));
    if (b) yv = _mm512_add_ps(yv, _mm512_permutexvar_ps(by_channel, _mm512_maskz_loadu_ps(valid, b + o)));
    for (int r = 0; r < R; r++)
      _mm512_mask_storeu_ps(y + r * out + o, valid, _mm512_permutexvar_ps(lanes_from(r * OB), yv));
  }
}

// R rows x channels [o0, o1) (the caller splits the channels: rows_by_slices)
template <int R>
GPT2_VNNI void int8_rows(const uint8_t* q, const float* xs, const int32_t* xz, const int8_t* w,
                         const int32_t* wsum, const float* ws, const float* b, float* y,
                         int64_t in, int64_t out, int64_t o0, int64_t o1) {
  constexpr int OB = R <= 2 ? 4 : 2;
  int8_channels<R, OB>(q, xs, xz, w, wsum, ws, b, y, in, out, o0, o1);
}

// What every int8 op takes besides its weight: fp32 rows x (rows, in) and, per output
// channel, the weight's sum and scale and the bias (optional); checked, with the
// result (rows, out) allocated.
struct Int8Call {
  int64_t rows, in, out;
  const float* x;
  const int32_t* wsum;
  const float* ws;
  const float* b;  // nullptr: no bias
  Tensor y;
  float* yp;
};

// The per-channel arguments of the int8 ops, checked; the bias's data (nullptr: none).
const float* check_channel_params(const Tensor& weight_sum, const Tensor& weight_scale,
                                  const std::optional<Tensor>& bias, int64_t out) {
  check_vector(weight_sum, ScalarType::Int, out, "weight_sum");
  check_vector(weight_scale, ScalarType::Float, out, "weight_scale");
  if (!bias.has_value()) return nullptr;
  check_vector(*bias, ScalarType::Float, out, "bias");
  return (const float*)bias->const_data_ptr();
}

Int8Call int8_call(const Tensor& x, int64_t out, const Tensor& weight_sum,
                   const Tensor& weight_scale, const std::optional<Tensor>& bias) {
  check_matrix(x, ScalarType::Float, "x");
  const float* b = check_channel_params(weight_sum, weight_scale, bias, out);
  const int64_t rows = x.size(0);
  Tensor y = torch::stable::new_empty(x, {rows, out});
  return {rows, x.size(1), out, (const float*)x.const_data_ptr(),
          (const int32_t*)weight_sum.const_data_ptr(), (const float*)weight_scale.const_data_ptr(),
          b, y, (float*)y.mutable_data_ptr()};
}

// The plain-weight int8 ops (AVX-512, AVX2): each row quantized by quantize(row, in, q,
// &scale, &zero), then run(rows as an integral_constant, a block's arguments for the
// kernel's *_rows<R>, channels [s0, s1)) over rows_by_slices.
template <class Quantize, class Run>
Tensor int8_in_row_blocks(const Tensor& x, const Tensor& weight, const Tensor& weight_sum,
                          const Tensor& weight_scale, const std::optional<Tensor>& bias,
                          Quantize quantize, Run run) {
  check_matrix(weight, ScalarType::Char, "weight");
  Int8Call c = int8_call(x, weight.size(0), weight_sum, weight_scale, bias);
  STD_TORCH_CHECK(weight.size(1) == c.in, "gpt2 CPU kernel: x and weight widths differ");
  // the quantized rows, as bytes of a scratch tensor (freed with it)
  Tensor qt = torch::stable::new_empty(x, {c.rows * c.in}, ScalarType::Byte);
  auto* q = (uint8_t*)qt.mutable_data_ptr();
  const auto* wp = (const int8_t*)weight.const_data_ptr();
  std::vector<float> xs(c.rows);
  std::vector<int32_t> xz(c.rows);
  const auto quantize_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) quantize(c.x + r * c.in, c.in, q + r * c.in, &xs[r], &xz[r]);
  };
  if (c.rows <= kMaxRows) {
    quantize_rows(0, c.rows);
  } else {
    torch::stable::parallel_for(0, c.rows, 16, quantize_rows);
  }
  rows_by_slices(c.rows, c.out, c.in, [&](int64_t r, auto rows_now, int64_t s0, int64_t s1) {
    run(rows_now, q + r * c.in, xs.data() + r, xz.data() + r, wp, c.wsum, c.ws, c.b,
        c.yp + r * c.out, c.in, c.out, s0, s1);
  });
  return c.y;
}

Tensor int8_linear(Tensor x, Tensor weight, Tensor weight_sum, Tensor weight_scale,
                   std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("avx512vnni"),
                  "gpt2 CPU kernel int8_linear: this CPU has no AVX512-VNNI");
  return int8_in_row_blocks(x, weight, weight_sum, weight_scale, bias, quantize_row,
                            [](auto rows_now, auto... args) {
                              int8_rows<decltype(rows_now)::value>(args...);
                            });
}

// ---- int8 rows for oneDNN's int8 x int8 product (prompts, AVX512-VNNI without AMX) --------
// gpt2/cpu_kernels.py multiplies many rows by torch._int_mm (oneDNN), between these two:
// int8_quantize_rows quantizes each row as int8_linear does, shifted to int8 (q - 128,
// the bytes' top bit flipped) with zero[r] = z - 128, so x ~= s (q8 - zero); then
// int8_rescale is int8_linear's epilogue, the same float operations on the same int32
// sums (sum q8 w - zero wsum = sum q w - z wsum), in place: the two paths agree to the bit.

GPT2_VNNI void flip_top_bits(uint8_t* q, int64_t n) {
  const __m512i top = _mm512_set1_epi8((char)0x80);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    _mm512_storeu_si512(q + i, _mm512_xor_si512(_mm512_loadu_si512(q + i), top));
  for (; i < n; i++) q[i] ^= 0x80;
}

// A prompt's rows as int8_quantize_rows leaves them: a scale and a zero point per row.
void check_row_params(const Tensor& scale, const Tensor& zero, int64_t rows) {
  check_vector(scale, ScalarType::Float, rows, "scale");
  check_vector(zero, ScalarType::Int, rows, "zero");
}

Tensor int8_quantize_rows(Tensor x, Tensor scale, Tensor zero) {
  STD_TORCH_CHECK(__builtin_cpu_supports("avx512vnni"),
                  "gpt2 CPU kernel int8_quantize_rows: this CPU has no AVX512-VNNI");
  check_matrix(x, ScalarType::Float, "x");
  const int64_t rows = x.size(0), in = x.size(1);
  check_row_params(scale, zero, rows);
  Tensor q = torch::stable::new_empty(x, {rows, in}, ScalarType::Char);
  auto* qp = (uint8_t*)q.mutable_data_ptr();
  const auto* xp = (const float*)x.const_data_ptr();
  auto* sp = (float*)scale.mutable_data_ptr();
  auto* zp = (int32_t*)zero.mutable_data_ptr();
  torch::stable::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      quantize_row(xp + r * in, in, qp + r * in, sp + r, zp + r);
      flip_top_bits(qp + r * in, in);
      zp[r] -= 128;
    }
  });
  return q;
}

GPT2_VNNI void rescale_row(const int32_t* acc, float xs, int32_t xz, const int32_t* wsum,
                           const float* ws, const float* b, float* y, int64_t out) {
  const __m512i row_zero = _mm512_set1_epi32(xz);
  const __m512 row_scale = _mm512_set1_ps(xs);
  for (int64_t o = 0; o < out; o += 16) {
    const int64_t left = out - o;
    const __mmask16 valid = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    const __m512i dot = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(valid, acc + o),
                                         _mm512_mullo_epi32(row_zero, _mm512_maskz_loadu_epi32(valid, wsum + o)));
    __m512 yv = _mm512_mul_ps(_mm512_cvtepi32_ps(dot),
                              _mm512_mul_ps(row_scale, _mm512_maskz_loadu_ps(valid, ws + o)));
    if (b) yv = _mm512_add_ps(yv, _mm512_maskz_loadu_ps(valid, b + o));
    _mm512_mask_storeu_ps(y + o, valid, yv);
  }
}

// In place: acc's int32 sums become the fp32 results (the caller views it as float32),
// so a prompt's product writes into memory it has just touched instead of a new tensor.
void int8_rescale(Tensor acc, Tensor scale, Tensor zero, Tensor weight_sum, Tensor weight_scale,
                  std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("avx512vnni"),
                  "gpt2 CPU kernel int8_rescale: this CPU has no AVX512-VNNI");
  check_matrix(acc, ScalarType::Int, "acc");
  const int64_t rows = acc.size(0), out = acc.size(1);
  check_row_params(scale, zero, rows);
  const float* b = check_channel_params(weight_sum, weight_scale, bias, out);
  auto* ap = (int32_t*)acc.mutable_data_ptr();
  const auto* sp = (const float*)scale.const_data_ptr();
  const auto* zp = (const int32_t*)zero.const_data_ptr();
  const auto* wsum = (const int32_t*)weight_sum.const_data_ptr();
  const auto* ws = (const float*)weight_scale.const_data_ptr();
  torch::stable::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
      rescale_row(ap + r * out, sp[r], zp[r], wsum, ws, b, (float*)(ap + r * out), out);
  });
}

// ---- int8 on AVX2: CPUs without AVX-512 (most laptops) -----------------------------------
//
// No 8-bit dot product here: `vpmaddubsw` multiplies u8 by s8 and adds pairs into 16
// bits, saturating, so each row is quantized to 7 bits (0..127: two products of
// 127 x 127 fit), as FBGEMM does on such CPUs; `vpmaddwd` by ones widens the pairs'
// sums to 32 bits. Otherwise the int8 kernel above, with 16 ymm registers instead of 32.

#define GPT2_AVX2 __attribute__((target("avx2,fma")))

GPT2_AVX2 void quantize_row7(const float* x, int64_t in, uint8_t* q, float* scale, int32_t* zero) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps(), zeros = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    lo = _mm256_min_ps(lo, v);
    hi = _mm256_max_ps(hi, v);
    zeros = _mm256_add_ps(zeros, _mm256_mul_ps(v, _mm256_setzero_ps()));
  }
  alignas(32) float lv[8], hv[8], zv[8];
  _mm256_store_ps(lv, lo);
  _mm256_store_ps(hv, hi);
  _mm256_store_ps(zv, zeros);
  float l = 0.0f, h = 0.0f, zeros_sum = 0.0f;
  for (int j = 0; j < 8; j++) {
    l = std::min(l, lv[j]);
    h = std::max(h, hv[j]);
    zeros_sum += zv[j];
  }
  for (; i < in; i++) {
    l = std::min(l, x[i]);
    h = std::max(h, x[i]);
    zeros_sum += x[i] * 0.0f;
  }
  if (not_finite_row(zeros_sum, in, q, scale, zero)) return;  // (see quantize_row)
  float s = (h - l) / 127.0f;
  if (!(s > 0.0f)) s = 1.0f;  // all zeros
  const int32_t z = (int32_t)std::nearbyint(std::min(127.0f, std::max(0.0f, -l / s)));
  const float inv = 1.0f / s;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i vz = _mm256_set1_epi32(z), v0 = _mm256_setzero_si256(),
                v127 = _mm256_set1_epi32(127);
  // 32 values at a time: round, shift by the zero point, clamp, then pack 32 -> 8 bits
  // (the packs work within 128-bit halves; the final permute puts the bytes in order)
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (i = 0; i + 32 <= in; i += 32) {
    __m256i v[4];
    for (int k = 0; k < 4; k++) {
      v[k] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vinv)), vz);
      v[k] = _mm256_min_epi32(_mm256_max_epi32(v[k], v0), v127);
    }
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(v[0], v[1]), _mm256_packus_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i*)(q + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; i < in; i++) {
    const int32_t v = (int32_t)std::nearbyint(x[i] * inv) + z;
    q[i] = (uint8_t)std::min(127, std::max(0, v));
  }
  *scale = s;
  *zero = z;
}

GPT2_AVX2 inline __m256i load_i8_32(const void* p, int64_t left) {
  // 32 bytes, or the `left` < 32 that remain with zeros after them
  if (left >= 32) return _mm256_loadu_si256((const __m256i*)p);
  alignas(32) uint8_t part[32] = {};
  __builtin_memcpy(part, p, left);
  return _mm256_load_si256((const __m256i*)part);
}

GPT2_AVX2 inline int32_t lane_sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int R, int OB>
GPT2_AVX2 void int8_avx2_channels(const uint8_t* q, const float* xs, const int32_t* xz,
                                  const int8_t* w, const int32_t* wsum, const float* ws,
                                  const float* b, float* y, int64_t in, int64_t out, int64_t o0,
                                  int64_t o1) {
  const bool l2 = prefetch_to_l2();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t o = o0; o < o1; o += OB) {
    const int nb = (int)std::min<int64_t>(OB, o1 - o);
    __m256i acc[R][OB];
    for (int r = 0; r < R; r++)
      for (int c = 0; c < OB; c++) acc[r][c] = _mm256_setzero_si256();
    const int8_t* wo = w + o * in;
    for (int64_t i = 0; i < in; i += 32) {
      const int64_t left = in - i;
      __m256i wv[OB];
      for (int c = 0; c < OB; c++) {
        if ((i & 63) == 0) prefetch_weights(wo + (OB * kGroupsAhead + c) * in + i, l2);
        wv[c] = c < nb ? load_i8_32(wo + c * in + i, left) : _mm256_setzero_si256();
      }
      for (int r = 0; r < R; r++) {
        const __m256i xv = load_i8_32(q + r * in + i, left);
        for (int c = 0; c < OB; c++)
          acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, wv[c]), ones));
      }
    }
    for (int r = 0; r < R; r++)
      for (int c = 0; c < nb; c++) {
        const int32_t dot = lane_sum8(acc[r][c]) - xz[r] * wsum[o + c];
        float v = (float)dot * (xs[r] * ws[o + c]);
        if (b) v += b[o + c];
        y[r * out + o + c] = v;
      }
  }
}

// R rows x channels [o0, o1) (the caller splits the channels: rows_by_slices)
template <int R>
void int8_avx2_rows(const uint8_t* q, const float* xs, const int32_t* xz, const int8_t* w,
                    const int32_t* wsum, const float* ws, const float* b, float* y, int64_t in,
                    int64_t out, int64_t o0, int64_t o1) {
  // R * OB accumulators + OB weights + 3 within the 16 registers; measured (1-8 rows):
  // 2 rows x 3 channels and 3-4 rows x 1 beat 2 x 4 and 4 x 2 by 5-25%
  constexpr int OB = R <= 1 ? 4 : (R <= 2 ? 3 : 1);
  int8_avx2_channels<R, OB>(q, xs, xz, w, wsum, ws, b, y, in, out, o0, o1);
}

Tensor int8_linear_avx2(Tensor x, Tensor weight, Tensor weight_sum, Tensor weight_scale,
                        std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                  "gpt2 CPU kernel int8_linear_avx2: this CPU has no AVX2");
  return int8_in_row_blocks(x, weight, weight_sum, weight_scale, bias, quantize_row7,
                            [](auto rows_now, auto... args) {
                              int8_avx2_rows<decltype(rows_now)::value>(args...);
                            });
}

// ---- fp32 on AVX2 ---------------------------------------------------------------------
//
// `fp32_linear` for CPUs without AVX-512: 8-wide fused multiply-adds, 16 ymm registers
// (so fewer channels per tile), each tile's sums added across lanes one by one.

GPT2_AVX2 inline __m256 load_f32_8(const float* p, int64_t left) {
  // 8 floats, or the `left` < 8 that remain with zeros after them
  if (left >= 8) return _mm256_loadu_ps(p);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), lanes));
}

GPT2_AVX2 inline float lane_sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int OB>
GPT2_AVX2 void fp32_avx2_channels(const float* x, const float* w, const float* b, float* y,
                                  int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const bool l2 = prefetch_to_l2();
  for (int64_t o = o0; o < o1; o += OB) {
    const int nb = (int)std::min<int64_t>(OB, o1 - o);
    __m256 acc[R][OB];
    for (int r = 0; r < R; r++)
      for (int c = 0; c < OB; c++) acc[r][c] = _mm256_setzero_ps();
    const float* wo = w + o * in;
    for (int64_t i = 0; i < in; i += 8) {
      const int64_t left = in - i;
      __m256 wv[OB];
      for (int c = 0; c < OB; c++) {
        if ((i & 15) == 0) prefetch_weights(wo + (OB * kGroupsAhead + c) * in + i, l2);
        wv[c] = c < nb ? load_f32_8(wo + c * in + i, left) : _mm256_setzero_ps();
      }
      for (int r = 0; r < R; r++) {
        const __m256 xv = load_f32_8(x + r * in + i, left);
        for (int c = 0; c < OB; c++) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
      }
    }
    for (int r = 0; r < R; r++)
      for (int c = 0; c < nb; c++) y[r * out + o + c] = lane_sum8(acc[r][c]) + (b ? b[o + c] : 0.0f);
  }
}

template <int R>
void fp32_avx2_rows(const float* x, const float* w, const float* b, float* y, int64_t in,
                    int64_t out, int64_t o0, int64_t o1) {
  // R * OB accumulators + OB weights + a row within the 16 registers
  constexpr int OB = R <= 2 ? 4 : R == 3 ? 3 : R == 4 ? 2 : 1;
  fp32_avx2_channels<R, OB>(x, w, b, y, in, out, o0, o1);
}

Tensor fp32_linear_avx2(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                  "gpt2 CPU kernel fp32_linear_avx2: this CPU has no AVX2");
  return dense_in_row_blocks<float>(x, weight, bias, ScalarType::Float, [](auto rows_now, auto... args) {
    fp32_avx2_rows<decltype(rows_now)::value>(args...);
  });
}

// ---- greedy decoding: the index of each row's largest logit --------------------------
//
// PyTorch's argmax reads a 50,257-wide row at ~0.8 GB/s on these machines (60 us per
// row; 4% of an int8 decode step at batch 8). Same answer as torch.argmax: the first
// index of the largest value, NaN counting as the largest.

GPT2_AVX512 int64_t row_argmax(const float* x, int64_t n) {
  __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i at = lane;  // per lane: the index of its largest value so far (the first one)
  __mmask16 nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(valid, x + i);
    nan |= _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
    const __mmask16 larger = _mm512_mask_cmp_ps_mask(valid, v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, larger, v);
    at = _mm512_mask_mov_epi32(at, larger, lane);
    lane = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
  }
  if (nan)
    for (int64_t i = 0; i < n; i++)
      if (std::isnan(x[i])) return i;
  // the lanes holding the largest value; of those, the first index
  const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(top, at);
}

// The same on AVX2 (8 lanes; the last n % 8 values one by one, after the lanes: their
// indices are the largest, so a strictly larger value is needed to replace the best).
GPT2_AVX2 int64_t row_argmax_avx2(const float* x, int64_t n) {
  __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 best = _mm256_set1_ps(-INFINITY);
  __m256i at = lane;
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256 larger = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, larger);
    at = _mm256_blendv_epi8(at, lane, _mm256_castps_si256(larger));
    lane = _mm256_add_epi32(lane, _mm256_set1_epi32(8));
  }
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t j = i; j < n && !any_nan; j++) any_nan = std::isnan(x[j]);
  if (any_nan)
    for (int64_t j = 0; j < n; j++)
      if (std::isnan(x[j])) return j;
  alignas(32) float b[8];
  alignas(32) int32_t a[8];
  _mm256_store_ps(b, best);
  _mm256_store_si256((__m256i*)a, at);
  float m = b[0];
  for (int k = 1; k < 8; k++) m = std::max(m, b[k]);
  // the lowest index among the lanes holding the maximum (0 if no lane saw a value
  // above -inf: then every lane holds -inf at its own first index)
  int64_t found = n;
  for (int k = 0; k < 8; k++)
    if (b[k] == m && a[k] < found) found = a[k];
  for (int64_t j = i; j < n; j++)
    if (x[j] > m) m = x[j], found = j;
  return found;
}

// Each row's argmax, by `row` (row_argmax or row_argmax_avx2).
template <class Row>
Tensor argmax_in_rows(const Tensor& x, const char* name, Row row) {
  check_matrix(x, ScalarType::Float, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  STD_TORCH_CHECK(n > 0 && n < (int64_t{1} << 31), "gpt2 CPU kernel ", name,
                  ": rows must hold 1 to 2^31 - 1 values");
  Tensor y = torch::stable::new_empty(x, {rows}, ScalarType::Long);
  const auto* xp = (const float*)x.const_data_ptr();
  auto* yp = (int64_t*)y.mutable_data_ptr();
  torch::stable::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) yp[r] = row(xp + r * n, n);
  });
  return y;
}

Tensor argmax_rows(Tensor x) {
  STD_TORCH_CHECK(has_avx512(), "gpt2 CPU kernel argmax_rows: this CPU has no AVX-512");
  return argmax_in_rows(x, "argmax_rows", row_argmax);
}

Tensor argmax_rows_avx2(Tensor x) {
  STD_TORCH_CHECK(__builtin_cpu_supports("avx2"), "gpt2 CPU kernel argmax_rows_avx2: this CPU has no AVX2");
  return argmax_in_rows(x, "argmax_rows_avx2", row_argmax_avx2);
}

// ---- GELU, the tanh form GPT-2 uses ------------------------------------------------------
//
// gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). PyTorch's takes
// ~1.5 ns a value here (33-45 us for the 8 x 3,072 values of a batch-8 step, 4-6% of
// an int8 step); this one ~0.6 (most of it vdivps and the exp). Computed as
// x / (1 + exp(-2u)), the same function (0.5 (1 + tanh u) is the logistic of 2u), which
// keeps its digits for negative x, where 1 + tanh u cancels (PyTorch's is 30% off at
// x = -5 and 0 below -5.5); within (3|2u| + 4) units of 2^-24 of the exact value.
// exp(z) = 2^n e^t with n = round(z / ln 2) and t = z - n ln 2 (|t| <= 0.35), e^t by
// its Taylor series to t^7 (truncation < 0.05 ulp), then scaled by 2^n with vscalefps,
// which overflows to inf and underflows to 0 as exp does. z is clamped to [-150, 150]
// first (exp is 0 or inf there already) so that t stays small; a NaN x gives NaN.

GPT2_AVX512 inline __m512 gelu16(__m512 x) {
  const __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x),
                                       _mm512_mul_ps(x, x), x);  // x + 0.044715 x^3
  __m512 z = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f), inner);  // -2u
  z = _mm512_max_ps(_mm512_min_ps(z, _mm512_set1_ps(150.0f)), _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 t = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), z);  // ln 2 in two parts
  t = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), t);
  __m512 e = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    e = _mm512_fmadd_ps(e, t, _mm512_set1_ps(c));
  e = _mm512_scalef_ps(e, n);  // exp(-2u)
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

GPT2_AVX512 void gelu_f32(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, valid, gelu16(_mm512_maskz_loadu_ps(valid, x + i)));
  }
}

// bf16 values widened to fp32, the result rounded back to bf16 (to nearest, even;
// vcvtneps2bf16 makes subnormal results, below 2^-126, zero).
GPT2_BF16 void gelu_bf16(const uint16_t* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, x + i));
    const __m512 v = gelu16(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
    _mm256_mask_storeu_epi16(y + i, valid, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// The same for CPUs with AVX2 but no AVX-512 (most laptops), fp32 only. Without
// vscalefps, 2^n is made from its exponent bits, so z is clamped to [-87, 88], where
// 2^n is a normal float; lanes whose exp(z) would be larger (or NaN) get x * 0, as
// PyTorch's does (-0, or NaN for x = -inf); exp(-87) is small enough to change no x.
GPT2_AVX2 inline __m256 gelu8(__m256 x) {
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x),
                                       _mm256_mul_ps(x, x), x);  // x + 0.044715 x^3
  const __m256 z0 = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f), inner);  // -2u
  const __m256 z = _mm256_max_ps(_mm256_min_ps(z0, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(z, _mm256_set1_ps(1.4426950408889634f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 t = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), z);
  t = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), t);
  __m256 e = _mm256_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    e = _mm256_fmadd_ps(e, t, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  e = _mm256_mul_ps(e, _mm256_castsi256_ps(two_n));  // exp(-2u)
  const __m256 y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 huge = _mm256_cmp_ps(z0, _mm256_set1_ps(88.0f), _CMP_NLE_UQ);
  return _mm256_blendv_ps(y, _mm256_mul_ps(x, _mm256_setzero_ps()), huge);
}

GPT2_AVX2 void gelu_f32_avx2(const float* x, float* y, int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < n; i += 8) {
    if (n - i >= 8) {
      _mm256_storeu_ps(y + i, gelu8(_mm256_loadu_ps(x + i)));
    } else {
      const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i)), lanes);
      _mm256_maskstore_ps(y + i, valid, gelu8(_mm256_maskload_ps(x + i, valid)));
    }
  }
}

// y = f(x) elementwise for a contiguous tensor, run(i, m) doing values [i, i + m), in
// chunks of 8K values per thread.
template <class Run>
Tensor elementwise(const Tensor& x, Run run) {
  Tensor y = torch::stable::empty_like(x);
  const int64_t n = x.numel();
  constexpr int64_t chunk = 8192;
  torch::stable::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    run(y, c0 * chunk, std::min(c1 * chunk, n) - c0 * chunk);
  });
  return y;
}

// Any contiguous fp32 (AVX-512) or bf16 (AVX512-BF16) tensor.
Tensor gelu_tanh(Tensor x) {
  const bool bf16 = x.scalar_type() == ScalarType::BFloat16;
  STD_TORCH_CHECK(x.is_cpu() && x.is_contiguous() && (bf16 || x.scalar_type() == ScalarType::Float),
                  "gpt2 CPU kernel gelu_tanh: x must be a contiguous fp32 or bf16 CPU tensor");
  STD_TORCH_CHECK(has_avx512() && (!bf16 || __builtin_cpu_supports("avx512bf16")),
                  "gpt2 CPU kernel gelu_tanh: this CPU has no AVX-512", bf16 ? "-BF16" : "");
  return elementwise(x, [&](Tensor& y, int64_t i, int64_t m) {
    if (bf16)
      gelu_bf16((const uint16_t*)x.const_data_ptr() + i, (uint16_t*)y.mutable_data_ptr() + i, m);
    else
      gelu_f32((const float*)x.const_data_ptr() + i, (float*)y.mutable_data_ptr() + i, m);
  });
}

// Any contiguous fp32 tensor, on AVX2.
Tensor gelu_tanh_avx2(Tensor x) {
  STD_TORCH_CHECK(x.is_cpu() && x.is_contiguous() && x.scalar_type() == ScalarType::Float,
                  "gpt2 CPU kernel gelu_tanh_avx2: x must be a contiguous fp32 CPU tensor");
  STD_TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                  "gpt2 CPU kernel gelu_tanh_avx2: this CPU has no AVX2");
  return elementwise(x, [&](Tensor& y, int64_t i, int64_t m) {
    gelu_f32_avx2((const float*)x.const_data_ptr() + i, (float*)y.mutable_data_ptr() + i, m);
  });
}

// ---- AMX: int8 and bf16 ---------------------------------------------------------------------
//
// At 8 rows the VNNI kernel runs out of arithmetic before memory (8 multiply-adds per
// weight byte). AMX's tile multiply (`tdpbusd`: a 16 x 64 u8 tile of rows times a
// 16 x 64 s8 tile of weights, 16K multiply-adds per instruction) does not. The weights
// must be laid out for it ahead of time (`amx_pack` in cpu_kernels.py): for each pair
// of 16-channel blocks and each 64-wide slice of the input, the two 1 KB tiles side by
// side, each 16 rows of (16 channels x 4 consecutive inputs); so one thread reads its
// channels' weights as one sequential stream.

#define GPT2_AMX __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// This thread's tiles for m rows: tmm0 the rows' 64 bytes of input, tmm1 and tmm2 two
// weight tiles (16 x 64 bytes), tmm3 and tmm4 the sums (m rows x 16 channels of 4 bytes).
__attribute__((target("amx-tile"))) void configure_tiles(int m) {
  TileConfig cfg;
  const uint8_t rows[5] = {(uint8_t)m, 16, 16, (uint8_t)m, (uint8_t)m};
  for (int t = 0; t < 5; t++) {
    cfg.rows[t] = rows[t];
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

bool amx_permitted() {
  // Linux hands out AMX's 8 KB of tile state only to a process that asks for it
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// True where both AMX kernels can run: the CPU has AMX-INT8 and AMX-BF16 and the OS
// lets this process use the tiles.
bool amx_ready() {
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
         __builtin_cpu_supports("amx-bf16") && amx_permitted();
}

// Channel pairs [p0, p1) (32 channels each) against `rows` quantized rows, in blocks of
// m <= 16 (more than 16 rows: blocks of 16, q zero-padded to whole blocks). Each pair's
// weights are streamed from memory for the first block and reused from cache for the
// others (24-96 KB a pair), so a prompt reads the weight once, not once per 16 rows.
GPT2_AMX void amx_pairs(const uint8_t* q, int64_t q_stride, int64_t rows, int m, const int8_t* packed,
                        int64_t k_tiles, const float* xs, const int32_t* xz, const int32_t* wsum,
                        const float* ws, const float* b, float* y, int64_t out, int64_t p0,
                        int64_t p1) {
  configure_tiles(m);
  alignas(64) int32_t sums[2][16][16];
  for (int64_t p = p0; p < p1; p++) {
    const int8_t* wp = packed + p * k_tiles * 2048;
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      const uint8_t* qb = q + r0 * q_stride;
      _tile_zero(3);
      _tile_zero(4);
      for (int64_t k = 0; k < k_tiles; k++) {
        // the weights a few slices ahead (into the next pair's too: one stream)
        if (r0 == 0)
          for (int line = 0; line < 2048; line += 64)
            _mm_prefetch((const char*)(wp + 2048 * (k + kSlicesAhead) + line), _MM_HINT_T0);
        _tile_loadd(0, qb + 64 * k, q_stride);
        _tile_loadd(1, wp + 2048 * k, 64);
        _tile_loadd(2, wp + 2048 * k + 1024, 64);
        _tile_dpbusd(3, 0, 1);
        _tile_dpbusd(4, 0, 2);
      }
      _tile_stored(3, sums[0], 64);
      _tile_stored(4, sums[1], 64);
      const int64_t n = std::min<int64_t>(16, rows - r0);  // this block's real rows
      for (int h = 0; h < 2; h++) {
        const int64_t o = p * 32 + h * 16;
        if (o >= out) break;
        const __mmask16 valid = out - o >= 16 ? 0xFFFF : (__mmask16)((1u << (out - o)) - 1);
        const __m512i wsum_v = _mm512_maskz_loadu_epi32(valid, wsum + o);
        const __m512 ws_v = _mm512_maskz_loadu_ps(valid, ws + o);
        const __m512 b_v = b ? _mm512_maskz_loadu_ps(valid, b + o) : _mm512_setzero_ps();
        for (int64_t r = 0; r < n; r++) {
          const int64_t row = r0 + r;
          const __m512i dot = _mm512_sub_epi32(_mm512_load_si512(sums[h][r]),
                                               _mm512_mullo_epi32(_mm512_set1_epi32(xz[row]), wsum_v));
          __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(xs[row]), ws_v));
          if (b) v = _mm512_add_ps(v, b_v);
          _mm512_mask_storeu_ps(y + row * out + o, valid, v);
        }
      }
    }
  }
  _tile_release();
}

// x (rows, in) fp32; packed: amx_pack's layout of an int8 weight (out, in) padded to
// whole 32-channel pairs and 64-wide input slices.
Tensor int8_linear_amx(Tensor x, Tensor packed, int64_t out, Tensor weight_sum,
                       Tensor weight_scale, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("amx-int8") && amx_permitted(),
                  "gpt2 CPU kernel int8_linear_amx: this CPU or OS offers no AMX");
  Int8Call c = int8_call(x, out, weight_sum, weight_scale, bias);
  const int64_t rows = c.rows, in = c.in;
  const int64_t k_tiles = (in + 63) / 64, pairs = (out + 31) / 32;
  STD_TORCH_CHECK(packed.is_cpu() && packed.is_contiguous() && packed.scalar_type() == ScalarType::Char &&
                      packed.numel() == pairs * k_tiles * 2048,
                  "gpt2 CPU kernel int8_linear_amx: the packed weight does not fit x and out");
  // rows padded with zeros to whole slices, and past 16 rows to whole blocks of 16
  if (rows == 0) return c.y;  // (no tiles: a configuration of 0 rows faults)
  const int64_t q_stride = k_tiles * 64, padded = rows <= 16 ? rows : (rows + 15) / 16 * 16;
  std::vector<uint8_t> q(padded * q_stride);
  std::vector<float> xs(rows);
  std::vector<int32_t> xz(rows);
  const auto quantize = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) quantize_row(c.x + r * in, in, q.data() + r * q_stride, &xs[r], &xz[r]);
  };
  if (rows <= 16)
    quantize(0, rows);  // (a decode step: not worth waking a thread)
  else
    torch::stable::parallel_for(0, rows, 16, quantize);
  const auto* wp = (const int8_t*)packed.const_data_ptr();
  torch::stable::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    amx_pairs(q.data(), q_stride, rows, (int)std::min<int64_t>(16, rows), wp, k_tiles, xs.data(),
              xz.data(), c.wsum, c.ws, c.b, c.yp, out, p0, p1);
  });
  return c.y;
}

#define GPT2_AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

// bf16 on AMX (`tdpbf16ps`): the same layout with pairs of inputs instead of quads, so a
// slice is 32 inputs wide; fp32 sums, bias added in fp32, rounded to bf16.
GPT2_AMX_BF16 void amx_bf16_pairs(const uint16_t* x, int64_t x_stride, int64_t rows, int m,
                                  const uint16_t* packed, int64_t k_tiles, const uint16_t* b, uint16_t* y,
                                  int64_t out, int64_t p0, int64_t p1) {
  configure_tiles(m);
  alignas(64) float sums[2][16][16];
  const char* base = (const char*)packed;
  for (int64_t p = p0; p < p1; p++) {
    const char* wp = base + p * k_tiles * 2048;
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {  // every block of rows, as amx_pairs
      _tile_zero(3);
      _tile_zero(4);
      for (int64_t k = 0; k < k_tiles; k++) {
        if (r0 == 0)
          for (int line = 0; line < 2048; line += 64)
            _mm_prefetch(wp + 2048 * (k + kSlicesAhead) + line, _MM_HINT_T0);
        _tile_loadd(0, x + r0 * x_stride + 32 * k, x_stride * 2);
        _tile_loadd(1, wp + 2048 * k, 64);
        _tile_loadd(2, wp + 2048 * k + 1024, 64);
        _tile_dpbf16ps(3, 0, 1);
        _tile_dpbf16ps(4, 0, 2);
      }
      _tile_stored(3, sums[0], 64);
      _tile_stored(4, sums[1], 64);
      const int64_t n = std::min<int64_t>(16, rows - r0);  // this block's real rows
      for (int h = 0; h < 2; h++) {
        const int64_t o = p * 32 + h * 16;
        if (o >= out) break;
        const __mmask16 valid = out - o >= 16 ? 0xFFFF : (__mmask16)((1u << (out - o)) - 1);
        __m512 b_v = _mm512_setzero_ps();
        if (b) b_v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, b + o)), 16));
        for (int64_t r = 0; r < n; r++) {
          const __m512 v = _mm512_add_ps(_mm512_load_ps(sums[h][r]), b_v);
          _mm256_mask_storeu_epi16(y + (r0 + r) * out + o, valid, (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
  }
  _tile_release();
}

Tensor bf16_linear_amx(Tensor x, Tensor packed, int64_t out, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("amx-bf16") && amx_permitted(),
                  "gpt2 CPU kernel bf16_linear_amx: this CPU or OS offers no AMX");
  check_matrix(x, ScalarType::BFloat16, "x");
  const int64_t rows = x.size(0), in = x.size(1);
  const int64_t k_tiles = (in + 31) / 32, pairs = (out + 31) / 32;
  STD_TORCH_CHECK(in % 32 == 0, "gpt2 CPU kernel bf16_linear_amx: the input width must be a multiple of 32");
  STD_TORCH_CHECK(packed.is_cpu() && packed.is_contiguous() && packed.scalar_type() == ScalarType::BFloat16 &&
                      packed.numel() == pairs * k_tiles * 1024,
                  "gpt2 CPU kernel bf16_linear_amx: the packed weight does not fit x and out");
  const uint16_t* b = nullptr;
  if (bias.has_value()) {
    check_vector(*bias, ScalarType::BFloat16, out, "bias");
    b = (const uint16_t*)bias->const_data_ptr();
  }
  Tensor y = torch::stable::new_empty(x, {rows, out});
  if (rows == 0) return y;  // (no tiles: a configuration of 0 rows faults)
  const auto* xp = (const uint16_t*)x.const_data_ptr();
  // past 16 rows, whole blocks of 16: the rows copied after zeros if the last is partial
  std::vector<uint16_t> padded;
  if (rows > 16 && rows % 16 != 0) {
    padded.assign((rows + 15) / 16 * 16 * in, 0);
    std::memcpy(padded.data(), xp, rows * in * 2);
    xp = padded.data();
  }
  const auto* wp = (const uint16_t*)packed.const_data_ptr();
  auto* yp = (uint16_t*)y.mutable_data_ptr();
  torch::stable::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    amx_bf16_pairs(xp, in, rows, (int)std::min<int64_t>(16, rows), wp, k_tiles, b, yp, out, p0, p1);
  });
  return y;
}

// int8-weight-only on AMX: the int8 weight in the bf16 kernel's tile order, one byte per
// weight (`amx_layout(q, 2)`: 1 KB per pair of channel blocks and 32 inputs). Each pair's
// slices are widened to bf16 tiles once, by the first block of 16 rows, each just before
// it is multiplied (`tdpbf16ps`); the other blocks reuse them, as amx_pairs reuses its
// weights. fp32 sums times each channel's scale, plus the bias.
GPT2_AMX_BF16 void amx_int8wo_pairs(const uint16_t* x, int64_t x_stride, int64_t rows, int m,
                                    const int8_t* packed, int64_t k_tiles, const float* ws,
                                    const float* b, float* y, int64_t out, int64_t p0, int64_t p1) {
  configure_tiles(m);
  alignas(64) float sums[2][16][16];
  // Widened slices: with one block of rows, two buffers used in turn (in L1, so that
  // widening the next slice need not wait for this one's tile loads; a pair's worth
  // made decoding ~15% slower); with more, the pair's every slice ([slice][two 16 x 32
  // bf16 tiles], kept between calls) for the other blocks to reuse.
  alignas(64) uint16_t turn[2][1024];
  thread_local std::vector<uint16_t> all;
  const bool reuse = rows > 16;
  if (reuse && all.size() < (size_t)(k_tiles * 1024 + 32)) all.resize(k_tiles * 1024 + 32);
  // tile rows at 64-byte boundaries (malloc's 16 made every tile row two cache lines)
  uint16_t* const all64 = (uint16_t*)(((uintptr_t)all.data() + 63) & ~(uintptr_t)63);
  for (int64_t p = p0; p < p1; p++) {
    const int8_t* wp = packed + p * k_tiles * 1024;
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      _tile_zero(3);
      _tile_zero(4);
      for (int64_t k = 0; k < k_tiles; k++) {
        uint16_t* wk = reuse ? all64 + 1024 * k : turn[k & 1];
        if (r0 == 0) {  // the first block widens each slice just before multiplying it
          for (int line = 0; line < 1024; line += 64)  // as many bytes ahead as the bf16 kernel
            _mm_prefetch((const char*)(wp + 1024 * (k + 2 * kSlicesAhead) + line), _MM_HINT_T0);
          for (int j = 0; j < 1024; j += 32)
            _mm512_storeu_si512(wk + j, (__m512i)load_int8_as_bf16(wp + 1024 * k + j, 32));
        }
        _tile_loadd(0, x + r0 * x_stride + 32 * k, x_stride * 2);
        _tile_loadd(1, wk, 64);
        _tile_loadd(2, wk + 512, 64);
        _tile_dpbf16ps(3, 0, 1);
        _tile_dpbf16ps(4, 0, 2);
      }
      _tile_stored(3, sums[0], 64);
      _tile_stored(4, sums[1], 64);
      const int64_t n = std::min<int64_t>(16, rows - r0);  // this block's real rows
      for (int h = 0; h < 2; h++) {
        const int64_t o = p * 32 + h * 16;
        if (o >= out) break;
        const __mmask16 valid = out - o >= 16 ? 0xFFFF : (__mmask16)((1u << (out - o)) - 1);
        const __m512 ws_v = _mm512_maskz_loadu_ps(valid, ws + o);
        const __m512 b_v = b ? _mm512_maskz_loadu_ps(valid, b + o) : _mm512_setzero_ps();
        for (int64_t r = 0; r < n; r++)
          _mm512_mask_storeu_ps(y + (r0 + r) * out + o, valid,
                                _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(sums[h][r]), ws_v), b_v));
      }
    }
  }
  _tile_release();
}

// x (rows, in) fp32, in a multiple of 32; packed: amx_layout(q, 2) of an int8 weight (out, in).
Tensor int8wo_linear_amx(Tensor x, Tensor packed, int64_t out, Tensor weight_scale,
                         std::optional<Tensor> bias) {
  STD_TORCH_CHECK(__builtin_cpu_supports("amx-bf16") && amx_permitted(),
                  "gpt2 CPU kernel int8wo_linear_amx: this CPU or OS offers no AMX");
  Int8woCall c = int8wo_call(x, out, weight_scale, bias, /*whole_blocks=*/true);
  const int64_t k_tiles = (c.in + 31) / 32, pairs = (out + 31) / 32;
  STD_TORCH_CHECK(c.in % 32 == 0, "gpt2 CPU kernel int8wo_linear_amx: the input width must be a multiple of 32");
  STD_TORCH_CHECK(packed.is_cpu() && packed.is_contiguous() && packed.scalar_type() == ScalarType::Char &&
                      packed.numel() == pairs * k_tiles * 1024,
                  "gpt2 CPU kernel int8wo_linear_amx: the packed weight does not fit x and out");
  if (c.rows == 0) return c.y;  // (no tiles: a configuration of 0 rows faults)
  const auto* wp = (const int8_t*)packed.const_data_ptr();
  torch::stable::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    amx_int8wo_pairs(c.xb.data(), c.in, c.rows, (int)std::min<int64_t>(16, c.rows), wp, k_tiles, c.ws,
                     c.b, c.yp, out, p0, p1);
  });
  return c.y;
}

}  // namespace

STABLE_TORCH_LIBRARY(gpt2, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("fp32_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("fp32_linear_avx2(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor weight_sum, Tensor weight_scale, "
        "Tensor? bias) -> Tensor");
  m.def("int8_linear_avx2(Tensor x, Tensor weight, Tensor weight_sum, Tensor weight_scale, "
        "Tensor? bias) -> Tensor");
  m.def("int8_quantize_rows(Tensor x, Tensor(a!) scale, Tensor(b!) zero) -> Tensor");
  m.def("int8_rescale(Tensor(a!) acc, Tensor scale, Tensor zero, Tensor weight_sum, "
        "Tensor weight_scale, Tensor? bias) -> ()");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("argmax_rows_avx2(Tensor x) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("gelu_tanh_avx2(Tensor x) -> Tensor");
  m.def("int8wo_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("int8wo_linear_amx(Tensor x, Tensor packed, int out, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("amx_ready() -> bool");
  m.def("bf16_linear_amx(Tensor x, Tensor packed, int out, Tensor? bias) -> Tensor");
  m.def("int8_linear_amx(Tensor x, Tensor packed, int out, Tensor weight_sum, "
        "Tensor weight_scale, Tensor? bias) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(gpt2, CompositeExplicitAutograd, m) {
  m.impl("amx_ready", TORCH_BOX(&amx_ready));
}

STABLE_TORCH_LIBRARY_IMPL(gpt2, CPU, m) {
  m.impl("bf16_linear", TORCH_BOX(&bf16_linear));
  m.impl("fp32_linear", TORCH_BOX(&fp32_linear));
  m.impl("argmax_rows", TORCH_BOX(&argmax_rows));
  m.impl("argmax_rows_avx2", TORCH_BOX(&argmax_rows_avx2));
  m.impl("gelu_tanh", TORCH_BOX(&gelu_tanh));
  m.impl("gelu_tanh_avx2", TORCH_BOX(&gelu_tanh_avx2));
  m.impl("int8wo_linear", TORCH_BOX(&int8wo_linear));
  m.impl("int8wo_linear_amx", TORCH_BOX(&int8wo_linear_amx));
  m.impl("fp32_linear_avx2", TORCH_BOX(&fp32_linear_avx2));
  m.impl("int8_linear", TORCH_BOX(&int8_linear));
  m.impl("int8_linear_avx2", TORCH_BOX(&int8_linear_avx2));
  m.impl("int8_quantize_rows", TORCH_BOX(&int8_quantize_rows));
  m.impl("int8_rescale", TORCH_BOX(&int8_rescale));
  m.impl("int8_linear_amx", TORCH_BOX(&int8_linear_amx));
  m.impl("bf16_linear_amx", TORCH_BOX(&bf16_linear_amx));
}
