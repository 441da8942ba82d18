// CPU kernels, compiled once per CPU capability (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp,
// kernels_avx512_bf16.cpp).
//
// Statistics: each partial reduction covers a fixed amount of data (plan_partitions_cpu), whose
// moments are computed in two passes while it sits in cache (on data shifted by the feature's
// first value, so |mean| >> std loses nothing), and partials are combined by Chan's merge in a
// fixed order. The partition depends only on the shape, never on the thread
// count, so results are bitwise reproducible.
//
// Everything here lives in namespace bn_cuda::cpu::CPU_CAPABILITY (like ATen's own kernels) so
// the per-capability copies of these templates never collide at link time.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bn_cuda/epilogue.h"
#include "bn_cuda/params.h"
#include "bn_cuda/welford.h"

namespace bn_cuda {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Two float32 vectors to one vector of T (16-bit T), at::vec's conversion, rounding to nearest
// even. In the AVX512_BF16 copy (kernels_avx512_bf16.cpp) bfloat16 takes the one-instruction
// VCVTNE2PS2BF16 instead of at::vec's emulation (about 8 instructions per 16 lanes, 40% of an
// in-cache inference's time). That instruction flushes denormal inputs to zero and keeps NaN
// payloads, where the emulation rounds denormals and writes 0xffff for every NaN: a pair holding
// either takes the emulation, so both copies give the same bits for every input.
#if defined(CPU_CAPABILITY_AVX2)
// A float32 vector's bfloat16 bits (rounded to nearest even; 0xffff for every NaN) in the low 16
// bits of each 32-bit lane, the high 16 bits 0: at::vec's rounding, (x + 0x7fff + lsb) >> 16,
// with the lsb taken as min(x & 0x10000, 1) and NaN as the unordered compare's all-ones OR-ed in
// before the shift, so 2 shifts fewer and an OR for a blend: the same bits for all 2^32 inputs
// (checked exhaustively against at::vec::convert_from_float), 0.28 -> 0.20 ns per value applied
// with Io::store_lanes' order (one thread, in L1, AMD EPYC Zen 3).
inline __m256i bf16_bits(const __m256& a) {
  const __m256i x = _mm256_castps_si256(a);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  const __m256i lsb = _mm256_min_epu32(_mm256_and_si256(x, _mm256_set1_epi32(0x10000)), _mm256_set1_epi32(1));
  const __m256i t = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb);
  return _mm256_srli_epi32(_mm256_or_si256(t, nan), 16);
}
#endif

template <typename T>
inline Vectorized<T> narrow(const Vectorized<float>& a, const Vectorized<float>& b) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, c10::BFloat16>)  // (packus keeps 128-bit lanes: vpermq restores the order)
    return Vectorized<T>(_mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(a), bf16_bits(b)), 0xd8));
#endif
#if defined(CPU_CAPABILITY_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // (VFPCLASSPS: QNaN, denormal, SNaN)
    const __mmask16 odd = _mm512_fpclass_ps_mask(__m512(a), kNanOrDenormal) |
                          _mm512_fpclass_ps_mask(__m512(b), kNanOrDenormal);
    if (__builtin_expect(odd == 0, 1)) return Vectorized<T>(__m512i(_mm512_cvtne2ps_pbh(__m512(b), __m512(a))));
  }
#endif
  return at::vec::convert_from_float<T>(a, b);
}

// Scratch arrays that every use writes before reading, left uninitialized: zeroing them (as
// std::vector does) cost the expanded short-row paths a memset of up to 16 bytes per feature and
// element, e.g. 4x300x5x5 fp32 backward 25.1 -> 22.1 us, inference 11.3 -> 10.2 us (AVX-512).
// (new A[n] default-initializes: std::make_unique_for_overwrite without C++20, which torch 2.11's
// extension builds do not use)
template <typename A>
inline std::unique_ptr<A[]> scratch(size_t n) { return std::unique_ptr<A[]>(new A[n]); }
template <typename T>
struct Io {
  using acc = acc_t<T>;
  using AV = Vectorized<acc>;
  static constexpr int64_t L = AV::size();
  static constexpr int64_t K = 2 * L;  // elements per step: two accumulator vectors

  // (The AVX2 copy's 16-bit types: two 8-value loads widened from memory, and float16 as two
  // 8-value stores, where at::vec's 16-value vector took a second load and a lane extract in, and
  // a lane insert out; bitwise the same values.)
  static inline void load(const T* p, AV& a, AV& b) {
    if constexpr (std::is_same_v<T, acc>) {
      a = AV::loadu(p);
      b = AV::loadu(p + L);
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      a = widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      b = widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + L)));
#else
      at::vec::load_to_float<T>(p, a, b);
#endif
    }
  }
  static inline void store(T* p, const AV& a, const AV& b) {
    if constexpr (std::is_same_v<T, acc>) {
      a.store(p);
      b.store(p + L);
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<T, c10::Half>) {  // (at::vec's rounding: to nearest even, no exceptions)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p + L), _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return;
      }
#endif
      narrow<T>(a, b).store(p);
    }
  }
  // K values in an order that store_lanes undoes, for the runs whose constants are the same in
  // every lane: elementwise (apply_run, grad_run) and per-run sums (shifted_sum_run, sqdev_run,
  // grad_sums_run, where the order only decides which lane adds which value: still fixed by the
  // shape). The AVX2 copy's bfloat16 widens by interleaving with zeros within 128-bit lanes (a =
  // values 0-3, 8-11; b = 4-7, 12-15) and narrows by one pack, which restores that order: 2
  // shuffles in and 1 out instead of 5 and 2 (one thread, in cache, AMD EPYC Zen 3: 0.28 -> 0.20
  // ns per value applied). Other types: load and store.
  static inline void load_lanes(const T* p, AV& a, AV& b) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i z = _mm256_setzero_si256();
      a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
      b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
      return;
    }
#endif
    load(p, a, b);
  }
  static inline void store_lanes(T* p, const AV& a, const AV& b) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(bf16_bits(a), bf16_bits(b)));
      return;
    }
#endif
    store(p, a, b);
  }
  // A vector's lanes added as a tree (halves, then quarters, ...): log2(L) dependent adds instead
  // of L. The per-feature fused paths of small features end each feature's sums with two of
  // these on their latency chain; added lane by lane they took 1x1000x4x4 fp32 training forward
  // from 40 to 50 us and its backward from 18 to 25 us (AVX-512).
  static inline acc hsum(const AV& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc, float>)  // (in shuffles; at::vec's other reductions go lane by lane)
      return at::vec::vec_reduce_all<float>([](const AV& a, const AV& b) { return a + b; }, v);
#endif
    acc tmp[L];
    v.store(tmp);
    for (int64_t w = L / 2; w >= 1; w /= 2)
      for (int64_t j = 0; j < w; ++j) tmp[j] += tmp[j + w];
    return tmp[0];
  }
#if defined(CPU_CAPABILITY_AVX2)
  // AVX2's mask of the first k lanes of 32-bit (E = float) or 64-bit (E = double) lanes.
  template <typename E>
  static inline __m256i first_lanes(int64_t k) {
    if constexpr (sizeof(E) == 4) {
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    } else {
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(k), _mm256_setr_epi64x(0, 1, 2, 3));
    }
  }
  // 8 16-bit values widened exactly to float32.
  static inline AV widen8(__m128i h) {
    if constexpr (std::is_same_v<T, c10::Half>) {
      return _mm256_cvtph_ps(h);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  // AVX2 has no 16-bit masked loads or stores: the first k (0 < k <= 8) 16-bit values at p, the
  // other lanes 0, and their store, as one access of each of 8, 4, 2 and 1 values that k holds
  // (never touching memory past p + k).
  static inline __m128i load16_part(const void* p, int64_t k) {
    const char* b = static_cast<const char*>(p);
    const auto h = [b](int64_t at) {  // (the value at b + at, as the low 16 bits of an int)
      uint16_t u;
      std::memcpy(&u, b + at, 2);
      return static_cast<int>(u);
    };
    int32_t w;
    switch (k) {
      case 8: return _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
      case 4: return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b));
      case 1: return _mm_cvtsi32_si128(h(0));
      case 2: std::memcpy(&w, b, 4); return _mm_cvtsi32_si128(w);
      case 3: std::memcpy(&w, b, 4); return _mm_insert_epi16(_mm_cvtsi32_si128(w), h(4), 2);
      case 5: return _mm_insert_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)), h(8), 4);
      case 6: std::memcpy(&w, b + 8, 4); return _mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)), w, 2);
      default:
        std::memcpy(&w, b + 8, 4);
        return _mm_insert_epi16(_mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)), w, 2),
                                h(12), 6);
    }
  }
  static inline void store16_part(void* p, __m128i v, int64_t k) {
    char* b = static_cast<char*>(p);
    if (k == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(b), v);
      return;
    }
    if (k & 4) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(b), v);
      v = _mm_srli_si128(v, 8);
      b += 8;
    }
    if (k & 2) {
      const int32_t w = _mm_cvtsi128_si32(v);
      std::memcpy(b, &w, 4);
      v = _mm_srli_si128(v, 4);
      b += 4;
    }
    if (k & 1) {
      const uint16_t h = static_cast<uint16_t>(_mm_cvtsi128_si32(v));
      std::memcpy(b, &h, 2);
    }
  }
#endif
  // k elements (0 < k <= L) into a vector's first k lanes, the others 0: a masked load with
  // AVX-512, and with AVX2 for float32 / float64; the AVX2 copy's 16-bit types by load16_part
  // (at::vec's partial loads copy through a buffer there: see kMaskedLoads, kPartialTails).
  static inline AV load_part(const T* p, int64_t k) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_maskload_ps(p, first_lanes<float>(k));
    } else if constexpr (std::is_same_v<T, double>) {
      return _mm256_maskload_pd(p, first_lanes<double>(k));
    } else {
      // 16-bit: k of 8 values by 8-, 4-, 2- and 1-value loads (none past p + k), widened exactly.
      return widen8(load16_part(p, k));
    }
#endif
    if constexpr (std::is_same_v<T, acc>) {
      return AV::loadu(p, k);
    } else {
      return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, k)));
    }
  }
  // v with lanes [k, L) set to 0 (0 < k <= L).
  static inline AV keep_first(const AV& v, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc, float>) {
      return _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << k) - 1), v);
    } else {
      return _mm512_maskz_mov_pd(static_cast<__mmask8>((1u << k) - 1), v);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc, float>) {
      return _mm256_and_ps(v, _mm256_castsi256_ps(first_lanes<float>(k)));
    } else {
      return _mm256_and_pd(v, _mm256_castsi256_pd(first_lanes<double>(k)));
    }
#else
    return AV::set(AV(acc(0)), v, k);
#endif
  }
  // The lanes [0, k) of a to p (0 < k <= L): a masked store where loads are masked (kMaskedLoads).
  static inline void store_part(T* p, const AV& a, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << k) - 1), a);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << k) - 1), a);
    } else {
      _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((1u << k) - 1), __m512i(narrow<T>(a, a)));
    }
    return;
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      _mm256_maskstore_ps(p, first_lanes<float>(k), a);
      return;
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_maskstore_pd(p, first_lanes<double>(k), a);
      return;
    } else {
      store16_part(p, _mm256_castsi256_si128(__m256i(narrow<T>(a, a))), k);
      return;
    }
#endif
    if constexpr (std::is_same_v<T, acc>) {
      a.store(p, static_cast<int>(k));
    } else {
      narrow<T>(a, a).store(p, static_cast<int>(k));
    }
  }
  // The first r (0 < r < K) of the K values a, b to p: store_part's, and for the AVX2 copy's 16-bit
  // types one conversion of both vectors.
  static inline void store_rest(T* p, const AV& a, const AV& b, int64_t r) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (sizeof(T) == 2) {
      const __m256i v = __m256i(narrow<T>(a, b));
      if (r < L) {
        store16_part(p, _mm256_castsi256_si128(v), r);
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(v));
        if (r > L) store16_part(p + L, _mm256_extracti128_si256(v, 1), r - L);
      }
      return;
    }
#endif
    store_part(p, a, std::min(r, L));
    if (r > L) store_part(p + L, b, r - L);
  }
  // The last r elements of a run (0 < r < K), lanes past them 0: a = [0, min(r, L)), b = the rest.
  static inline void load_rest(const T* p, int64_t r, AV& a, AV& b) {
    a = load_part(p, std::min(r, L));
    b = r > L ? load_part(p + L, r - L) : AV(acc(0));
  }
  // Load K accumulation-type values from an acc array (per-feature coefficients).
  static inline void load_acc(const acc* p, AV& a, AV& b) {
    a = AV::loadu(p);
    b = AV::loadu(p + L);
  }
  // Half steps: the channels-first runs take one L-element step between their K-element steps and
  // their scalar tail when the vectors are 16 float32 lanes wide (AVX-512: K = 32, so a 7x7 map's
  // 49-element rows left 17 elements to scalar code and the AVX-512 copy took 2x the AVX2 copy's
  // time for 8x1000x7x7 NCHW fp32 training forward). With 8 lanes (AVX2, portable) the tail is at
  // most 15 elements and the runs are as before.
  static constexpr bool kHalfStep = L >= 16;
  static constexpr int64_t kVecRun = kHalfStep ? L : K;  // (the shortest run with a vector step)
  static inline void load1(const T* p, AV& a) {
    if constexpr (std::is_same_v<T, acc>) {
      a = AV::loadu(p);
    } else {
      at::vec::load_to_float<T>(p, a);
    }
  }
  static inline void store1(T* p, const AV& a) {
    if constexpr (std::is_same_v<T, acc>) {
      a.store(p);
    } else {
      narrow<T>(a, a).store(p, static_cast<int>(L));
    }
  }
};

// Whether Io::load_lanes' order differs from memory order (the AVX2 copy's bfloat16), and
// per-feature arrays in that order: each ghost's C features permuted in whole K blocks as
// load_lanes permutes K values (a = 0-3, 8-11; b = 4-7, 12-15), the features past the last whole
// block in place. Channels-last rows, whose lanes hold consecutive features, then take
// load_lanes / store_lanes with coefficients loaded from the permuted arrays.
template <typename T>
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kPermutedLanes = std::is_same_v<T, c10::BFloat16>;
#else
constexpr bool kPermutedLanes = false;
#endif
template <typename T>
inline void to_lane_order(const acc_t<T>* src, acc_t<T>* dst, int64_t G, int64_t C) {
  static_assert(Io<T>::K == 16, "the order of the AVX2 copy's 16-bit unpacks");
  static constexpr int kFrom[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  for (int64_t g = 0; g < G; ++g, src += C, dst += C) {
    int64_t c = 0;
    for (; c + 16 <= C; c += 16)
      for (int j = 0; j < 16; ++j) dst[c + j] = src[c + kFrom[j]];
    for (; c < C; ++c) dst[c] = src[c];
  }
}

// The last k (0 < k < K) features of stats_cl_part's register blocks take a partial block (one
// masked step per row, the lanes past k load 0 and add 0) instead of a scalar two-pass walk down
// each of the k columns, where loads can be masked (Io::load_part): the AVX2 copy's
// 16-bit partial loads copy through a buffer, and took 1.85x the scalar walk's time for 64x17x3x3
// bf16. One thread, channels-last training forward: bf16 64x150x7x7 272 -> 151 us, 8x47x5x5
// 15.3 -> 10.4 us; fp32 64x150x7x7 307 -> 238 us, and in the AVX2 copy (which runs C = 17-31
// for the AVX512 one, long_pattern) 64x27x7x7 51 -> 25 us, 64x27x3x3 12.8 -> 7.9 us;
// channels-first short rows through the expanded path alike (64x27x3x3 fp32 10.2 -> 9.1 us, its
// W = 243 columns leave 19).
template <typename T>
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kMaskedLoads = true;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kMaskedLoads = std::is_same_v<T, acc_t<T>>;  // (vmaskmov: 32- and 64-bit lanes)
#else
constexpr bool kMaskedLoads = false;
#endif

// Where the channels-first runs' tails take partial vector steps: masked loads, and the AVX2
// copy's 16-bit partial loads (Io::load16_part: up to 4 accesses per 8 values). With those, one
// thread, in cache, in-process A/B against the scalar tails on the AMD EPYC (Zen 3) VM: fp16 /
// bf16 rows of 196 (12 steps + 4) training forward 0.83x / 0.98x the time, backward 0.96x / 0.93x,
// inference 0.97x / 0.95x; rows of 169 (10 + 9) 0.83x-0.98x; rows of 21 and 36 0.83x-0.96x. The
// short-row path choice (cf_short_rows) stays with the masked loads' measurements (masked_tail's
// kMaskedOnly): taking the per-feature path for the AVX2 copy's 16-bit rows of 28-45 elements
// instead of the expanded one measured 1.1x-1.3x slower in backward and inference.
template <typename T>
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
constexpr bool kPartialTails = kMaskedLoads<T> || sizeof(T) == 2;
#else
constexpr bool kPartialTails = kMaskedLoads<T>;
#endif

// Whether the last r elements of a run of n (r = n for a run shorter than a vector step) take masked
// vector steps instead of scalar code (0 < r < K; kPartialTails). The tails then
// add into the vector lanes (RunAcc), so a run shorter than a step pays a horizontal sum that its
// scalar adds did not. One thread, per-feature paths, against the scalar tails: rows of 16 + r
// fp32 elements (one vector step: AVX-512's half step, AVX2's K), training forward / backward /
// inference, r = 1 1.04x-1.12x the time, r = 2 1.01x-1.09x, r = 4 0.94x-1.04x, r = 8
// 0.80x-0.94x, r = 15 0.64x-0.93x (2x300x63: 31.9 -> 20.5 us, 23.9 -> 15.5 us, 8.0 -> 7.3 us); bf16 r = 1
// 1.11x-1.17x, r = 15 0.54x; runs shorter than a step (1x1000xn, AVX-512 fp32) n = 3 1.35x /
// 1.25x / 0.94x, n = 9 1.07x / 0.96x / 0.94x, n = 12 0.97x / 0.80x / 0.81x; bf16 n = 5 1.15x /
// 0.91x / 0.76x, n = 9 0.90x / 0.60x / 0.56x; AVX2 fp32 n = 3 1.12x, n = 5 1.02x / 0.95x / 0.88x.
// kMaskedOnly: as if only masked loads took the tails (the path choices measured with them).
template <typename T, bool kMaskedOnly = false>
inline bool masked_tail(int64_t n, int64_t r) {
  if constexpr (!(kMaskedOnly ? kMaskedLoads<T> : kPartialTails<T>)) {
    return false;
  } else {
    constexpr int64_t L = Io<T>::L;
    return n >= Io<T>::kVecRun ? r >= 4 : r >= (sizeof(T) == 2 ? L / 2 : 3 * L / 4);
  }
}

// Sums over a walk of runs (the rows of a channels-first feature): two vector accumulators for
// the runs' K-element steps (and their masked tail steps, masked_tail) and a scalar one for their
// other tails, added up once per walk. (A horizontal sum per run cost about as much as the run
// itself for the 49- and 196-element rows of 7x7 and 14x14 maps.) The scalar tails are summed in
// blocks of at most kTailBlock elements, then the blocks: runs shorter than K (the 4- and
// 9-element rows of 2x2 and 3x3 maps) put every element there, and one running sum over a
// partition's up to 32768 of them lost about n ulp (3136 rows of 4 fp16 values: a feature's mean
// off by 1e-4 and its grad_weight by 0.7%, 80x torch's own error, found by
// scripts/crosscheck_kernels.py).
//
// The statistics' first pass (shifted_sum_run) blocks the vector lanes too (vec_next): each lane
// adds at most kStatsBlock steps per block, the blocks closed between runs (and inside runs longer
// than a block), so the check costs once per run, not per step. Its terms x - shift are all of
// one sign when the shift lies a standard deviation or more from the mean, and a lane's serial
// sum of ~2000 of them put a 31213-element fp16 feature's mean ~200 ulp off; times a large
// sum(dy) that moved its grad_weight by 2%, 18x torch's error (scripts/crosscheck_kernels.py).
// The shift is now also chosen near the mean (feature_shift). The second pass and the gradient
// sums keep one block: their errors are relative to their own sums.
constexpr int64_t kStatsBlock = 64;  // first-pass terms per lane (or per column) and block

template <typename T>
struct RunAcc {
  using IO = Io<T>;
  static constexpr int64_t kTailBlock = 128;
  typename IO::AV v0{acc_t<T>(0)}, v1{acc_t<T>(0)};  // the current block's vector steps
  typename IO::AV b0{acc_t<T>(0)}, b1{acc_t<T>(0)};  // the finished blocks (vec_next only)
  int64_t vec_n = 0;                                 // steps in v0 / v1 (vec_next only)
  acc_t<T> tail = acc_t<T>(0);   // the current block's tail elements
  acc_t<T> tails = acc_t<T>(0);  // the finished blocks
  int64_t tail_n = 0;            // elements in `tail`
  // Whether a vector step ran: without one the lanes hold +0.0 and total() skips their horizontal
  // sum (16 dependent adds with AVX-512), with the same result (+0.0 + the tails). Rows shorter
  // than a vector step paid two such sums a feature in the statistics and two in the gradient
  // sums, on the latency chain of the per-feature fused paths.
  bool vec = false;
  // A run is about to add k > 0 tail elements: a new block when the current one would pass
  // kTailBlock (a block holds at most max(kTailBlock, k) elements).
  inline void tail_next(int64_t k) {
    if (tail_n + k > kTailBlock) {
      tails += tail;
      tail = acc_t<T>(0);
      tail_n = 0;
    }
    tail_n += k;
  }
  // The caller is about to add k <= kStatsBlock vector steps: a new block when the current one
  // would pass kStatsBlock.
  inline void vec_next(int64_t k) {
    if (vec_n + k > kStatsBlock) {
      b0 += v0;
      b1 += v1;
      v0 = typename IO::AV(acc_t<T>(0));
      v1 = typename IO::AV(acc_t<T>(0));
      vec_n = 0;
    }
    vec_n += k;
  }
  acc_t<T> total() const { return (vec ? IO::hsum((b0 + v0) + (b1 + v1)) : acc_t<T>(0)) + (tails + tail); }
};

// A scalar first-pass sum in blocks of kStatsBlock terms (see RunAcc::vec_next).
template <typename A>
struct BlockedSum {
  A block = A(0), done = A(0);
  int64_t k = 0;
  inline void add(A v) {
    block += v;
    if (++k == kStatsBlock) {
      done += block;
      block = A(0);
      k = 0;
    }
  }
  A total() const { return done + block; }
};

// row(r) for every row of `runs` in order, and close() after every kStatsBlock of them and after
// the last: the channels-last first passes' blocks (see RunAcc::vec_next), checked per block.
template <typename Row, typename Close>
inline void blocked_rows(const std::vector<std::pair<int64_t, int64_t>>& runs, Row&& row, Close&& close) {
  int64_t in_block = 0;
  for (const auto& run : runs)
    for (int64_t r = run.first; r < run.second;) {
      const int64_t r1 = std::min(run.second, r + (kStatsBlock - in_block));
      in_block += r1 - r;
      for (; r < r1; ++r) row(r);
      if (in_block == kStatsBlock) {
        close();
        in_block = 0;
      }
    }
  close();
}

// acc += sum(p[0:n] - shift). Summing deviations from a value of the same data (instead of the
// raw values) keeps the sum small when |mean| >> std: with an offset of 1e6 in fp32 a raw sum of
// 3e4 values loses the mean to rounding (ulp(3e10) = 2048) and with it the whole variance.
// x - shift is exact (Sterbenz) when x and shift are within a factor of two. The lanes are
// blocked (RunAcc::vec_next).
template <typename T>
inline void shifted_sum_run(const T* p, int64_t n, acc_t<T> shift, RunAcc<T>& acc) {
  using IO = Io<T>;
  const typename IO::AV sh(shift);
  if (n >= IO::kVecRun) acc.vec = true;
  int64_t i = 0;
  while (i + IO::K <= n) {
    const int64_t steps = std::min((n - i) / IO::K, kStatsBlock);
    acc.vec_next(steps);
    for (const int64_t e = i + steps * IO::K; i < e; i += IO::K) {
      typename IO::AV a, b;
      IO::load_lanes(p + i, a, b);
      acc.v0 += a - sh;
      acc.v1 += b - sh;
    }
  }
  if constexpr (IO::kHalfStep) {
    if (i + IO::L <= n) {
      typename IO::AV a;
      IO::load1(p + i, a);
      acc.vec_next(1);
      acc.v0 += a - sh;
      i += IO::L;
    }
  }
  if (i == n) return;
  if (masked_tail<T>(n, n - i)) {  // (see RunAcc)
    const int64_t r = n - i;
    typename IO::AV a, b;
    IO::load_rest(p + i, r, a, b);
    acc.vec = true;
    acc.vec_next(1);
    acc.v0 += IO::keep_first(a - sh, std::min(r, IO::L));
    if (r > IO::L) acc.v1 += IO::keep_first(b - sh, r - IO::L);
    return;
  }
  acc.tail_next(n - i);
  for (; i < n; ++i) acc.tail += static_cast<acc_t<T>>(p[i]) - shift;
}

// acc += sum(((p[0:n] - shift) - dmean)^2), the squared deviations from the mean shift + dmean
// without rounding that mean to the acc type first (x - shift is exact when x and shift are close).
template <typename T>
inline void sqdev_run(const T* p, int64_t n, acc_t<T> shift, acc_t<T> dmean, RunAcc<T>& acc) {
  using IO = Io<T>;
  const typename IO::AV sh(shift), m(dmean);
  if (n >= IO::kVecRun) acc.vec = true;
  int64_t i = 0;
  for (; i + IO::K <= n; i += IO::K) {
    typename IO::AV a, b;
    IO::load_lanes(p + i, a, b);
    a = (a - sh) - m;
    b = (b - sh) - m;
    acc.v0 = at::vec::fmadd(a, a, acc.v0);
    acc.v1 = at::vec::fmadd(b, b, acc.v1);
  }
  if constexpr (IO::kHalfStep) {
    if (i + IO::L <= n) {
      typename IO::AV a;
      IO::load1(p + i, a);
      a = (a - sh) - m;
      acc.v0 = at::vec::fmadd(a, a, acc.v0);
      i += IO::L;
    }
  }
  if (i == n) return;
  if (masked_tail<T>(n, n - i)) {
    const int64_t r = n - i;
    typename IO::AV a, b;
    IO::load_rest(p + i, r, a, b);
    acc.vec = true;
    a = IO::keep_first((a - sh) - m, std::min(r, IO::L));
    acc.v0 = at::vec::fmadd(a, a, acc.v0);
    if (r > IO::L) {
      b = IO::keep_first((b - sh) - m, r - IO::L);
      acc.v1 = at::vec::fmadd(b, b, acc.v1);
    }
    return;
  }
  acc.tail_next(n - i);
  for (; i < n; ++i) {
    const acc_t<T> d = (static_cast<acc_t<T>>(p[i]) - shift) - dmean;
    acc.tail += d * d;
  }
}

// sdy += sum(dy) and sdyx += sum(dy * (x - mean)) over a run.
template <typename T>
inline void grad_sums_run(const T* dy, const T* x, int64_t n, acc_t<T> mean, RunAcc<T>& sdy, RunAcc<T>& sdyx) {
  using IO = Io<T>;
  const typename IO::AV m(mean);
  if (n >= IO::kVecRun) sdy.vec = sdyx.vec = true;
  int64_t i = 0;
  for (; i + IO::K <= n; i += IO::K) {
    typename IO::AV g0, g1, x0, x1;
    IO::load_lanes(dy + i, g0, g1);
    IO::load_lanes(x + i, x0, x1);
    sdy.v0 += g0;
    sdy.v1 += g1;
    sdyx.v0 = at::vec::fmadd(g0, x0 - m, sdyx.v0);
    sdyx.v1 = at::vec::fmadd(g1, x1 - m, sdyx.v1);
  }
  if constexpr (IO::kHalfStep) {
    if (i + IO::L <= n) {
      typename IO::AV g0, x0;
      IO::load1(dy + i, g0);
      IO::load1(x + i, x0);
      sdy.v0 += g0;
      sdyx.v0 = at::vec::fmadd(g0, x0 - m, sdyx.v0);
      i += IO::L;
    }
  }
  if (i == n) return;
  if (masked_tail<T>(n, n - i)) {  // (lanes past the run: dy = 0 adds 0 and 0 * (0 - mean))
    const int64_t r = n - i;
    typename IO::AV g0, g1, x0, x1;
    IO::load_rest(dy + i, r, g0, g1);
    IO::load_rest(x + i, r, x0, x1);
    sdy.vec = sdyx.vec = true;
    sdy.v0 += g0;
    sdyx.v0 = at::vec::fmadd(g0, x0 - m, sdyx.v0);
    if (r > IO::L) {
      sdy.v1 += g1;
      sdyx.v1 = at::vec::fmadd(g1, x1 - m, sdyx.v1);
    }
    return;
  }
  sdy.tail_next(n - i);
  sdyx.tail_next(n - i);
  for (; i < n; ++i) {
    const acc_t<T> g = static_cast<acc_t<T>>(dy[i]);
    sdy.tail += g;
    sdyx.tail += g * (static_cast<acc_t<T>>(x[i]) - mean);
  }
}

// out = (x - mean) * scale + shift over a run with per-run constants. Folded: out = x * scale +
// shift with shift = shift - mean * scale folded by the caller (see folding_is_exact), one
// subtract fewer per vector, which the 16-bit types' conversions make worth it (bf16 8x64x56x56
// NCHW: inference 0.299 -> 0.280 ms, training forward 0.562 -> 0.497 ms); mean is then unused.
template <typename T, bool Folded = false>
inline void apply_run(const T* x, T* out, int64_t n, acc_t<T> mean, acc_t<T> scale, acc_t<T> shift) {
  using IO = Io<T>;
  const typename IO::AV m(mean), s(scale), b(shift);
  int64_t i = 0;
  for (; i + IO::K <= n; i += IO::K) {
    typename IO::AV x0, x1;
    IO::load_lanes(x + i, x0, x1);
    if constexpr (!Folded) {
      x0 = x0 - m;
      x1 = x1 - m;
    }
    IO::store_lanes(out + i, at::vec::fmadd(x0, s, b), at::vec::fmadd(x1, s, b));
  }
  if constexpr (IO::kHalfStep) {
    if (i + IO::L <= n) {
      typename IO::AV x0;
      IO::load1(x + i, x0);
      if constexpr (!Folded) x0 = x0 - m;
      IO::store1(out + i, at::vec::fmadd(x0, s, b));
      i += IO::L;
    }
  }
  if (i == n) return;
  if (masked_tail<T>(n, n - i)) {
    const int64_t r = n - i;
    typename IO::AV x0, x1;
    IO::load_rest(x + i, r, x0, x1);
    if constexpr (!Folded) {
      x0 = x0 - m;
      x1 = x1 - m;
    }
    IO::store_rest(out + i, at::vec::fmadd(x0, s, b), at::vec::fmadd(x1, s, b), r);
    return;
  }
  const ApplyCoeffs<acc_t<T>> k{Folded ? acc_t<T>(0) : mean, scale, shift};  // (x - 0 is exact)
  for (; i < n; ++i) out[i] = static_cast<T>(apply_one(static_cast<acc_t<T>>(x[i]), k));
}

// dx = k_dy * dy + k_xmu * (x - mean) + k_0 over a run with per-run constants.
template <typename T>
inline void grad_run(const T* dy, const T* x, T* dx, int64_t n, const GradCoeffs<acc_t<T>>& g) {
  using IO = Io<T>;
  const typename IO::AV m(g.mean), kd(g.k_dy), kx(g.k_xmu), k0(g.k_0);
  int64_t i = 0;
  for (; i + IO::K <= n; i += IO::K) {
    typename IO::AV g0, g1, x0, x1;
    IO::load_lanes(dy + i, g0, g1);
    IO::load_lanes(x + i, x0, x1);
    IO::store_lanes(dx + i, at::vec::fmadd(kd, g0, at::vec::fmadd(kx, x0 - m, k0)),
                    at::vec::fmadd(kd, g1, at::vec::fmadd(kx, x1 - m, k0)));
  }
  if constexpr (IO::kHalfStep) {
    if (i + IO::L <= n) {
      typename IO::AV g0, x0;
      IO::load1(dy + i, g0);
      IO::load1(x + i, x0);
      IO::store1(dx + i, at::vec::fmadd(kd, g0, at::vec::fmadd(kx, x0 - m, k0)));
      i += IO::L;
    }
  }
  if (i == n) return;
  if (masked_tail<T>(n, n - i)) {
    const int64_t r = n - i;
    typename IO::AV g0, g1, x0, x1;
    IO::load_rest(dy + i, r, g0, g1);
    IO::load_rest(x + i, r, x0, x1);
    IO::store_rest(dx + i, at::vec::fmadd(kd, g0, at::vec::fmadd(kx, x0 - m, k0)),
                   at::vec::fmadd(kd, g1, at::vec::fmadd(kx, x1 - m, k0)), r);
    return;
  }
  for (; i < n; ++i)
    dx[i] = static_cast<T>(grad_one(static_cast<acc_t<T>>(dy[i]), static_cast<acc_t<T>>(x[i]), g));
}

// ---------------------------------------------------------------------------------------------
// Software prefetch for the channels-last row blocks.
//
// A hardware stream prefetcher locks on to a stream after a few misses in a row. The row-major
// statistics and gradient sums of wide channels-last rows read R = 4 rows side by side, column
// tile by column tile: 4 streams of a few hundred bytes each (512 for 256 bf16 features), which
// end about when the prefetcher has learned them, so most lines arrived at memory latency and
// these passes lost to torch's one-stream-per-thread passes from memory while beating them in
// cache. The first pass over a block therefore prefetches the next block's rows at the same
// columns, one line at a time. In-process A/B on 2 AVX2 threads, inputs from memory, training
// forward: 8x256x14x14 NHWC bf16 331 -> 264 us, fp32 322 -> 297 us, 8x1000x7x7 NHWC bf16 280 ->
// 262 us; backward (gradient sums) 8x256x14x14 NHWC fp32 1.05x, 8x1000x7x7 1.01-1.02x. (The same
// for the channels-first features' 100-800 byte rows measured within +-5% once their sums took
// one horizontal sum per feature: left out.)
constexpr int64_t kCacheLine = 64;

// In a column walk over [c0, c1) in steps of Io<T>::K: at the step starting each cache line,
// prefetch that line of rows [row, row + n) (stride so); Locality as __builtin_prefetch's (3: into
// L1, 2: into L2).
template <typename T, int Locality = 3>
inline void prefetch_block_rows(const T* p, int64_t so, int64_t row, int64_t n, int64_t c, int64_t c0) {
  constexpr int64_t kLine = kCacheLine / static_cast<int64_t>(sizeof(T));
  if ((c - c0) % kLine >= Io<T>::K) return;
  for (int64_t j = 0; j < n; ++j) __builtin_prefetch(p + (row + j) * so + c, 0, Locality);
}

// Every line of a run of n elements, into L2.
template <typename T>
inline void prefetch_run(const T* p, int64_t n) {
  constexpr int64_t kLine = kCacheLine / static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 0, 2);
}

// The rows of the next task a thread will run (channels-last row-major statistics), prefetched
// into L2 while this task's second pass runs from cache: each task starts on cold rows otherwise,
// and its first pass waited on memory (1024x1024 fp16 statistics from DRAM took twice their time
// in cache). `x` points at the next task's first row and column; it has `rows` rows of `width`
// features. nullptr: none (ghost batches, or the last task).
template <typename T>
struct NextRows {
  const T* x = nullptr;
  int64_t rows = 0, width = 0;
  // Along a pass over rows [i, i + n) (relative to its task's first row) at column offset dc from
  // its tile's first: prefetch the lines starting there of the same relative rows of the next task.
  void prefetch(int64_t so, int64_t i, int64_t n, int64_t dc) const {
    if (x != nullptr && dc < width) prefetch_block_rows<T, 2>(x, so, i, std::min(rows, i + n) - i, dc, 0);
  }
};

// Channels-first: the rows of the next task a thread will run (the next feature, or the next
// partition of this one), each prefetched into L2 as the same relative row of this task is
// passed over from cache. A feature's rows are short runs far apart (8x64x28x28: 8 runs of 1.5
// KiB, 100 KiB apart), too short for the hardware prefetcher to pick up, so each task's first
// pass otherwise waits on memory. x: the next task's first row, nullptr if none.
template <typename T>
struct CfNextRows {
  const T* x = nullptr;
  int64_t so = 0, rows = 0, I = 0;
  void prefetch(int64_t i) const {
    if (x != nullptr && i < rows) prefetch_run(x + i * so, I);
  }
};

// Which tasks are prefetched: those of at least 3 rows of at most 7 KiB (the hardware prefetcher
// follows longer rows, or one or two streams, and prefetching those measured slower, e.g. O = 2
// rows of 8 or 16 KiB: 2x32x16x16x16 fp32 backward 0.082 -> 0.098 ms; a sweep over rows of 2-16
// KiB and 2-8 rows gained from 3 rows of up to 6 KiB, none at 8 KiB), and at most 64 KiB per
// tensor, so that the current task and the next fit L2 together (32x64x56x56 fp32, 125 KiB tasks
// of 12.5 KiB rows: grad_sums 1.4 -> 1.9 ms).
constexpr int64_t kCfPrefetchMaxRowBytes = 7 * 1024;
constexpr int64_t kCfPrefetchMinRows = 3;
constexpr int64_t kCfPrefetchMaxBytes = 64 * 1024;
// The backward prefetches two tensors per task (dy and x) along a pass that also writes dx, and
// there the limits are tighter: rows of at most 2.5 KiB, at least 5 of them. Measured on an AMD
// EPYC (Zen 3) VM, 2 threads from memory, in-process A/B: tasks of 3 KiB rows and longer, or of 3-4
// rows, ran 5-20% slower with the prefetch (8x64x28x28 fp32 backward 194 -> 179 us without it,
// 8x64x56x56 fp16 838 -> 784, 4x64x28x28 fp16 108 -> 103, 32x32x56x56 fp32 two-phase 2689 -> 2541),
// while 6-16 rows of 1-2.5 KiB still gained (8x64x1024 fp16 245 -> 211, 16x64x28x28 fp16 373 -> 322).
// The training forward (one tensor) gained or held up to 6 KiB rows there, so it keeps the limits
// above.
constexpr int64_t kCfPrefetchPairMaxRowBytes = 2560;
constexpr int64_t kCfPrefetchPairMinRows = 5;

// How many tasks ahead to prefetch: tiny tasks (8x1000x7x7: 8 rows of 49 elements) finish before
// the next one's lines could arrive, so those look further ahead (about kCfPrefetchAheadBytes).
constexpr int64_t kCfPrefetchAheadBytes = 16 * 1024;
template <typename T>
inline int64_t cf_prefetch_distance(const View3& v, int64_t per) {
  const int64_t bytes = std::max<int64_t>(1, std::min(v.O, per) * v.I * static_cast<int64_t>(sizeof(T)));
  return std::min<int64_t>(8, std::max<int64_t>(1, kCfPrefetchAheadBytes / bytes));
}

// Task t's rows of channels-first data with P partitions of `per` rows per feature, to prefetch
// (none if t is not one of this thread's tasks, t >= end, or not a task to prefetch, see above).
// pair: one of the backward's two prefetched tensors (the tighter limits).
template <typename T>
inline CfNextRows<T> cf_task_rows(const T* x, int64_t so, int64_t sc, const View3& v, int64_t P, int64_t per,
                                  int64_t t, int64_t end, bool pair = false) {
  if (t >= end) return CfNextRows<T>{};
  const int64_t c = t / P, r0 = (t % P) * per, rows = std::min(v.O, r0 + per) - r0;
  const int64_t row_bytes = v.I * static_cast<int64_t>(sizeof(T));
  if (row_bytes > kCfPrefetchMaxRowBytes || rows < kCfPrefetchMinRows || rows * row_bytes > kCfPrefetchMaxBytes)
    return CfNextRows<T>{};
  if (pair && (row_bytes > kCfPrefetchPairMaxRowBytes || rows < kCfPrefetchPairMinRows)) return CfNextRows<T>{};
  return CfNextRows<T>{x + c * sc + r0 * so, so, rows, v.I};
}

// ---------------------------------------------------------------------------------------------
// Partial statistics.

// Grain (tasks per chunk of at::parallel_for) so that a thread gets at least kCpuChunkElems
// elements: tiny inputs then run inline instead of waking the thread pool, which costs more than
// the work (milliseconds on a loaded machine). It only decides which thread runs a task, never the
// partition, so results stay independent of the thread count.
inline int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kCpuChunkElems / std::max<int64_t>(1, elems_per_task));
}

// Rows of the outer dim in one channels-first partition (rows longer than a chunk: one row).
inline int64_t cf_rows_per_part(const View3& v) { return v.I >= kCpuChunkElems ? 1 : kCpuChunkElems / v.I; }

// Elements in one channels-first partition / one channels-last partition.
inline int64_t cf_part_elems(const View3& v) { return std::min(cf_rows_per_part(v), v.O) * v.I; }
inline int64_t cl_part_elems(const View3& v, int64_t P) { return ceil_div(v.O, P) * v.C; }

// Channels-last partition `part` of P (P / G per ghost): its ghost g and ghost-row range
// [rho0, rho1), and the physical row runs it covers. Ghost row rho of ghost g is physical row
// ((rho / S) * G + g) * S + rho % S, so a partition is a few runs of consecutive rows (one run
// without ghosts).
using RowRuns = std::vector<std::pair<int64_t, int64_t>>;

// Partition `part`'s ghost-row range [rho0, rho1) within its ghost.
inline std::pair<int64_t, int64_t> cl_ghost_rows(const View3& v, int64_t part, int64_t P) {
  const int64_t per_ghost = P / v.G;
  const int64_t R = v.ghost_rows();
  const int64_t per = ceil_div(R, per_ghost);
  const int64_t rho0 = std::min(R, (part % per_ghost) * per);
  return {rho0, std::min(R, rho0 + per)};
}

inline int64_t cl_partition(const View3& v, int64_t part, int64_t P, RowRuns& runs) {
  const int64_t g = part / (P / v.G);
  const auto [rho0, rho1] = cl_ghost_rows(v, part, P);
  runs.clear();
  if (v.G == 1) {  // no ghosts: one run (S need not be set then)
    if (rho1 > rho0) runs.emplace_back(rho0, rho1);
    return 0;
  }
  for (int64_t rho = rho0; rho < rho1;) {
    const int64_t k = rho / v.S, s = rho % v.S;
    const int64_t len = std::min(v.S - s, rho1 - rho);
    const int64_t r = (k * v.G + g) * v.S + s;
    runs.emplace_back(r, r + len);
    rho += len;
  }
  return g;
}

// Ghost of physical row r (channels-last ghost view).
inline int64_t ghost_of_row(const View3& v, int64_t r) { return v.G == 1 ? 0 : (r / v.S) % v.G; }

// Partial states per (partition, feature). `mean` holds the partial mean MINUS the feature's
// shift (a value near its mean, feature_shift): every partial of a feature shares that shift, so the
// partial means and the deltas of Chan's merges stay small and exact even when |mean| >> std
// (with fp32 means rounded at an offset of 1e6, a merge delta is off by up to 0.06, which alone
// adds 1e-3 to a variance of 1). The shift is added back once, after the last merge.
template <typename A>
struct PartialArrays {
  A* mean;
  A* m2;
  A* n;
};

template <typename A>
inline PartialArrays<A> partial_arrays(void* ws, int64_t P, int64_t C) {
  A* base = static_cast<A*>(ws);
  return PartialArrays<A>{base, base + P * C, base + 2 * P * C};
}

// A feature's shift: the mean of its first k = min(kShiftPick, count) elements, rounded to the
// input type (mean_shift; cl_feature_shifts for channels-last rows). The first pass sums x - shift, and both its
// rounding and that of the partial means (mean - shift) grow with |mean - shift|. The first
// element, the shift before, lies a standard deviation or more from the mean as often as not; with
// it 4 standard deviations out, the saved float32 means were off by up to 5-19 units of
// eps * max(|mean|, std) (1.4-9 with the blocked first pass), and now by at most 0.2-3.5
// (docs/cpu-kernels.md). Near the data: x - shift stays exact (Sterbenz) when |mean| >> std, and
// a constant feature's shift is its value, so its variance is exactly 0.
template <typename T>
constexpr int64_t kShiftPick = Io<T>::K;  // (16; 8 for float64)

// vals[0] + the mean of vals[0:k] - vals[0], rounded to the input type (exactly
// vals[0] for constant data). A full step (k = Io<T>::K) in vector registers: ~12 instructions,
// where the pick of the nearest element cost 10-15 ns a feature (8x1000x7x7 fp32 training forward
// 0.90x) and scalar loops 20-50 ns. On the input's grid, a 16-bit input's x - shift and the
// lanes' sums of them are exact; a float32 shift with bits below that grid rounded every term
// the same way (fp16 8x64x28x28, a feature's mean 4.4 units off against 0.01 with the shift
// rounded to fp16).
template <typename T>
inline acc_t<T> mean_shift(const T* vals, int64_t k) {
  using A = acc_t<T>;
  using IO = Io<T>;
  using AV = typename IO::AV;
  const A x0 = static_cast<A>(vals[0]);
  A m;  // (the mean minus x0)
  if (k == IO::K) {
    AV a, b;
    IO::load(vals, a, b);
    const AV h(x0);
    const auto plus = [](const AV& u, const AV& v) { return u + v; };
    m = at::vec::vec_reduce_all<A>(plus, (a - h) + (b - h)) / static_cast<A>(IO::K);
  } else {
    A s = A(0);
    for (int64_t j = 1; j < k; ++j) s += static_cast<A>(vals[j]) - x0;
    m = s / static_cast<A>(k);
  }
  return static_cast<A>(static_cast<T>(x0 + m));
}

// Channels-first feature f's shift (see above), from its first elements in row order (0 without
// elements).
template <typename T>
inline acc_t<T> feature_shift(const ForwardParams& p, int64_t f) {
  constexpr int64_t K = kShiftPick<T>;
  const View3& v = p.v;
  const T* x = static_cast<const T*>(p.x) + f * p.x_sc;
  // Rows of 4 or more elements: the first row's (for rows of 4 to K - 1, a gather across rows,
  // with its store-to-load stall before a vector load, cost 64x512x2x2's training forward 55 -> 75 us)
  if (v.I >= 4) return mean_shift(x, std::min(v.I, K));
  const int64_t k = std::min(v.O * v.I, K);
  if (k == 0) return acc_t<T>(0);
  T vals[K] = {};  // (k >= 1 of them set below; initialized for -Wmaybe-uninitialized)
  for (int64_t j = 0, r = 0, i = 0; j < k; ++j) {
    vals[j] = x[r * p.x_so + i];
    if (++i == v.I) {
      i = 0;
      ++r;
    }
  }
  return mean_shift(vals, k);
}

// Channels-last shifts of every (ghost, feature), ghost-major (G * C of them), from the first
// rows of each ghost: mean_shift's value, vectorized across features (K at a time), as elements
// of the input type, the shift rows the channels-last loops load. The k rows' deviations from the
// first are summed in four independent chains (rows mod 4), not one: a chain of k dependent adds
// per K features made this latency-bound (64x1000 fp32, one thread, in cache: the pick of the
// element nearest the mean, two such chains, cost the training forward 20.4 -> 23.2 us).
template <typename T>
inline std::vector<T> cl_feature_shifts(const ForwardParams& p, int64_t max_rows = kShiftPick<T>) {
  using A = acc_t<T>;
  using IO = Io<T>;
  using AV = typename IO::AV;
  const View3& v = p.v;
  const int64_t C = v.C;
  const T* x = static_cast<const T*>(p.x);
  std::vector<T> out(static_cast<size_t>(v.features()));
  const int64_t k = std::min({v.ghost_rows(), kShiftPick<T>, max_rows});
  if (k == 0) return out;
  for (int64_t g = 0; g < v.G; ++g) {
    const T* rows[kShiftPick<T>];  // ghost g's first k rows (cl_partition's map)
    for (int64_t rho = 0; rho < k; ++rho)
      rows[rho] = x + (v.G == 1 ? rho : ((rho / v.S) * v.G + g) * v.S + rho % v.S) * p.x_so;
    T* o = out.data() + g * C;
    int64_t c = 0;
    const AV inv_k(A(1) / static_cast<A>(k));
    for (; c + IO::K <= C; c += IO::K) {
      AV x0[2], s[4][2];
      IO::load(rows[0] + c, x0[0], x0[1]);
      for (int q = 0; q < 4; ++q) s[q][0] = s[q][1] = AV(A(0));
      for (int64_t rho = 1; rho < k; ++rho) {
        AV a[2];
        IO::load(rows[rho] + c, a[0], a[1]);
        for (int h = 0; h < 2; ++h) s[rho & 3][h] += a[h] - x0[h];
      }
      AV m[2];
      for (int h = 0; h < 2; ++h) m[h] = x0[h] + ((s[0][h] + s[1][h]) + (s[2][h] + s[3][h])) * inv_k;
      IO::store(o + c, m[0], m[1]);  // (rounded to the input type)
    }
    for (; c < C; ++c) {
      T vals[kShiftPick<T>] = {};  // (k >= 1 set; initialized for -Wmaybe-uninitialized)
      for (int64_t rho = 0; rho < k; ++rho) vals[rho] = rows[rho][c];
      o[c] = static_cast<T>(mean_shift(vals, k));  // (exact: already rounded to T)
    }
  }
  return out;
}

// Channels-first: partition `part` of feature c covers whole rows of the outer dim; rows longer
// than a chunk are split into chunk-sized segments. The state's mean is relative to the shift.
template <typename T>
inline WelfordState<acc_t<T>> stats_cf_part(const ForwardParams& p, int64_t c, int64_t part, acc_t<T> shift,
                                             const CfNextRows<T>& next = {}) {
  using A = acc_t<T>;
  const View3& v = p.v;
  const T* x = static_cast<const T*>(p.x) + c * p.x_sc;
  const int64_t rows_per_part = cf_rows_per_part(v);
  const int64_t r0 = part * rows_per_part, r1 = std::min(v.O, r0 + rows_per_part);
  WelfordState<A> st = welford_empty<A>();
  if (r1 <= r0) return st;
  if (v.I <= kCpuChunkElems) {
    RunAcc<T> s;
    for (int64_t r = r0; r < r1; ++r) shifted_sum_run(x + r * p.x_so, v.I, shift, s);
    const A n = static_cast<A>((r1 - r0) * v.I);
    const A dmean = s.total() / n;
    RunAcc<T> m2;
    for (int64_t r = r0; r < r1; ++r) {
      sqdev_run(x + r * p.x_so, v.I, shift, dmean, m2);
      next.prefetch(r - r0);
    }
    st = WelfordState<A>{dmean, m2.total(), n};
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i0 = 0; i0 < v.I; i0 += kCpuChunkElems) {
        const int64_t len = std::min(kCpuChunkElems, v.I - i0);
        const T* seg = x + r * p.x_so + i0;
        RunAcc<T> s, m2;
        shifted_sum_run(seg, len, shift, s);
        const A dmean = s.total() / static_cast<A>(len);
        sqdev_run(seg, len, shift, dmean, m2);
        st = welford_merge(st, WelfordState<A>{dmean, m2.total(), static_cast<A>(len)});
      }
    }
  }
  return st;
}

// Masked (weighted) statistics: each element counts with weight w in {0, 1} read from a byte
// mask viewed like x. Same two-pass-then-Chan structure as the unmasked partitions; the weighted
// moments are mean = sum(w x) / sum(w), M2 = sum(w (x - mean)^2). Scalar loops: masks are not on
// the hot path the vector code serves.
//
// The shift of a masked feature is its first UNMASKED element (its first element when every one
// is masked): with a masked-out shift, a feature with a single unmasked value would get a mean one
// rounding away from that value, and with a zero variance the output is then far from 0.
// (Masked kernels never see ghost rows: masked ghost batches are split views, G == 1.)
template <typename T>
inline void masked_feature_shifts(const ForwardParams& p, acc_t<T>* shifts) {
  using A = acc_t<T>;
  const View3& v = p.v;
  const T* x = static_cast<const T*>(p.x);
  if (!v.channels_last) {
    at::parallel_for(0, v.C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        A sh = static_cast<A>(x[c * p.x_sc]);
        bool found = false;
        for (int64_t r = 0; r < v.O && !found; ++r)
          for (int64_t i = 0; i < v.I; ++i)
            if (p.mask[c * p.m_sc + r * p.m_so + i] != 0) {
              sh = static_cast<A>(x[c * p.x_sc + r * p.x_so + i]);
              found = true;
              break;
            }
        shifts[c] = sh;
      }
    });
    return;
  }
  std::vector<char> found(static_cast<size_t>(v.C), 0);
  int64_t left = v.C;
  for (int64_t c = 0; c < v.C; ++c) shifts[c] = static_cast<A>(x[c]);
  for (int64_t r = 0; r < v.O && left > 0; ++r)
    for (int64_t c = 0; c < v.C; ++c)
      if (!found[c] && p.mask[r * p.m_so + c * p.m_sc] != 0) {
        shifts[c] = static_cast<A>(x[r * p.x_so + c]);
        found[c] = 1;
        --left;
      }
}

template <typename T>
inline WelfordState<acc_t<T>> masked_stats_cf_part(const ForwardParams& p, int64_t c, int64_t part,
                                                   acc_t<T> shift) {
  using A = acc_t<T>;
  const View3& v = p.v;
  const T* x = static_cast<const T*>(p.x) + c * p.x_sc;
  const uint8_t* m = p.mask + c * p.m_sc;
  const int64_t rows_per_part = cf_rows_per_part(v);
  const int64_t r0 = part * rows_per_part, r1 = std::min(v.O, r0 + rows_per_part);
  WelfordState<A> st = welford_empty<A>();
  for (int64_t i0 = 0; i0 < v.I; i0 += kCpuChunkElems) {  // one segment unless rows are long
    const int64_t len = std::min(kCpuChunkElems, v.I - i0);
    BlockedSum<A> s;
    A n = A(0);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = i0; i < i0 + len; ++i) {
        if (m[r * p.m_so + i] == 0) continue;  // (skipped, not weighted by 0: padding may be inf / NaN)
        s.add(static_cast<A>(x[r * p.x_so + i]) - shift);
        n += A(1);
      }
    if (n == A(0)) continue;
    const A dm = s.total() / n;
    A q = A(0);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = i0; i < i0 + len; ++i) {
        if (m[r * p.m_so + i] == 0) continue;
        const A d = (static_cast<A>(x[r * p.x_so + i]) - shift) - dm;
        q += d * d;
      }
    st = welford_merge(st, WelfordState<A>{dm, q, n});
  }
  return st;
}

template <typename T>
inline void masked_stats_cl_part(const ForwardParams& p, int64_t part, int64_t P, PartialArrays<acc_t<T>> out,
                                 const acc_t<T>* shifts) {
  using A = acc_t<T>;
  const View3& v = p.v;
  const int64_t C = v.C;
  const int64_t rows_per_part = ceil_div(v.O, P);
  const int64_t r0 = part * rows_per_part, r1 = std::min(v.O, r0 + rows_per_part);
  const T* x = static_cast<const T*>(p.x);
  for (int64_t c = 0; c < C; ++c) {
    const A h = shifts[c];
    BlockedSum<A> s;
    A n = A(0);
    for (int64_t r = r0; r < r1; ++r) {
      if (p.mask[r * p.m_so + c * p.m_sc] == 0) continue;  // (skipped: padding may be inf / NaN)
      s.add(static_cast<A>(x[r * p.x_so + c]) - h);
      n += A(1);
    }
    const A dm = n > A(0) ? s.total() / n : A(0);
    A q = A(0);
    for (int64_t r = r0; r < r1; ++r) {
      if (p.mask[r * p.m_so + c * p.m_sc] == 0) continue;
      const A d = (static_cast<A>(x[r * p.x_so + c]) - h) - dm;
      q += d * d;
    }
    out.mean[part * C + c] = dm;
    out.m2[part * C + c] = q;
    out.n[part * C + c] = n;
  }
}

// ---------------------------------------------------------------------------------------------
// Channels-last narrow rows (dense: outer stride C; no ghosts): the rows form one flat run whose
// feature pattern repeats every W = lcm(C, U) elements (U: elements per load unit), so NU = W / U
// units of accumulator vectors follow the pattern and every loop is vectorized. For C < 2 vectors
// the per-row loops are scalar (C chains per row, or a column walk strided by C); for wider
// narrow rows (every C < 32, and C up to 128 fp32 / 256 fp16, bf16 / 64 fp64 when W fits 16
// units) their fixed cost per row and scalar tails outweigh a row's work. Per-lane accumulators fold into the features in lane
// order at the end, so the result depends on the shape only. Used by the statistics, the apply
// step and the backward. NU = 1..4 are compiled with the pattern and the accumulators in
// registers; longer patterns (NU = 0 in the templates: nu at run time) keep them in L1.
// Measured on 2 AVX2 threads against the per-row loops (op level, in cache unless noted):
// 16x3x64x64 bf16 forward 589 -> 86 us, backward 870 -> 105, inference 323 -> 52; 16x5x64x64
// fp32 forward 746 -> 131, backward 592 -> 133, inference 309 -> 67; 16x16x64x64 fp32 forward
// 595 -> 253, inference 409 -> 129; 8x64x56x56 from memory, fp32 / bf16: forward 1.08x / 1.16x,
// backward 1.06x / 1.13x, inference 1.35x / 1.17x.
constexpr int kPeriodicMaxUnits = 32;

// Load unit: one accumulator vector for fp32 / fp64, or the K elements that a 16-bit load
// converts to two fp32 vectors.
template <typename T>
struct Unit {
  using A = acc_t<T>;
  using AV = Vectorized<A>;
  static constexpr int V = std::is_same_v<T, A> ? 1 : 2;  // accumulator vectors per unit
  static constexpr int64_t L = AV::size();
  static constexpr int64_t U = V * L;  // elements per unit
  static inline void load(const T* p, AV* v) {
    if constexpr (V == 1) {
      v[0] = AV::loadu(p);
    } else {
      at::vec::load_to_float<T>(p, v[0], v[1]);
    }
  }
  static inline void store(T* p, const AV* v) {
    if constexpr (V == 1) {
      v[0].store(p);
    } else {
      narrow<T>(v[0], v[1]).store(p);
    }
  }
};

// Units in the pattern (1 .. kPeriodicMaxUnits) of the periodic loops for this view, else 0 (they
// do not apply). `dense`: every tensor involved has outer stride C.
template <typename T>
inline int pattern_units(const View3& v, bool dense) {
  using UT = Unit<T>;
  if (!dense || !v.channels_last || v.G != 1) return 0;
  const int64_t nu = std::lcm(v.C, UT::U) / UT::U;
  // Up to 16 units of 8 lanes for any C (the same number of elements in units of 16 lanes:
  // AVX-512's 16-unit patterns of 512 fp16 features held 32 vectors per pattern and took 1.8x
  // the row loops' time for 288x512 fp16 gradient sums); up to 32 units for rows of fewer than 32
  // features (C = 17 .. 31 odd), where the per-row loops spend a large part of each row in their
  // scalar tail (8x17x28x28 and 8x31x28x28, fp32 / fp16 / bf16, from memory: 1.1x-2.3x faster with
  // the pattern).
  const int64_t cap = v.C < 32 ? kPeriodicMaxUnits : kPeriodicMaxUnits / 2 * 8 / Unit<T>::L;
  return nu <= cap ? static_cast<int>(nu) : 0;
}
// pattern_units, when the input holds enough patterns to pay for their setup (the pattern arrays
// built and the lanes folded per call, per thread): at least 16 patterns of up to 4 units
// (registers), 48 of longer ones (arrays in L1), else 0 and the row loops run. Measured one thread,
// op level, against the row loops (2 .. 2048 rows of C = 1 .. 27, fp32): the row loops won below
// about 8-32 patterns of 1-3 units (C = 3, 4, 8, 12) and 32-64 of 17-27 units (C = 17, 27 in the
// AVX2 copy). Before this rule small inputs always took the pattern: 4x27 fp32 / bf16 backward
// 13.6 / 17.7 us, now 7.0 / 6.4; 2x3x3x3 channels-first training forward (short rows expanded to
// one channels-last row of 27) 17.4 us, now 7.7.
template <typename T>
inline int periodic_units(const View3& v, bool dense) {
  const int nu = pattern_units<T>(v, dense);
  const int64_t min_patterns = nu <= 4 ? 16 : 48;
  return nu && v.O * v.C >= min_patterns * nu * Unit<T>::U ? nu : 0;
}
// The statistics' choice: beyond 4 units (pattern and accumulators no longer in registers) the
// register blocks of stats_cl_block do as well or better once C >= 2 vectors (8x128x14x14 in
// cache: 0.070 vs 0.077 ms fp32, 0.079 vs 0.095 ms bf16).
template <typename T>
inline int periodic_units_stats(const View3& v, bool dense) {
  const int nu = periodic_units<T>(v, dense);
  return nu > 4 && v.C >= 2 * Unit<T>::L ? 0 : nu;
}

// Compile-time pattern length NU (0: nu at run time) and the array size it needs.
template <typename T, int NU>
struct Pattern {
  static constexpr int kUnits = NU ? NU : kPeriodicMaxUnits;
  static constexpr int kVecs = kUnits * Unit<T>::V;
  static constexpr int64_t kElems = kUnits * Unit<T>::U;
};

// The W-element pattern of a per-feature array (pattern[e] = a[e % C]) as nu * V vectors.
template <typename T, int NU, typename Src>
inline void pattern_vectors(const Src* a, int64_t C, int nu, Vectorized<acc_t<T>>* out) {
  using A = acc_t<T>;
  constexpr int64_t L = Unit<T>::L;
  A pat[Pattern<T, NU>::kElems];
  for (int64_t e = 0; e < nu * Unit<T>::U; ++e) pat[e] = static_cast<A>(a[e % C]);
  for (int j = 0; j < nu * Unit<T>::V; ++j) out[j] = Vectorized<A>::loadu(pat + j * L);
}

// Lane sums (nu * V vectors) added into per-feature sums in lane order.
template <typename T, int NU>
inline void fold_lanes(const Vectorized<acc_t<T>>* v, int64_t C, int nu, acc_t<T>* out) {
  using A = acc_t<T>;
  constexpr int64_t L = Unit<T>::L;
  A t[Pattern<T, NU>::kElems];
  for (int j = 0; j < nu * Unit<T>::V; ++j) v[j].store(t + j * L);
  for (int64_t k = 0; k < nu * Unit<T>::U; ++k) out[k % C] += t[k];
}

// Two-pass moments of the rows in the flat elements [begin, end) (multiples of C), relative to
// the shift row: mean[c] = mean - shift[c] and m2[c], as stats_cl_block computes them.
// (Not inlined: inlined into stats_cl_part, its second pass kept the accumulators in memory, a
// store-to-load chain per vector: 16x3x64x64 fp32 training forward 48 -> 72 us.)
template <typename T, int NU>
__attribute__((noinline)) void stats_periodic(int nu_rt, const T* x, int64_t begin, int64_t end, int64_t C, const T* shift,
                           acc_t<T>* mean, acc_t<T>* m2) {
  using UT = Unit<T>;
  using A = acc_t<T>;
  using AV = typename UT::AV;
  constexpr int V = UT::V;
  const int nu = NU ? NU : nu_rt, nv = nu * V;
  const int64_t W = nu * UT::U;
  AV h[Pattern<T, NU>::kVecs], d[V];
  pattern_vectors<T, NU>(shift, C, nu, h);
  int64_t e = begin;
  {
    AV s[Pattern<T, NU>::kVecs], done[Pattern<T, NU>::kVecs];  // done: the finished blocks (RunAcc::vec_next)
    for (int j = 0; j < nv; ++j) s[j] = done[j] = AV(A(0));
    while (e + W <= end) {
      for (const int64_t e1 = e + std::min((end - e) / W, kStatsBlock) * W; e < e1; e += W)
        for (int u = 0; u < nu; ++u) {
          UT::load(x + e + u * UT::U, d);
          for (int i = 0; i < V; ++i) s[u * V + i] += d[i] - h[u * V + i];
        }
      for (int j = 0; j < nv; ++j) {
        done[j] += s[j];
        s[j] = AV(A(0));
      }
    }
    for (int64_t c = 0; c < C; ++c) mean[c] = A(0);
    fold_lanes<T, NU>(done, C, nu, mean);
  }
  for (int64_t t = e; t < end; ++t) mean[t % C] += static_cast<A>(x[t]) - static_cast<A>(shift[t % C]);
  const A inv = A(1) / static_cast<A>((end - begin) / C);
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
  AV m[Pattern<T, NU>::kVecs], s[Pattern<T, NU>::kVecs];
  pattern_vectors<T, NU>(mean, C, nu, m);
  for (int j = 0; j < nv; ++j) s[j] = AV(A(0));
  for (e = begin; e + W <= end; e += W)
    for (int u = 0; u < nu; ++u) {
      UT::load(x + e + u * UT::U, d);
      for (int i = 0; i < V; ++i) {
        const int j = u * V + i;
        const AV q = (d[i] - h[j]) - m[j];
        s[j] = at::vec::fmadd(q, q, s[j]);
      }
    }
  for (int64_t c = 0; c < C; ++c) m2[c] = A(0);
  fold_lanes<T, NU>(s, C, nu, m2);
  for (int64_t t = e; t < end; ++t) {
    const int64_t c = t % C;
    const A q = (static_cast<A>(x[t]) - static_cast<A>(shift[c])) - mean[c];
    m2[c] += q * q;
  }
}

// y = (x - mean) * scale + shift (folded: x * scale + shift, the shift folded by the caller) over
// the flat elements [begin, end) (begin a multiple of W).
template <typename T, int NU>
inline void apply_periodic(int nu_rt, const T* x, T* y, int64_t begin, int64_t end, int64_t C, const acc_t<T>* km,
                           const acc_t<T>* ks, const acc_t<T>* kb, bool folded) {
  using UT = Unit<T>;
  using A = acc_t<T>;
  using AV = typename UT::AV;
  constexpr int V = UT::V;
  const int nu = NU ? NU : nu_rt;
  const int64_t W = nu * UT::U;
  AV m[Pattern<T, NU>::kVecs], s[Pattern<T, NU>::kVecs], b[Pattern<T, NU>::kVecs], d[V];
  pattern_vectors<T, NU>(km, C, nu, m);
  pattern_vectors<T, NU>(ks, C, nu, s);
  pattern_vectors<T, NU>(kb, C, nu, b);
  int64_t e = begin;
  if (folded) {
    for (; e + W <= end; e += W)
      for (int u = 0; u < nu; ++u) {
        UT::load(x + e + u * UT::U, d);
        for (int i = 0; i < V; ++i) d[i] = at::vec::fmadd(d[i], s[u * V + i], b[u * V + i]);
        UT::store(y + e + u * UT::U, d);
      }
    for (; e < end; ++e) y[e] = static_cast<T>(static_cast<A>(x[e]) * ks[e % C] + kb[e % C]);
    return;
  }
  for (; e + W <= end; e += W)
    for (int u = 0; u < nu; ++u) {
      UT::load(x + e + u * UT::U, d);
      for (int i = 0; i < V; ++i) d[i] = at::vec::fmadd(d[i] - m[u * V + i], s[u * V + i], b[u * V + i]);
      UT::store(y + e + u * UT::U, d);
    }
  for (; e < end; ++e) {
    const int64_t c = e % C;
    y[e] = static_cast<T>(apply_one(static_cast<A>(x[e]), ApplyCoeffs<A>{km[c], ks[c], kb[c]}));
  }
}

// Per-feature (sum dy, sum dy (x - mean)) of the flat elements [begin, end) (multiples of C),
// added to s / sx.
template <typename T, int NU>
inline void grad_sums_periodic(int nu_rt, const T* dy, const T* x, int64_t begin, int64_t end, int64_t C,
                               const acc_t<T>* mean, acc_t<T>* s, acc_t<T>* sx) {
  using UT = Unit<T>;
  using A = acc_t<T>;
  using AV = typename UT::AV;
  constexpr int V = UT::V;
  const int nu = NU ? NU : nu_rt, nv = nu * V;
  const int64_t W = nu * UT::U;
  AV m[Pattern<T, NU>::kVecs], a[Pattern<T, NU>::kVecs], b[Pattern<T, NU>::kVecs], g[V], xv[V];
  pattern_vectors<T, NU>(mean, C, nu, m);
  for (int j = 0; j < nv; ++j) {
    a[j] = AV(A(0));
    b[j] = AV(A(0));
  }
  int64_t e = begin;
  for (; e + W <= end; e += W)
    for (int u = 0; u < nu; ++u) {
      UT::load(dy + e + u * UT::U, g);
      UT::load(x + e + u * UT::U, xv);
      for (int i = 0; i < V; ++i) {
        const int j = u * V + i;
        a[j] += g[i];
        b[j] = at::vec::fmadd(g[i], xv[i] - m[j], b[j]);
      }
    }
  fold_lanes<T, NU>(a, C, nu, s);
  fold_lanes<T, NU>(b, C, nu, sx);
  for (; e < end; ++e) {
    const int64_t c = e % C;
    const A gv = static_cast<A>(dy[e]);
    s[c] += gv;
    sx[c] += gv * (static_cast<A>(x[e]) - mean[c]);
  }
}

// dx = k_dy dy + k_xmu (x - mean) + k_0 over the flat elements [begin, end) (begin a multiple of W).
template <typename T, int NU>
inline void grad_input_periodic(int nu_rt, const T* dy, const T* x, T* dx, int64_t begin, int64_t end, int64_t C,
                                const acc_t<T>* gm, const acc_t<T>* kd, const acc_t<T>* kx, const acc_t<T>* k0) {
  using UT = Unit<T>;
  using A = acc_t<T>;
  using AV = typename UT::AV;
  constexpr int V = UT::V;
  const int nu = NU ? NU : nu_rt;
  const int64_t W = nu * UT::U;
  AV m[Pattern<T, NU>::kVecs], d[Pattern<T, NU>::kVecs], k[Pattern<T, NU>::kVecs], z[Pattern<T, NU>::kVecs];
  AV g[V], xv[V];
  pattern_vectors<T, NU>(gm, C, nu, m);
  pattern_vectors<T, NU>(kd, C, nu, d);
  pattern_vectors<T, NU>(kx, C, nu, k);
  pattern_vectors<T, NU>(k0, C, nu, z);
  int64_t e = begin;
  for (; e + W <= end; e += W)
    for (int u = 0; u < nu; ++u) {
      UT::load(dy + e + u * UT::U, g);
      UT::load(x + e + u * UT::U, xv);
      for (int i = 0; i < V; ++i) {
        const int j = u * V + i;
        xv[i] = at::vec::fmadd(d[j], g[i], at::vec::fmadd(k[j], xv[i] - m[j], z[j]));
      }
      UT::store(dx + e + u * UT::U, xv);
    }
  for (; e < end; ++e) {
    const int64_t c = e % C;
    const GradCoeffs<A> gc{gm[c], kd[c], kx[c], k0[c]};
    dx[e] = static_cast<T>(grad_one(static_cast<A>(dy[e]), static_cast<A>(x[e]), gc));
  }
}

// Fn<T, NU>::run(nu, args...) with NU = nu for nu = 1..4 (registers), else NU = 0 (run time).
template <typename T, template <typename, int> class Fn, typename... Args>
inline void with_periodic(int nu, Args&&... args) {
  switch (nu) {
    case 1: Fn<T, 1>::run(nu, std::forward<Args>(args)...); break;
    case 2: Fn<T, 2>::run(nu, std::forward<Args>(args)...); break;
    case 3: Fn<T, 3>::run(nu, std::forward<Args>(args)...); break;
    case 4: Fn<T, 4>::run(nu, std::forward<Args>(args)...); break;
    default: Fn<T, 0>::run(nu, std::forward<Args>(args)...); break;
  }
}
#define BN_CUDA_PERIODIC_FN(Name, fn)                                    \
  template <typename T, int NU>                                          \
  struct Name {                                                          \
    template <typename... Args>                                          \
    static void run(Args&&... args) {                                    \
      fn<T, NU>(std::forward<Args>(args)...);                            \
    }                                                                    \
  };
BN_CUDA_PERIODIC_FN(StatsPeriodic, stats_periodic)
BN_CUDA_PERIODIC_FN(ApplyPeriodic, apply_periodic)
BN_CUDA_PERIODIC_FN(GradSumsPeriodic, grad_sums_periodic)
BN_CUDA_PERIODIC_FN(GradInputPeriodic, grad_input_periodic)
#undef BN_CUDA_PERIODIC_FN

// Channels-last blocks: NP pairs of accumulator vectors (NP * K features) stay in registers while
// the rows of a partition stream past, instead of read-modify-writing per-feature arrays per row.

// Two-pass moments of the rows in `runs` (n of them) for features [c, c + NP * K), relative to the
// shift row. Part: the last k (0 < k < K) features, NP = 1, one masked step per row (the lanes past
// k load 0 and add 0; see kMaskedLoads), the results through a buffer.
template <typename T, int NP, bool Part = false>
inline void stats_cl_block(const T* x, int64_t so, const T* shift, const RowRuns& runs, int64_t n, int64_t c,
                           acc_t<T>* mean_out, acc_t<T>* m2_out, int64_t k = NP * Io<T>::K) {
  // Only the accumulators live in registers (2 * NP vectors); the shift and the block's means are
  // re-read from L1, so NP = 4 (64 fp32 features) still fits the 16 AVX registers.
  using IO = Io<T>;
  using AV = typename IO::AV;
  using A = acc_t<T>;
  static_assert(!Part || NP == 1, "a partial block is one vector pair");
  const auto load = [&](const T* p, AV& a, AV& b) {
    if constexpr (Part) {
      IO::load_rest(p, k, a, b);
    } else {
      IO::load(p, a, b);
    }
  };
  // The shift: a partial block's masked loads once, kept in registers (the AVX2 copy's vmaskmov
  // per row took 1.1x the time for 64x27x7x7 fp32); full blocks re-read it from L1.
  AV ph0, ph1;
  if constexpr (Part) load(shift + c, ph0, ph1);
  const auto load_shift = [&](int j, AV& h0, AV& h1) {
    if constexpr (Part) {
      h0 = ph0;
      h1 = ph1;
    } else {
      IO::load(shift + c + j * IO::K, h0, h1);
    }
  };
  A buf_m[Part ? IO::K : 1], buf_q[Part ? IO::K : 1];
  A* const mean = Part ? buf_m : mean_out + c;  // the block's first feature
  A* const m2 = Part ? buf_q : m2_out + c;
  AV s[2 * NP];
  for (int j = 0; j < 2 * NP; ++j) s[j] = AV(A(0));
  std::fill(mean, mean + NP * IO::K, A(0));  // the finished blocks (RunAcc::vec_next)
  const auto close_block = [&] {
    for (int j = 0; j < 2 * NP; ++j) {
      (AV::loadu(mean + j * IO::L) + s[j]).store(mean + j * IO::L);
      s[j] = AV(A(0));
    }
  };
  blocked_rows(runs, [&](int64_t r) {
    const T* row = x + r * so + c;
    for (int j = 0; j < NP; ++j) {
      AV a, b, h0, h1;
      load(row + j * IO::K, a, b);
      load_shift(j, h0, h1);
      s[2 * j] += a - h0;
      s[2 * j + 1] += b - h1;
    }
  }, close_block);
  const AV inv(A(1) / static_cast<A>(n));
  for (int j = 0; j < 2 * NP; ++j) (AV::loadu(mean + j * IO::L) * inv).store(mean + j * IO::L);
  for (int j = 0; j < 2 * NP; ++j) s[j] = AV(A(0));  // now the M2 accumulators
  for (const auto& run : runs)
    for (int64_t r = run.first; r < run.second; ++r) {
      const T* row = x + r * so + c;
      for (int j = 0; j < NP; ++j) {
        AV a, b, h0, h1, m0, m1;
        load(row + j * IO::K, a, b);
        load_shift(j, h0, h1);
        IO::load_acc(mean + j * IO::K, m0, m1);
        a = (a - h0) - m0;
        b = (b - h1) - m1;
        s[2 * j] = at::vec::fmadd(a, a, s[2 * j]);
        s[2 * j + 1] = at::vec::fmadd(b, b, s[2 * j + 1]);
      }
    }
  for (int j = 0; j < NP; ++j) {
    s[2 * j].store(m2 + j * IO::K);
    s[2 * j + 1].store(m2 + j * IO::K + IO::L);
  }
  if constexpr (Part) {
    std::copy(buf_m, buf_m + k, mean_out + c);
    std::copy(buf_q, buf_q + k, m2_out + c);
  }
}

// Row-major variant for wide rows (C >= kCpuRowMajorMinStatsC): the rows stream past once per
// pass, every feature of a column tile [c0, c1) at once, the tile's per-feature sums in arrays
// that stay in L1. The second pass reads the rows again, from cache, R at a time, loading and
// storing the sums once per R rows (see grad_sums_cl). The first pass, for 16-bit inputs whose
// rows fit one tile (up to 2048 features), reads them in memory order, a row at a time: the
// hardware prefetcher follows one sequential stream, where 4-row blocks of 512-feature tiles (4
// streams of 1 KiB, software-prefetched a block ahead) waited on memory (1024x1024 fp16 from DRAM,
// one thread: the statistics 0.40 -> 0.27 ms; the training forward on 2 threads 0.26-0.35 -> 0.20
// ms). Otherwise in 4-row blocks: a row at a time cost more for 4-byte inputs (1024x1024 fp32
// training forward 0.30 -> 0.33-0.36 ms, 256x4096 0.37 -> 0.48 ms), and half rows (a tile narrower
// than the row) lose the sequential stream. Per feature the rows are added in row order, as in the
// register blocks above, so every variant gives the same bits.
constexpr int64_t kCpuRowMajorMinStatsC = 256;  // statistics: row-major from this many features
constexpr int64_t kCpuClTile = 512;             // column tile (features); a multiple of every Io<T>::K
template <typename T>
constexpr int64_t kCpuClRowTile = sizeof(T) == 2 ? 2048 : kCpuClTile;  // the statistics' and gradient sums' tile

// Rows [r, r + R) of features [c0, c1) added into the sums; the first `pf` rows of the next
// block, [r + R, r + R + pf), are prefetched (a line at a time) along the way.
template <typename T, int R>
inline void shifted_sums_cl_rows(const T* x, int64_t so, const T* shift, int64_t r, int64_t c0, int64_t c1,
                                 acc_t<T>* sum, int64_t pf) {
  using A = acc_t<T>;
  using IO = Io<T>;
  using AV = typename IO::AV;
  int64_t c = c0;
  for (; c + IO::K <= c1; c += IO::K) {
    AV h0, h1, s0, s1;
    prefetch_block_rows(x, so, r + R, pf, c, c0);
    IO::load(shift + c, h0, h1);
    IO::load_acc(sum + c, s0, s1);
    for (int j = 0; j < R; ++j) {
      AV a, b;
      IO::load(x + (r + j) * so + c, a, b);
      s0 = s0 + (a - h0);
      s1 = s1 + (b - h1);
    }
    s0.store(sum + c);
    s1.store(sum + c + IO::L);
  }
  for (; c < c1; ++c) {
    A acc = sum[c];
    for (int j = 0; j < R; ++j) acc += static_cast<A>(x[(r + j) * so + c]) - static_cast<A>(shift[c]);
    sum[c] = acc;
  }
}

template <typename T, int R>
inline void sqdev_cl_rows(const T* x, int64_t so, const T* shift, const acc_t<T>* mean, int64_t r, int64_t c0,
                          int64_t c1, acc_t<T>* m2, const NextRows<T>& next = {}, int64_t i = 0) {
  using A = acc_t<T>;
  using IO = Io<T>;
  using AV = typename IO::AV;
  int64_t c = c0;
  for (; c + IO::K <= c1; c += IO::K) {
    AV h0, h1, m0, m1, q0, q1;
    next.prefetch(so, i, R, c - c0);
    IO::load(shift + c, h0, h1);
    IO::load_acc(mean + c, m0, m1);
    IO::load_acc(m2 + c, q0, q1);
    for (int j = 0; j < R; ++j) {
      AV a, b;
      IO::load(x + (r + j) * so + c, a, b);
      a = (a - h0) - m0;
      b = (b - h1) - m1;
      q0 = at::vec::fmadd(a, a, q0);
      q1 = at::vec::fmadd(b, b, q1);
    }
    q0.store(m2 + c);
    q1.store(m2 + c + IO::L);
  }
  for (; c < c1; ++c) {
    A acc = m2[c];
    for (int j = 0; j < R; ++j) {
      const A d = (static_cast<A>(x[(r + j) * so + c]) - static_cast<A>(shift[c])) - mean[c];
      acc += d * d;
    }
    m2[c] = acc;
  }
}

// Two-pass moments of features [c0, c1) over the rows in `runs` (n of them), relative to the
// shift row; mean / m2 point at feature 0.
template <typename T>
inline void stats_cl_rowmajor(const T* x, int64_t so, const T* shift, const RowRuns& runs, int64_t n, int64_t c0,
                              int64_t c1, acc_t<T>* mean, acc_t<T>* m2, bool row_at_a_time,
                              const NextRows<T>& next = {}) {
  using A = acc_t<T>;
  std::fill(mean + c0, mean + c1, A(0));
  std::fill(m2 + c0, m2 + c1, A(0));
  // The first pass sums blocks of about kStatsBlock rows in m2 (free until the second pass) and
  // adds each finished block into mean (see RunAcc::vec_next).
  int64_t in_block = 0;
  const auto close_block = [&] {
    for (int64_t c = c0; c < c1; ++c) {
      mean[c] += m2[c];
      m2[c] = A(0);
    }
    in_block = 0;
  };
  for (const auto& run : runs) {
    int64_t r = run.first;
    // (in blocks, the first pass prefetches the next block's rows within the run)
    if (!row_at_a_time)
      for (; r + 4 <= run.second; r += 4) {
        shifted_sums_cl_rows<T, 4>(x, so, shift, r, c0, c1, m2, std::min<int64_t>(4, run.second - r - 4));
        if ((in_block += 4) >= kStatsBlock) close_block();
      }
    for (; r < run.second; ++r) {
      shifted_sums_cl_rows<T, 1>(x, so, shift, r, c0, c1, m2, 0);
      if (++in_block >= kStatsBlock) close_block();
    }
  }
  close_block();
  const A inv = A(1) / static_cast<A>(n);
  for (int64_t c = c0; c < c1; ++c) mean[c] *= inv;
  int64_t i = 0;  // (rows before this run in the task: the next task's rows are prefetched alongside)
  for (const auto& run : runs) {
    int64_t r = run.first;
    for (; r + 4 <= run.second; r += 4, i += 4) sqdev_cl_rows<T, 4>(x, so, shift, mean, r, c0, c1, m2, next, i);
    for (; r < run.second; ++r, ++i) sqdev_cl_rows<T, 1>(x, so, shift, mean, r, c0, c1, m2, next, i);
  }
  // (a next task longer than this one: the rest of its rows, a line of each at a time)
  for (; i < next.rows; i += 4)
    for (int64_t dc = 0; dc < next.width; dc += Io<T>::K) next.prefetch(so, i, 4, dc);
}

// Column tiles of a channels-last partition: the statistics and gradient sums of wide rows run
// as P x tiles tasks (each tile's features of each partition), so a few long rows still spread
// over the threads; the sums of each (partition, feature) are the same whatever the tiling.
template <typename T>
inline int64_t cl_tiles(int64_t C) { return C >= kCpuRowMajorMinStatsC ? ceil_div(C, kCpuClRowTile<T>) : 1; }

// Channels-last: partition `part` covers some rows of (O, C) (of one ghost) for every feature.
// Means are relative to the shift row `shifts + g * C` of ghost g (cl_feature_shifts).
template <typename T>
inline void stats_cl_part(const ForwardParams& p, int64_t part, int64_t P, int64_t tile,
                          PartialArrays<acc_t<T>> out, const T* shifts) {
  using A = acc_t<T>;
  using IO = Io<T>;
  const View3& v = p.v;
  const int64_t C = v.C;
  RowRuns runs;
  const int64_t g = cl_partition(v, part, P, runs);
  int64_t rows = 0;
  for (const auto& run : runs) rows += run.second - run.first;
  A* mean = out.mean + part * C;
  A* m2 = out.m2 + part * C;
  A* cnt = out.n + part * C;
  const T* x = static_cast<const T*>(p.x);
  const A n = static_cast<A>(rows);
  // Features [c0, c1) of this task: tile `tile` of cl_tiles<T>(C) (all of them below the row-major width).
  const int64_t c0 = std::min(C, tile * kCpuClRowTile<T>);
  const int64_t c1 = C >= kCpuRowMajorMinStatsC ? std::min(C, c0 + kCpuClRowTile<T>) : C;
  std::fill(cnt + c0, cnt + c1, n);
  if (rows == 0) {
    std::fill(mean + c0, mean + c1, A(0));
    std::fill(m2 + c0, m2 + c1, A(0));
    return;
  }
  const T* shift = shifts + g * C;  // (cl_feature_shifts: ghost g's)
  if (const int nu = periodic_units_stats<T>(v, p.x_so == C)) {  // (one run: no ghosts)
    with_periodic<T, StatsPeriodic>(nu, x, runs[0].first * C, runs[0].second * C, C, shift, mean, m2);
    return;
  }
  // Measured on an AVX2 CPU: register blocks win for narrow rows (C = 64: 0.88 vs 1.14 ms),
  // row-major for wider ones (C = 256 .. 8192).
  if (C >= kCpuRowMajorMinStatsC) {
    // The next task of this thread (most likely; at a chunk's end, another thread's first): the
    // next tile of these rows, else the first tile of the next partition. Without ghosts only
    // (one run of rows each).
    NextRows<T> next;
    if (v.G == 1 && runs.size() == 1) {
      if (tile + 1 < cl_tiles<T>(C)) {
        next = {x + runs[0].first * p.x_so + c1, rows, std::min(C, c1 + kCpuClRowTile<T>) - c1};
      } else if (part + 1 < P) {
        const auto [r0, r1] = cl_ghost_rows(v, part + 1, P);  // (without ghosts: physical rows)
        next = {x + r0 * p.x_so, r1 - r0, std::min(C, kCpuClRowTile<T>)};
      }
    }
    stats_cl_rowmajor<T>(x, p.x_so, shift, runs, rows, c0, c1, mean, m2, sizeof(T) == 2 && c0 == 0 && c1 == C, next);
    return;
  }
  int64_t c = 0;
  for (; c + 4 * IO::K <= C; c += 4 * IO::K) stats_cl_block<T, 4>(x, p.x_so, shift, runs, rows, c, mean, m2);
  for (; c + 2 * IO::K <= C; c += 2 * IO::K) stats_cl_block<T, 2>(x, p.x_so, shift, runs, rows, c, mean, m2);
  for (; c + IO::K <= C; c += IO::K) stats_cl_block<T, 1>(x, p.x_so, shift, runs, rows, c, mean, m2);
  if (kMaskedLoads<T> && c < C) {
    stats_cl_block<T, 1, true>(x, p.x_so, shift, runs, rows, c, mean, m2, C - c);
    return;
  }
  for (; c < C; ++c) {  // the last < K features: scalar two-pass down the column
    const A h = static_cast<A>(shift[c]);
    A sum = A(0), block = A(0);
    blocked_rows(runs, [&](int64_t r) { block += static_cast<A>(x[r * p.x_so + c]) - h; }, [&] {
      sum += block;
      block = A(0);
    });
    const A dm = sum / n;
    A q = A(0);
    for (const auto& run : runs)
      for (int64_t r = run.first; r < run.second; ++r) {
        const A d = (static_cast<A>(x[r * p.x_so + c]) - h) - dm;
        q += d * d;
      }
    mean[c] = dm;
    m2[c] = q;
  }
}

// Channels-last partials: merge each group's rows into its first row (group = the P / G
// partitions of one ghost), in row order. Every feature of a row has the same count, so Chan's
// factors are scalars and the loop over features vectorizes; walking rows (not features) keeps
// the accesses sequential.
template <typename A>
inline void merge_cl_partials(PartialArrays<A> part, int64_t P, int64_t C, int64_t G) {
  const int64_t per = P / G;
  at::parallel_for(0, G * C, std::max<int64_t>(64, kCpuChunkElems / std::max<int64_t>(1, per)), [&](int64_t f0, int64_t f1) {
    for (int64_t g = f0 / C; g * C < f1; ++g) {
      const int64_t c0 = std::max(f0, g * C) - g * C, c1 = std::min(f1, (g + 1) * C) - g * C;
      A* ma = part.mean + g * per * C;
      A* m2a = part.m2 + g * per * C;
      A* na_row = part.n + g * per * C;
      for (int64_t q = 1; q < per; ++q) {
        const int64_t row = (g * per + q) * C;
        const A nb = part.n[row + c0];
        if (nb == A(0)) continue;
        const A na = na_row[c0];
        const A n = na + nb, f = nb / n, w = na * f;
        const A* mb = part.mean + row;
        const A* m2b = part.m2 + row;
        for (int64_t c = c0; c < c1; ++c) {
          const A d = mb[c] - ma[c];
          ma[c] += d * f;
          m2a[c] += m2b[c] + d * d * w;
          na_row[c] = n;
        }
      }
    }
  });
}

// Channels-last partial sums: each group's rows added into its first row, in row order per
// feature. Walking rows (contiguous, vectorizable) rather than features: a per-feature walk down
// the rows strides by C, and with the two arrays possibly aliasing, every add was a load and a
// store through memory.
template <typename A>
inline void sum_cl_partials(A* a, A* b, int64_t P, int64_t C, int64_t G) {
  const int64_t per = P / G;
  at::parallel_for(0, G * C, std::max<int64_t>(64, kCpuChunkElems / std::max<int64_t>(1, per)), [&](int64_t f0, int64_t f1) {
    for (int64_t g = f0 / C; g * C < f1; ++g) {
      const int64_t c0 = std::max(f0, g * C) - g * C, c1 = std::min(f1, (g + 1) * C) - g * C;
      A* __restrict__ ta = a + g * per * C;
      A* __restrict__ tb = b + g * per * C;
      for (int64_t q = 1; q < per; ++q) {
        const A* __restrict__ ra = ta + q * C;
        const A* __restrict__ rb = tb + q * C;
        for (int64_t c = c0; c < c1; ++c) {
          ta[c] += ra[c];
          tb[c] += rb[c];
        }
      }
    }
  });
}

// Index of feature f's merged partial: channels-last (row-merged) f = g * C + c -> row g * P / G.
inline int64_t merged_cl_index(const View3& v, int64_t P, int64_t f) {
  return (f / v.C) * (P / v.G) * v.C + f % v.C;
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename A>
struct CoeffArrays {
  A* mean;
  A* scale;
  A* shift;
};

// Whether y = x * scale + (shift - mean * scale) is as accurate as (x - mean) * scale + shift for
// every feature: its rounding error, relative to the output, is about eps * |mean| * invstd, so it
// is used only when |mean| <= kFoldedMaxRatio * std for all features (then within a few ulps).
constexpr double kFoldedMaxRatio = 8.0;

template <typename A>
inline bool folds_exactly(A mean, A invstd) {
  return std::abs(mean) * invstd <= A(kFoldedMaxRatio);  // (false for NaN)
}
template <typename A>
inline bool folding_is_exact(const A* __restrict__ mean, const A* __restrict__ invstd, int64_t F) {
  // An OR over every feature rather than an early exit, so the loop vectorizes.
  int bad = 0;
  for (int64_t f = 0; f < F; ++f) bad |= !folds_exactly(mean[f], invstd[f]);
  return bad == 0;
}

// One channels-first run (a row of I elements of one feature) through the apply step, folded
// (see folding_is_exact) or not.
template <typename T>
inline void apply_cf_run(const T* x, T* y, int64_t n, const ApplyCoeffs<acc_t<T>>& k, bool folded) {
  if (folded)
    apply_run<T, true>(x, y, n, acc_t<T>(0), k.scale, k.shift - k.mean * k.scale);
  else
    apply_run(x, y, n, k.mean, k.scale, k.shift);
}

// Dense channels-first inputs with short rows: the 4 and 9 elements of 2x2 and 3x3 maps (shorter
// than a vector step of K = 16 fp32 / 16-bit elements, so every element went through scalar
// code), or rows whose scalar tail is a large part (5x5: 16 + 9). Each sample (outer row) of such
// an input is one contiguous run of W = C * I elements, so it is normalized as a channels-last row
// of W "features" whose coefficients, each feature's repeated I times, are expanded once per
// call, and its statistics are taken as those of W channels-last columns, then merged I at a time
// (forward_train); large float32 / float64 inputs keep the per-feature element-wise steps (see
// cf_expand_elementwise). Up to kCfExpandMaxW elements per sample: beyond, the expanded
// coefficients would not stay in cache. (One thread, in cache, before this path, against torch:
// 64x512x2x2 fp16 / bf16 inference 0.61x / 0.73x, training forward 0.85x / 0.86x.)
constexpr int64_t kCfExpandMaxW = 16384;

template <typename T>
inline bool cf_short_rows(const View3& v) {
  using IO = Io<T>;
  const int64_t tail = v.I % IO::K;  // (after the K-element steps)
  if (tail == 0) return false;
  // Rows that the per-feature runs vectorize in part (a K-element step, or AVX-512's L-element
  // half step) need 4 samples: with fewer, the per-feature path won (one thread, 2 and 3 samples of
  // 5 .. 300 4x4 and 5x5 maps, fp32: 0.62x-0.98x the expanded path's time; bf16 4x4 alike), except
  // for 16-bit rows with a scalar remainder, converted element by element there (bf16 5x5 maps up
  // to 1.5x the time: 3x300x5x5 backward 31 -> 47 us), which keep the expanded path.
  const bool vectorized = v.I >= (IO::kHalfStep ? IO::L : IO::K);
  // Rows shorter than a step that masked_tail takes as one masked step, 3/4 of a vector or longer:
  // per feature for 1-2 samples (2x1000x15 fp32: 0.82x / 0.76x / 0.71x the expanded path's time,
  // training forward / backward / inference; bf16 0.72x-0.82x; 3 samples 0.85x-1.01x, 4 samples
  // 0.93x-1.20x; bf16 rows of 9 with 2 samples 1.04x-1.07x).
  if (!vectorized) return !(v.O <= 2 && v.I * 4 >= 3 * IO::L && masked_tail<T, true>(v.I, v.I));
  const int64_t scalar = IO::kHalfStep ? tail % IO::L : tail;  // (left to scalar code)
  // (a remainder that masked_tail takes as a vector step instead: with it 2-3 samples of bf16 5x5
  // and 4x5 maps ran 0.66x-0.92x the expanded path's time, training forward and backward, and 4
  // samples of float32 rows of 16 + r, r = 9-15, 0.73x-0.94x (r = 8 within 2%, r = 4 1.04x-1.11x;
  // bf16 5x5 4 samples 0.90x / 1.04x / 1.14x, 5-6 float32 samples 0.89x-1.08x))
  const bool masked = scalar != 0 && masked_tail<T, true>(v.I, scalar);
  if (v.O < 4) return !std::is_same_v<T, acc_t<T>> && scalar != 0 && !masked && v.I < IO::K;
  if (v.I < IO::K) return !(std::is_same_v<T, float> && v.O == 4 && masked && scalar > IO::L / 2);
  if (tail * 4 < v.I) return false;
  // A long tail. Where the runs take a half step that leaves less than a quarter of the row to
  // scalar code (AVX-512's 7x7 maps: 32 + 16 + 1), from 32 samples: below, the per-feature path
  // won (one thread, 4x100x7x7 .. 16x64x7x7 fp32 / bf16 / fp16: training forward 0.50x-0.85x the
  // expanded path's time, backward 0.64x-1.08x, inference 0.59x-1.00x); above, the expanded
  // path's inference and backward (32x128x7x7 fp32: 1.10x / 1.20x with the per-feature path) made
  // up for its training forward (0.76x). A longer remainder from 4 samples, or from 16 where
  // masked_tail takes it (rows of 32 + 12 and 32 + 15 fp32 / bf16 elements, 8 samples: 0.64x-0.94x
  // the expanded path's time; 16 samples: training forward 0.76x-0.90x, backward 0.84x-1.19x).
  return v.O >= (scalar * 4 < v.I ? 32 : masked ? 16 : 4);  // (without half steps scalar == tail)
}
// Whether a channels-first view with strides (so, sc) for each of its tensors takes the expanded
// path: short rows, no ghosts, every tensor dense.
template <typename T>
inline bool cf_expand_ok(const View3& v, std::initializer_list<std::pair<int64_t, int64_t>> strides) {
  if (v.channels_last || v.G != 1 || v.O < 1 || v.C < 1 || !cf_short_rows<T>(v)) return false;
  const int64_t W = v.C * v.I;
  if (W > kCfExpandMaxW) return false;
  for (const auto& st : strides)
    if (st.first != W || st.second != v.I) return false;
  return true;
}

// Columns per tile of the expanded element-wise steps (apply, input gradient): one channels-last
// pass over the rows per tile of W, so that the tile's 2-4 coefficient arrays stay in L1 while the
// rows stream past (float32 32x512x3x3 .. 16x1800x3x3 inference with whole rows of W = 4608 ..
// 16200: 0.72x-0.76x the speed of 1024-column tiles, the coefficients evicted by each row).
constexpr int64_t kCfExpandTile = 1024;

// Whether the element-wise steps (apply, input gradient) of a cf_expand_ok view take the expanded
// column tiles too. Not for float32 / float64 rows that the per-feature runs vectorize, when a
// sample's W = C * I elements are not a whole number of cache lines and the input passes
// kCfExpandMisalignedMaxBytes: there the tiles' walk (O rows of each tile in turn) measured
// 1.1x-1.4x the time of the per-feature walk (the rows in memory order), e.g. one thread, AVX-512,
// fp32 inference 64x100x7x7 96 -> 78 us, 32x300x5x5 74 -> 59 us, backward 64x300x5x5 418 -> 379
// us; AVX2, 32x300x5x5 inference 87 -> 61 us. Aligned rows (48x256x5x5, 64x256x7x7) and inputs
// below about 3/4 MiB (24x300x5x5, 16x200x7x7: both walks within 2%, this machine's L2 is 2 MiB)
// kept the tiles. The statistics and gradient sums stay expanded (their per-feature runs measured
// 1.1x-1.2x slower there), and 16-bit rows stay expanded throughout (the per-feature runs then
// converted their remainders element by element: bf16 64x300x5x5 inference 3.5x the time; measured
// before masked_tail, not since).
constexpr int64_t kCfExpandMisalignedMaxBytes = 768 * 1024;
template <typename T>
inline bool cf_expand_elementwise(const View3& v) {
  if constexpr (!std::is_same_v<T, acc_t<T>>) {
    return true;
  } else {
    const int64_t row = v.C * v.I * static_cast<int64_t>(sizeof(T));
    return v.I < Io<T>::kVecRun || row % kCacheLine == 0 || v.O * row <= kCfExpandMisalignedMaxBytes;
  }
}

// A cf_expand_ok view as O channels-last rows of W = C * I "features" (and strides W, 1).
inline View3 rows_as_features(const View3& v, int64_t width = 0) {
  View3 e;
  e.O = v.O;
  e.C = width ? width : v.C * v.I;  // (width: a tile of the W columns)
  e.channels_last = true;
  return e;
}
// Each feature's value repeated over its I elements: dst[c * I + i] = src[c].
template <typename A>
inline void expand_features(const A* src, A* dst, int64_t C, int64_t I) {
  for (int64_t c = 0; c < C; ++c) std::fill(dst + c * I, dst + (c + 1) * I, src[c]);
}

template <typename T>
inline void apply_all(const ForwardParams& p, CoeffArrays<acc_t<T>> k, bool folded = false) {
  using A = acc_t<T>;
  using IO = Io<T>;
  using AV = typename IO::AV;
  const View3& v = p.v;
  if (cf_expand_ok<T>(v, {{p.x_so, p.x_sc}, {p.y_so, p.y_sc}}) && cf_expand_elementwise<T>(v)) {
    // Short dense channels-first rows: the channels-last apply over rows of W = C * I with each
    // feature's coefficients repeated I times (the same arithmetic per element).
    const int64_t W = v.C * v.I;
    const auto e = scratch<A>(3 * W);
    const CoeffArrays<A> ke{e.get(), e.get() + W, e.get() + 2 * W};
    expand_features(k.mean, ke.mean, v.C, v.I);
    expand_features(k.scale, ke.scale, v.C, v.I);
    expand_features(k.shift, ke.shift, v.C, v.I);
    ForwardParams pe = p;
    pe.x_so = pe.y_so = W;
    pe.x_sc = pe.y_sc = 1;
    for (int64_t t0 = 0; t0 < W; t0 += kCfExpandTile) {  // (one tile when W fits: then dense, see periodic_units)
      const int64_t t1 = std::min(W, t0 + kCfExpandTile);
      pe.v = rows_as_features(v, t1 - t0);
      pe.x = static_cast<const T*>(p.x) + t0;
      pe.y = static_cast<T*>(p.y) + t0;
      apply_all<T>(pe, CoeffArrays<A>{ke.mean + t0, ke.scale + t0, ke.shift + t0}, folded);
    }
    return;
  }
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int nu = periodic_units<T>(v, p.x_so == v.C && p.y_so == v.C);
  if (folded) {
    // y = x * scale + shift', one subtract fewer per vector (see folding_is_exact), the shift
    // folded once per feature rather than once per row.
    const int64_t F = v.features();
    for (int64_t f = 0; f < F; ++f) k.shift[f] = k.shift[f] - k.mean[f] * k.scale[f];
  }
  if (nu) {  // narrow dense rows, no ghosts: one flat run (see periodic_units)
    const int64_t W = nu * Unit<T>::U, N = v.O * v.C;
    at::parallel_for(0, ceil_div(N, W), std::max<int64_t>(1, kCpuChunkElems / W), [&](int64_t begin, int64_t end) {
      with_periodic<T, ApplyPeriodic>(nu, x, y, begin * W, std::min(N, end * W), v.C, k.mean, k.scale, k.shift,
                                      folded);
    });
    return;
  }
  // Channels-last rows: the coefficients in Io::load_lanes' order where it is not memory order
  // (kPermutedLanes; bf16 vs torch, 2 threads, AMD EPYC Zen 3: 1024x1024 inference 0.98-1.02x ->
  // 1.10-1.25x, 8x1000x7x7 NHWC 0.96-1.00x -> 1.05-1.22x; the backward's grad_input_all alike:
  // 1024x1024 1.42-1.70x -> 1.81-2.25x)
  std::unique_ptr<A[]> lanes;
  if constexpr (kPermutedLanes<T>) {
    if (v.channels_last && v.C >= IO::K) {
      const int64_t F = v.features();
      lanes = scratch<A>(3 * F);
      to_lane_order<T>(k.mean, lanes.get(), v.G, v.C);
      to_lane_order<T>(k.scale, lanes.get() + F, v.G, v.C);
      to_lane_order<T>(k.shift, lanes.get() + 2 * F, v.G, v.C);
      k = CoeffArrays<A>{lanes.get(), lanes.get() + F, lanes.get() + 2 * F};
    }
  }
  if (folded && v.channels_last) {
    const int64_t C = v.C;
    at::parallel_for(0, v.O, std::max<int64_t>(1, kCpuChunkElems / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* row = x + r * p.x_so;
        T* out = y + r * p.y_so;
        const int64_t f0 = ghost_of_row(v, r) * C;
        const A* ks = k.scale + f0;
        const A* kb = k.shift + f0;
        int64_t c = 0;
        for (; c + IO::K <= C; c += IO::K) {
          AV a, b, s0, s1, b0, b1;
          IO::load_lanes(row + c, a, b);
          IO::load_acc(ks + c, s0, s1);
          IO::load_acc(kb + c, b0, b1);
          IO::store_lanes(out + c, at::vec::fmadd(a, s0, b0), at::vec::fmadd(b, s1, b1));
        }
        for (; c < C; ++c) out[c] = static_cast<T>(static_cast<A>(row[c]) * ks[c] + kb[c]);
      }
    });
    return;
  }
  if (!v.channels_last) {
    const int64_t rows = v.O * v.C;
    const int64_t grain = std::max<int64_t>(1, kCpuChunkElems / std::max<int64_t>(v.I, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      // ((o, c) stepped along instead of a 64-bit r / C and r % C per row; the gain is within this
      // VM's noise, a few percent at most on 49- to 196-element rows)
      for (int64_t r = begin, o = begin / v.C, c = begin % v.C; r < end; ++r) {
        const T* xr = x + o * p.x_so + c * p.x_sc;
        T* yr = y + o * p.y_so + c * p.y_sc;
        // (a zero mean: the shift needs no folding, (x - 0) * scale + shift == x * scale + shift,
        // and forward_infer pre-folds per feature that way when not all of them fold)
        if (folded || k.mean[c] == A(0))
          apply_run<T, true>(xr, yr, v.I, A(0), k.scale[c], k.shift[c]);
        else
          apply_run(xr, yr, v.I, k.mean[c], k.scale[c], k.shift[c]);
        if (++c == v.C) c = 0, ++o;
      }
    });
    return;
  }
  const int64_t C = v.C;
  const int64_t grain = std::max<int64_t>(1, kCpuChunkElems / C);
  at::parallel_for(0, v.O, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * p.x_so;
      T* out = y + r * p.y_so;
      const int64_t f0 = ghost_of_row(v, r) * C;  // this row's ghost's coefficients
      const A* km = k.mean + f0;
      const A* ks = k.scale + f0;
      const A* kb = k.shift + f0;
      int64_t c = 0;
      for (; c + IO::K <= C; c += IO::K) {
        AV a, b, m0, m1, s0, s1, b0, b1;
        IO::load_lanes(row + c, a, b);
        IO::load_acc(km + c, m0, m1);
        IO::load_acc(ks + c, s0, s1);
        IO::load_acc(kb + c, b0, b1);
        IO::store_lanes(out + c, at::vec::fmadd(a - m0, s0, b0), at::vec::fmadd(b - m1, s1, b1));
      }
      for (; c < C; ++c) {
        const ApplyCoeffs<A> kc{km[c], ks[c], kb[c]};
        out[c] = static_cast<T>(apply_one(static_cast<A>(row[c]), kc));
      }
    }
  });
}

// Finalize of the row-merged channels-last partials (no mask): each ghost's merged state is its
// first partition row, and every feature of a row has the same count n. The per-feature maths of
// forward_train's general finalize (the shared epilogue helpers, the same operations in the same
// order, so the same bits), split into loops over consecutive features that the compiler
// vectorizes: with n uniform every branch of the epilogue is loop-invariant. The general loop's
// two integer divisions per feature for its indices, and its scalar divisions and square root,
// cost ~10 us for 1000 features.
template <typename T>
void finalize_cl_merged(const ForwardParams& p, PartialArrays<acc_t<T>> part, CoeffArrays<acc_t<T>> k,
                        const T* shifts) {
  using A = acc_t<T>;
  const View3& v = p.v;
  const int64_t C = v.C, per = p.partitions / v.G;
  const A eps = static_cast<A>(p.eps), mom = static_cast<A>(p.momentum);
  for (int64_t g = 0; g < v.G; ++g) {
    const int64_t row = g * per * C, f0 = g * C;
    const T* __restrict__ shift = shifts + g * C;
    const A* __restrict__ pm = part.mean + row;
    const A* __restrict__ pm2 = part.m2 + row;
    const A n = part.n[row];
    // (n == 0: the partials are 0, as welford_merge's empty state, and biased_var is 0.)
    A* __restrict__ sm = static_cast<A*>(p.save_mean) + f0;
    A* __restrict__ si = static_cast<A*>(p.save_invstd) + f0;
    for (int64_t c = 0; c < C; ++c) sm[c] = static_cast<A>(shift[c]) + pm[c];
    for (int64_t c = 0; c < C; ++c) si[c] = invstd_of(biased_var(WelfordState<A>{A(0), pm2[c], n}), eps);
    if (p.running_mean) {
      A* __restrict__ rm = static_cast<A*>(p.running_mean) + f0;
      for (int64_t c = 0; c < C; ++c) rm[c] = running_update(rm[c], sm[c], mom);
    }
    if (p.running_var) {
      A* __restrict__ rv = static_cast<A*>(p.running_var) + f0;
      if (p.unbiased_running_var) {
        for (int64_t c = 0; c < C; ++c)
          rv[c] = running_update(rv[c], unbiased_var(WelfordState<A>{A(0), pm2[c], n}), mom);
      } else {
        for (int64_t c = 0; c < C; ++c)
          rv[c] = running_update(rv[c], biased_var(WelfordState<A>{A(0), pm2[c], n}), mom);
      }
    }
    const A* __restrict__ w = p.weight ? static_cast<const A*>(p.weight) + f0 : nullptr;
    const A* __restrict__ b = p.bias ? static_cast<const A*>(p.bias) + f0 : nullptr;
    A* __restrict__ km = k.mean + f0;
    A* __restrict__ ks = k.scale + f0;
    A* __restrict__ kb = k.shift + f0;
    for (int64_t c = 0; c < C; ++c) km[c] = sm[c];
    if (w) {
      for (int64_t c = 0; c < C; ++c) ks[c] = apply_coeffs(sm[c], si[c], w, b, c).scale;
    } else {
      for (int64_t c = 0; c < C; ++c) ks[c] = si[c];
    }
    if (b) {
      for (int64_t c = 0; c < C; ++c) kb[c] = b[c];
    } else {
      for (int64_t c = 0; c < C; ++c) kb[c] = A(0);
    }
  }
}

template <typename T>
void forward_train(const ForwardParams& p) {
  using A = acc_t<T>;
  const View3& v = p.v;
  const int64_t C = v.C, P = p.partitions, F = v.features();
  PartialArrays<A> part = partial_arrays<A>(p.workspace, P, C);
  A* coeff_base = static_cast<A*>(p.workspace) + 3 * P * C;
  CoeffArrays<A> k{coeff_base, coeff_base + F, coeff_base + 2 * F};
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  A* rm = static_cast<A*>(p.running_mean);
  A* rv = static_cast<A*>(p.running_var);
  A* sm = static_cast<A*>(p.save_mean);
  A* si = static_cast<A*>(p.save_invstd);
  const A eps = static_cast<A>(p.eps), mom = static_cast<A>(p.momentum);
  // Feature c's merged state (its mean absolute) -> saved and running statistics, apply coefficients.
  const auto finalize_feature = [&](const WelfordState<A>& st, int64_t c) {
    const A var = biased_var(st);
    const A invstd = invstd_of(var, eps);
    sm[c] = st.mean;
    si[c] = invstd;
    if (rm) rm[c] = running_update(rm[c], st.mean, mom);
    if (rv) rv[c] = running_update(rv[c], p.unbiased_running_var ? unbiased_var(st) : var, mom);
    return apply_coeffs(st.mean, invstd, w, b, c);
  };

  if (!p.mask && !p.stat_mean && cf_expand_ok<T>(v, {{p.x_so, p.x_sc}, {p.y_so, p.y_sc}})) {
    // Short dense channels-first rows (see cf_expand_ok): the statistics of the W = C * I
    // channels-last columns (x viewed as O rows of W), each column's state relative to its own
    // shift (the mean of its first ceil(16 / I) rows: cl_feature_shifts of the view), merged per
    // feature in column order after rebasing them on the feature's shift (feature_shift, as
    // everywhere): the partial means stay small when |mean| >> std. Then the expanded apply.
    // (docs/cpu-kernels.md: with each column's first element as its shift, 64x17x2x2 fp32 means
    // were up to 2.1 units off, 0.9 now; as far off with the feature's shift for every column,
    // for rows of 4 the mean of one row; 0.7 with 16 rows a column, which cost 32x256x3x3 fp16's
    // training forward 37.5 -> 41.7 us, against 38.8 now.)
    const int64_t W = C * v.I;
    ForwardParams pe = p;
    pe.v = rows_as_features(v);
    pe.x_so = pe.y_so = W;
    pe.x_sc = pe.y_sc = 1;
    const int64_t Pe = plan_partitions_cpu(pe.v), Te = cl_tiles<T>(W);
    const auto ws = scratch<A>(3 * Pe * W);
    const PartialArrays<A> cols = partial_arrays<A>(ws.get(), Pe, W);
    const std::vector<T> col_shift = cl_feature_shifts<T>(pe, ceil_div(kShiftPick<T>, v.I));
    at::parallel_for(0, Pe * Te, grain_for(cl_part_elems(pe.v, Pe) / Te), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) stats_cl_part<T>(pe, t / Te, Pe, t % Te, cols, col_shift.data());
    });
    merge_cl_partials(cols, Pe, W, 1);  // each column's state: row 0 of the partials
    at::parallel_for(0, C, grain_for(8 * v.I), [&](int64_t begin, int64_t end) {
      // (the shifts first, in k.mean until the coefficients replace them: the picks of different
      // features overlap, where one before each feature's merge sat on its critical path)
      for (int64_t c = begin; c < end; ++c) k.mean[c] = feature_shift<T>(p, c);
      for (int64_t c = begin; c < end; ++c) {
        const A shift = k.mean[c];
        WelfordState<A> st = welford_empty<A>();
        for (int64_t j = c * v.I; j < (c + 1) * v.I; ++j)
          st = welford_merge(st, WelfordState<A>{(static_cast<A>(col_shift[j]) - shift) + cols.mean[j], cols.m2[j], cols.n[j]});
        st.mean = shift + st.mean;
        const ApplyCoeffs<A> kc = finalize_feature(st, c);
        k.mean[c] = kc.mean;
        k.scale[c] = kc.scale;
        k.shift[c] = kc.shift;
      }
    });
    apply_all<T>(p, k, folding_is_exact(sm, si, F));
    return;
  }

  // Channels-first, each feature one partition (its O x I elements fit a cache-sized chunk; no
  // mask, no ghosts, not the staged batch_stats): one task per feature computes its statistics,
  // finalizes them and applies them back to back, so the apply step reads x from cache instead
  // of memory, as the backward's fused path does. The statistics and coefficients of the
  // two-phase path below, in the same order (a merge with the empty state returns the partial);
  // the folded apply (see folding_is_exact) is decided per feature rather than for all at once.
  // Measured on 2 AVX2 threads, inputs from memory, op level: fp32 8x64x56x56 1.02 -> 0.79 ms,
  // 8x256x14x14 0.220 -> 0.184 ms, 8x17x28x28 73 -> 65 us; fp16 / bf16 from 0.95x (8x256x14x14
  // bf16) to 1.19x (8x1000x7x7 bf16, 2x32x16x16x16 fp16).
  if (!v.channels_last && P == 1 && !p.mask && !p.stat_mean && v.G == 1) {
    T* y = static_cast<T*>(p.y);
    const T* x = static_cast<const T*>(p.x);
    const int64_t dist = cf_prefetch_distance<T>(v, v.O);
    at::parallel_for(0, C, grain_for(v.O * v.I), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) k.mean[c] = feature_shift<T>(p, c);  // (as above)
      for (int64_t c = begin; c < end; ++c) {
        const A shift = k.mean[c];
        WelfordState<A> st = stats_cf_part<T>(p, c, 0, shift);
        st.mean = shift + st.mean;
        const ApplyCoeffs<A> kc = finalize_feature(st, c);
        const bool folded = folds_exactly(sm[c], si[c]);
        const CfNextRows<T> next = cf_task_rows(x, p.x_so, p.x_sc, v, 1, v.O, c + dist, end);
        for (int64_t r = 0; r < v.O; ++r) {
          apply_cf_run(x + r * p.x_so + c * p.x_sc, y + r * p.y_so + c * p.y_sc, v.I, kc, folded);
          next.prefetch(r);
        }
      }
    });
    return;
  }

  // Per-feature shifts: channels-first and masked ones in k.mean until the finalize below
  // overwrites it (same index); channels-last ones as rows of the input type.
  std::vector<T> cl_shift;
  if (p.mask) {
    masked_feature_shifts<T>(p, k.mean);
  } else if (v.channels_last) {
    cl_shift = cl_feature_shifts<T>(p);
  } else {
    at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) k.mean[c] = feature_shift<T>(p, c);
    });
  }

  if (!v.channels_last) {
    const T* x = static_cast<const T*>(p.x);
    const int64_t per = cf_rows_per_part(v), dist = cf_prefetch_distance<T>(v, per);
    at::parallel_for(0, C * P, grain_for(cf_part_elems(v)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c = t / P, q = t % P;
        const WelfordState<A> st =
            p.mask ? masked_stats_cf_part<T>(p, c, q, k.mean[c])
                   : stats_cf_part<T>(p, c, q, k.mean[c], cf_task_rows(x, p.x_so, p.x_sc, v, P, per, t + dist, end));
        part.mean[t] = st.mean;
        part.m2[t] = st.m2;
        part.n[t] = st.n;
      }
    });
  } else {
    const int64_t T_ = p.mask ? 1 : cl_tiles<T>(C);  // (masked partitions: one task each)
    at::parallel_for(0, P * T_, grain_for(cl_part_elems(v, P) / T_), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (p.mask) {
          masked_stats_cl_part<T>(p, t, P, part, k.mean);
        } else {
          stats_cl_part<T>(p, t / T_, P, t % T_, part, cl_shift.data());
        }
      }
    });
  }

  // Finalize: merge partials per feature in partition order.
  // Channels-last partials share one count per row, except under a mask: merge those per feature.
  const bool row_merged = v.channels_last && !p.mask;
  if (row_merged) merge_cl_partials(part, P, C, v.G);  // each ghost's merged state: its first row
  if (row_merged && !p.stat_mean) {
    finalize_cl_merged<T>(p, part, k, cl_shift.data());
    apply_all<T>(p, k, folding_is_exact(sm, si, F));
    return;
  }
  const int64_t merge_rows = row_merged ? 1 : P;
  at::parallel_for(0, F, grain_for(8 * merge_rows), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {  // c: feature index, ghost-major with ghosts
      WelfordState<A> st = welford_empty<A>();
      for (int64_t q = 0; q < merge_rows; ++q) {
        const int64_t idx = row_merged ? merged_cl_index(v, P, c) : (v.channels_last ? q * C + c : c * P + q);
        st = welford_merge(st, WelfordState<A>{part.mean[idx], part.m2[idx], part.n[idx]});
      }
      // Partials are relative to the shift; a masked feature with no unmasked element gets mean
      // 0, not its padding.
      const A shift = v.channels_last && !p.mask ? static_cast<A>(cl_shift[c]) : k.mean[c];
      st.mean = p.mask && st.n == A(0) ? A(0) : shift + st.mean;
      if (p.stat_mean) {  // staged batch_stats: hand the merged local state to the caller
        static_cast<A*>(p.stat_mean)[c] = st.mean;
        static_cast<A*>(p.stat_m2)[c] = st.m2;
        static_cast<A*>(p.stat_count)[c] = st.n;
        continue;
      }
      const ApplyCoeffs<A> kc = finalize_feature(st, c);
      k.mean[c] = kc.mean;
      k.scale[c] = kc.scale;
      k.shift[c] = kc.shift;
    }
  });
  if (!p.stat_mean) apply_all<T>(p, k, folding_is_exact(sm, si, F));
}

template <typename T>
void forward_infer(const ForwardParams& p) {
  using A = acc_t<T>;
  const int64_t C = p.v.features();  // with ghosts (staged normalize): one set per (ghost, feature)
  A* base = static_cast<A*>(p.workspace);
  CoeffArrays<A> k{base, base + C, base + 2 * C};
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  const A* rm = static_cast<const A*>(p.running_mean);
  const A* rv = static_cast<const A*>(p.running_var);
  const A eps = static_cast<A>(p.eps);
  const A* gm = static_cast<const A*>(p.given_mean);  // staged normalize: statistics given
  const A* gi = static_cast<const A*>(p.given_invstd);
  // The coefficients in loops over consecutive features that vectorize (the scalar loop paid a
  // division and a square root per feature): the statistics' invstd into k.scale first, then the
  // same apply_coeffs as always, so the same bits.
  A* __restrict__ km = k.mean;
  A* __restrict__ ks = k.scale;
  A* __restrict__ kb = k.shift;
  if (gm) {
    for (int64_t c = 0; c < C; ++c) km[c] = gm[c];
    for (int64_t c = 0; c < C; ++c) ks[c] = gi[c];
  } else {
    for (int64_t c = 0; c < C; ++c) km[c] = rm[c];
    for (int64_t c = 0; c < C; ++c) ks[c] = invstd_of(rv[c], eps);
  }
  const bool folded = folding_is_exact(km, ks, C);
  // Not every feature folds: channels-first rows fold those that do (a row's features are one),
  // as the fused training forward does: each of them gets mean 0 and the folded shift (see
  // apply_all). One feature with |mean| > 8 std otherwise cost every row its subtract (one
  // thread, in cache, one such feature: 2x32x16x16x16 fp16 33.0 -> 29.0 us).
  const bool per_feature = !folded && !p.v.channels_last;
  if (per_feature) {
    for (int64_t c = 0; c < C; ++c) kb[c] = folds_exactly(km[c], ks[c]) ? A(1) : A(0);  // (kb: scratch)
  }
  if (w) {
    for (int64_t c = 0; c < C; ++c) ks[c] = apply_coeffs(km[c], ks[c], w, b, c).scale;
  }
  if (per_feature) {
    for (int64_t c = 0; c < C; ++c) {
      const A b_c = b ? b[c] : A(0);
      const bool f = kb[c] != A(0);
      kb[c] = f ? b_c - km[c] * ks[c] : b_c;
      km[c] = f ? A(0) : km[c];
    }
  } else if (b) {
    for (int64_t c = 0; c < C; ++c) kb[c] = b[c];
  } else {
    for (int64_t c = 0; c < C; ++c) kb[c] = A(0);
  }
  apply_all<T>(p, k, folded);
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Channels-last gradient sums (sum dy, sum dy (x - mean)) of one partition's rows, per feature
// added in row order (so the result does not depend on C or on the tiling). Column tiles of
// kCpuClRowTile<T> features (512; 2048 for 16-bit inputs) keep the tile's sums and means in L1
// while the rows stream past. Rows that fit one tile go a row at a time, in memory order (two
// sequential streams for the hardware prefetcher; 2 threads from DRAM, A/B: 1024x1024 fp16 sums
// 0.27 -> 0.14 ms, 8x256x14x14 NHWC fp32 0.15 -> 0.09, 8x64x56x56 NHWC fp32 0.38 -> 0.25-0.31,
// 32x512x14x14 NHWC fp32 1.0-1.1 -> 0.59-0.71). Wider ones take 4 rows per pass over a tile,
// loading and storing the sums once per 4 rows: with a load and a store of both sums per row, the
// loads of the next row of a 512-feature fp32 tile stalled (most likely on 4 KiB aliasing: the
// sums sit a multiple of 4 KiB away from the input rows when C * sizeof(T) is one) and the sums of
// a 1024 x 1024 input took 3x as long as torch's; a row at a time over half rows also lost the
// stream (1024x1024 fp32 0.33-0.36 -> 0.43-0.53 ms).
// (pf: rows of the next block to prefetch, as shifted_sums_cl_rows)
template <typename T, int R>
inline void grad_sums_cl_rows(const T* dy, int64_t dso, const T* x, int64_t xso, const acc_t<T>* gmean, int64_t r,
                              int64_t c0, int64_t c1, acc_t<T>* s, acc_t<T>* sx, int64_t pf) {
  using A = acc_t<T>;
  using IO = Io<T>;
  using AV = typename IO::AV;
  int64_t c = c0;
  for (; c + IO::K <= c1; c += IO::K) {
    AV m0, m1, a0, a1, b0, b1;
    prefetch_block_rows(dy, dso, r + R, pf, c, c0);
    prefetch_block_rows(x, xso, r + R, pf, c, c0);
    IO::load_acc(gmean + c, m0, m1);
    IO::load_acc(s + c, a0, a1);
    IO::load_acc(sx + c, b0, b1);
    for (int j = 0; j < R; ++j) {
      AV g0, g1, x0, x1;
      IO::load(dy + (r + j) * dso + c, g0, g1);
      IO::load(x + (r + j) * xso + c, x0, x1);
      a0 += g0;
      a1 += g1;
      b0 = at::vec::fmadd(g0, x0 - m0, b0);
      b1 = at::vec::fmadd(g1, x1 - m1, b1);
    }
    a0.store(s + c);
    a1.store(s + c + IO::L);
    b0.store(sx + c);
    b1.store(sx + c + IO::L);
  }
  for (; c < c1; ++c) {
    A a = s[c], b = sx[c];
    for (int j = 0; j < R; ++j) {
      const A gv = static_cast<A>(dy[(r + j) * dso + c]);
      a += gv;
      b += gv * (static_cast<A>(x[(r + j) * xso + c]) - gmean[c]);
    }
    s[c] = a;
    sx[c] = b;
  }
}

// Features [c0, c1) of a partition's sums. `row_at_a_time` (where the tile is the whole row): in
// memory order (two sequential streams, as the statistics' first pass), else in 4-row blocks.
template <typename T>
inline void grad_sums_cl(const T* dy, int64_t dso, const T* x, int64_t xso, const acc_t<T>* gmean,
                         const RowRuns& runs, int64_t c0, int64_t c1, acc_t<T>* s, acc_t<T>* sx, bool row_at_a_time) {
  using A = acc_t<T>;
  std::fill(s + c0, s + c1, A(0));
  std::fill(sx + c0, sx + c1, A(0));
  for (const auto& run : runs) {
    int64_t r = run.first;
    if (!row_at_a_time)
      for (; r + 4 <= run.second; r += 4)
        grad_sums_cl_rows<T, 4>(dy, dso, x, xso, gmean, r, c0, c1, s, sx, std::min<int64_t>(4, run.second - r - 4));
    for (; r < run.second; ++r) grad_sums_cl_rows<T, 1>(dy, dso, x, xso, gmean, r, c0, c1, s, sx, 0);
  }
}

template <typename A>
struct CoeffArrays4 {
  A* mean;
  A* k_dy;
  A* k_xmu;
  A* k_0;
};

// The backward's per-feature step for channels-last sums (no staged sums given or wanted): each
// ghost's totals are its first partition row (sum_cl_partials). The general loop's maths (the
// same helpers and operations, so the same bits, the totals started from 0 as there), as loops
// over consecutive features that vectorize, without its two integer divisions per feature.
template <typename A>
void cl_grad_coeffs(const BackwardParams& p, const A* sdy, const A* sdyx, A count, CoeffArrays4<A> k) {
  const View3& v = p.v;
  const int64_t C = v.C, per = p.partitions / v.G;
  const A* mean = static_cast<const A*>(p.mean);
  const A* invstd = static_cast<const A*>(p.invstd);
  const A* w = static_cast<const A*>(p.weight);
  const bool train = p.train;  // (a local: the stores below could alias p, as far as the compiler knows)
  for (int64_t g = 0; g < v.G; ++g) {
    const int64_t f0 = g * C;
    const A* __restrict__ s = sdy + g * per * C;
    const A* __restrict__ sx = sdyx + g * per * C;
    const A* __restrict__ m = mean + f0;
    const A* __restrict__ is = invstd + f0;
    if (p.grad_weight) {
      A* __restrict__ gw = static_cast<A*>(p.grad_weight) + f0;
      for (int64_t c = 0; c < C; ++c) gw[c] = (A(0) + sx[c]) * is[c];
    }
    if (p.grad_bias) {
      A* __restrict__ gb = static_cast<A*>(p.grad_bias) + f0;
      for (int64_t c = 0; c < C; ++c) gb[c] = A(0) + s[c];
    }
    A* __restrict__ km = k.mean + f0;
    A* __restrict__ kd = k.k_dy + f0;
    A* __restrict__ kx = k.k_xmu + f0;
    A* __restrict__ k0 = k.k_0 + f0;
    // grad_coeffs with its branches hoisted (train && M > 0 is the same for every feature), one
    // loop per coefficient (the four stores in one loop kept GCC 12 from vectorizing it); the
    // same operations, so the same bits.
    const A* __restrict__ wg = w ? w + f0 : nullptr;
    const bool single = train && count == A(1) && !p.mask;  // (grad_coeffs_single)
    const bool stats_terms = train && count > A(0) && !single;
    const A inv_m = stats_terms ? A(1) / count : A(0);
    const auto coeffs = [inv_m, stats_terms, single](A mean, A inv, A weight, A sum_dy, A sum_dy_xmu) {
      return single        ? grad_coeffs_single(mean)
             : stats_terms ? grad_coeffs_train(mean, inv, weight, sum_dy, sum_dy_xmu, inv_m)
                           : grad_coeffs(mean, inv, weight, sum_dy, sum_dy_xmu, A(0), false, false);
    };
    for (int64_t c = 0; c < C; ++c) km[c] = m[c];
    for (int64_t c = 0; c < C; ++c) kd[c] = coeffs(m[c], is[c], wg ? wg[c] : A(1), A(0), A(0)).k_dy;
    for (int64_t c = 0; c < C; ++c)
      kx[c] = coeffs(m[c], is[c], wg ? wg[c] : A(1), A(0) + s[c], A(0) + sx[c]).k_xmu;
    for (int64_t c = 0; c < C; ++c) k0[c] = coeffs(m[c], is[c], wg ? wg[c] : A(1), A(0) + s[c], A(0) + sx[c]).k_0;
  }
}

// Channels-last gradient sums of every (partition, feature): sdy / sdyx rows q * C (P rows), each
// partition's rows against its ghost's means.
template <typename T>
inline void grad_sums_cl_parts(const View3& v, int64_t P, const T* dy, int64_t dso, const T* x, int64_t xso,
                               const acc_t<T>* mean, acc_t<T>* sdy, acc_t<T>* sdyx) {
  using A = acc_t<T>;
  const int64_t C = v.C;
  const int nu = periodic_units<T>(v, xso == C && dso == C);
  const int64_t T_ = nu ? 1 : cl_tiles<T>(C);
  at::parallel_for(0, P * T_, grain_for(cl_part_elems(v, P) / T_), [&](int64_t begin, int64_t end) {
    RowRuns runs;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t q = t / T_, tile = t % T_;
      A* s = sdy + q * C;
      A* sx = sdyx + q * C;
      const A* gmean = mean + cl_partition(v, q, P, runs) * C;  // this partition's ghost
      if (nu) {
        std::fill(s, s + C, A(0));
        std::fill(sx, sx + C, A(0));
        for (const auto& run : runs)
          with_periodic<T, GradSumsPeriodic>(nu, dy, x, run.first * C, run.second * C, C, gmean, s, sx);
        continue;
      }
      const int64_t c0 = std::min(C, tile * kCpuClRowTile<T>);
      grad_sums_cl<T>(dy, dso, x, xso, gmean, runs, c0, T_ == 1 ? C : std::min(C, c0 + kCpuClRowTile<T>), s, sx,
                      T_ == 1);
    }
  });
}

// The input gradient from the per-(ghost, feature) coefficients (g_k0 is folded in place where
// `fold`: every feature's saved mean and invstd pass folding_is_exact).
template <typename T>
void grad_input_all(const BackwardParams& p, const acc_t<T>* g_mean, const acc_t<T>* g_kdy, const acc_t<T>* g_kx,
                    acc_t<T>* g_k0, bool fold) {
  using A = acc_t<T>;
  using IO = Io<T>;
  using AV = typename IO::AV;
  const View3& v = p.v;
  const int64_t C = v.C, F = v.features();
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  if (p.mask) {  // weighted moments: the statistics terms scale with each element's weight
    const int64_t rows = v.channels_last ? v.O : v.O * C;
    const int64_t run = v.channels_last ? C : v.I;
    at::parallel_for(0, rows, std::max<int64_t>(1, kCpuChunkElems / run), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t j = 0; j < run; ++j) {
          const int64_t o = v.channels_last ? r : r / C, c = v.channels_last ? j : r % C, i = v.channels_last ? 0 : j;
          const A g = static_cast<A>(dy[o * p.dy_so + c * p.dy_sc + i]);
          const A xm = static_cast<A>(x[o * p.x_so + c * p.x_sc + i]) - g_mean[c];
          const bool w = p.mask[o * p.m_so + c * p.m_sc + i] != 0;  // (a select: padding may be inf / NaN)
          dx[o * p.dx_so + c * p.dx_sc + i] = static_cast<T>(g_kdy[c] * g + (w ? g_kx[c] * xm + g_k0[c] : A(0)));
        }
      }
    });
    return;
  }
  if (!v.channels_last) {
    const int64_t rows = v.O * C;
    const int64_t grain = std::max<int64_t>(1, kCpuChunkElems / std::max<int64_t>(v.I, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin, o = begin / C, c = begin % C; r < end; ++r) {  // (no division per row)
        const GradCoeffs<A> g{g_mean[c], g_kdy[c], g_kx[c], g_k0[c]};
        grad_run(dy + o * p.dy_so + c * p.dy_sc, x + o * p.x_so + c * p.x_sc, dx + o * p.dx_so + c * p.dx_sc, v.I, g);
        if (++c == C) c = 0, ++o;
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kCpuChunkElems / C);
  if (const int nu = periodic_units<T>(v, p.x_so == C && p.dy_so == C && p.dx_so == C)) {
    const int64_t W = nu * Unit<T>::U, N = v.O * C;
    at::parallel_for(0, ceil_div(N, W), std::max<int64_t>(1, kCpuChunkElems / W), [&](int64_t begin, int64_t end) {
      with_periodic<T, GradInputPeriodic>(nu, dy, x, dx, begin * W, std::min(N, end * W), C, g_mean, g_kdy, g_kx,
                                          g_k0);
    });
    return;
  }
  // dx = k_dy * dy + k_xmu * x + (k_0 - k_xmu * mean) where `fold`: one load and one subtract
  // fewer per vector, exact enough when |mean| <= 8 std (see folding_is_exact).
  if (fold) {
    for (int64_t f = 0; f < F; ++f) g_k0[f] = g_k0[f] - g_kx[f] * g_mean[f];
  }
  // The coefficients in Io::load_lanes' order where it is not memory order (kPermutedLanes).
  const A *k_mean = g_mean, *k_dy = g_kdy, *k_x = g_kx, *k_0 = g_k0;
  std::unique_ptr<A[]> lanes;
  if constexpr (kPermutedLanes<T>) {
    if (C >= IO::K) {
      lanes = scratch<A>(4 * F);
      A* q = lanes.get();
      to_lane_order<T>(g_mean, q, v.G, C);
      to_lane_order<T>(g_kdy, q + F, v.G, C);
      to_lane_order<T>(g_kx, q + 2 * F, v.G, C);
      to_lane_order<T>(g_k0, q + 3 * F, v.G, C);
      k_mean = q, k_dy = q + F, k_x = q + 2 * F, k_0 = q + 3 * F;
    }
  }
  if (fold) {
    at::parallel_for(0, v.O, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* g = dy + r * p.dy_so;
        const T* xr = x + r * p.x_so;
        T* out = dx + r * p.dx_so;
        const int64_t f0 = ghost_of_row(v, r) * C;
        const A* cd = k_dy + f0;
        const A* cx = k_x + f0;
        const A* c0 = k_0 + f0;
        int64_t c = 0;
        for (; c + IO::K <= C; c += IO::K) {
          AV g0, g1, x0, x1, d0, d1, k0, k1, z0, z1;
          IO::load_lanes(g + c, g0, g1);
          IO::load_lanes(xr + c, x0, x1);
          IO::load_acc(cd + c, d0, d1);
          IO::load_acc(cx + c, k0, k1);
          IO::load_acc(c0 + c, z0, z1);
          IO::store_lanes(out + c, at::vec::fmadd(d0, g0, at::vec::fmadd(k0, x0, z0)),
                          at::vec::fmadd(d1, g1, at::vec::fmadd(k1, x1, z1)));
        }
        for (; c < C; ++c)
          out[c] = static_cast<T>(cd[c] * static_cast<A>(g[c]) + cx[c] * static_cast<A>(xr[c]) + c0[c]);
      }
    });
    return;
  }
  at::parallel_for(0, v.O, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = dy + r * p.dy_so;
      const T* xr = x + r * p.x_so;
      T* out = dx + r * p.dx_so;
      const int64_t f0 = ghost_of_row(v, r) * C;  // this row's ghost's coefficients
      const A* cm = k_mean + f0;
      const A* cd = k_dy + f0;
      const A* cx = k_x + f0;
      const A* c0 = k_0 + f0;
      int64_t c = 0;
      for (; c + IO::K <= C; c += IO::K) {
        AV g0, g1, x0, x1, m0, m1, d0, d1, k0, k1, z0, z1;
        IO::load_lanes(g + c, g0, g1);
        IO::load_lanes(xr + c, x0, x1);
        IO::load_acc(cm + c, m0, m1);
        IO::load_acc(cd + c, d0, d1);
        IO::load_acc(cx + c, k0, k1);
        IO::load_acc(c0 + c, z0, z1);
        IO::store_lanes(out + c, at::vec::fmadd(d0, g0, at::vec::fmadd(k0, x0 - m0, z0)),
                        at::vec::fmadd(d1, g1, at::vec::fmadd(k1, x1 - m1, z1)));
      }
      for (; c < C; ++c) {
        const GradCoeffs<A> gc{cm[c], cd[c], cx[c], c0[c]};
        out[c] = static_cast<T>(grad_one(static_cast<A>(g[c]), static_cast<A>(xr[c]), gc));
      }
    }
  });
}

template <typename T>
void backward(const BackwardParams& p) {
  using A = acc_t<T>;
  const View3& v = p.v;
  const int64_t C = v.C, P = p.partitions, F = v.features();  // F = G * C per-feature entries
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const A* mean = static_cast<const A*>(p.mean);
  const A* invstd = static_cast<const A*>(p.invstd);
  const A* w = static_cast<const A*>(p.weight);
  A* sdy = static_cast<A*>(p.workspace);
  A* sdyx = sdy + P * C;
  A* gbase = sdyx + P * C;
  A* g_mean = gbase;
  A* g_kdy = gbase + F;
  A* g_kx = gbase + 2 * F;
  A* g_k0 = gbase + 3 * F;
  // Staged: given_sum_* replace the local sums; out_sum_* receive them.
  const bool given = p.given_sum_dy != nullptr;
  const bool need_sums = !given && (p.grad_weight || p.grad_bias || p.out_sum_dy || (p.dx && p.train));

  // Short dense channels-first rows (see cf_expand_ok): the sums of the W = C * I channels-last
  // columns (x and dy viewed as O rows of W), added per feature in column order into its first
  // partition's slot (then summed over one "partition" below); the input gradient with expanded
  // coefficients where cf_expand_elementwise says so, else per feature (the end of this function).
  const bool cf_expanded =
      !p.mask && cf_expand_ok<T>(v, {{p.x_so, p.x_sc}, {p.dy_so, p.dy_sc}}) &&
      (!p.dx || (p.dx_so == v.C * v.I && p.dx_sc == v.I));
  if (cf_expanded && need_sums) {
    const int64_t W = C * v.I;
    const View3 ve = rows_as_features(v);
    const int64_t Pe = plan_partitions_cpu(ve);
    const auto ws = scratch<A>(2 * Pe * W + W);
    A* cs = ws.get();
    A* csx = cs + Pe * W;
    A* em = csx + Pe * W;
    expand_features(mean, em, C, v.I);
    grad_sums_cl_parts<T>(ve, Pe, dy, W, x, W, em, cs, csx);
    sum_cl_partials(cs, csx, Pe, W, 1);  // totals: row 0
    for (int64_t c = 0; c < C; ++c) {
      A s = A(0), sx = A(0);
      for (int64_t j = c * v.I; j < (c + 1) * v.I; ++j) {
        s += cs[j];
        sx += csx[j];
      }
      sdy[c * P] = s;
      sdyx[c * P] = sx;
    }
  }

  // Channels-first, each feature one partition (its O x I elements fit a cache-sized chunk): one
  // task per feature computes its sums, coefficients and grad_input back to back, so the second
  // pass over x and dy hits the cache instead of memory. Same sums in the same order as the
  // two-phase path below (bitwise the same result). Small features too: measured on 2 AVX2
  // threads, 8x256x14x14 0.159 -> 0.115 ms, 8x1000x7x7 0.200 -> 0.178 ms, none slower.
  if (!cf_expanded && !v.channels_last && v.G == 1 && P == 1 && need_sums && p.dx && !p.out_sum_dy && !p.mask) {
    T* dx = static_cast<T*>(p.dx);
    A* gw = static_cast<A*>(p.grad_weight);
    A* gb = static_cast<A*>(p.grad_bias);
    const A count = static_cast<A>(v.O * v.I);
    const int64_t dist = cf_prefetch_distance<T>(v, v.O);
    at::parallel_for(0, C, grain_for(v.O * v.I), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        RunAcc<T> rs, rsx;
        for (int64_t r = 0; r < v.O; ++r)
          grad_sums_run(dy + r * p.dy_so + c * p.dy_sc, x + r * p.x_so + c * p.x_sc, v.I, mean[c], rs, rsx);
        const A s = rs.total(), sx = rsx.total();
        if (gw) gw[c] = sx * invstd[c];
        if (gb) gb[c] = s;
        const GradCoeffs<A> g = grad_coeffs(mean[c], invstd[c], w ? w[c] : A(1), s, sx, count, p.train, false);
        const CfNextRows<T> ndy = cf_task_rows(dy, p.dy_so, p.dy_sc, v, 1, v.O, c + dist, end, true);
        const CfNextRows<T> nx = cf_task_rows(x, p.x_so, p.x_sc, v, 1, v.O, c + dist, end, true);
        for (int64_t r = 0; r < v.O; ++r) {
          grad_run(dy + r * p.dy_so + c * p.dy_sc, x + r * p.x_so + c * p.x_sc, dx + r * p.dx_so + c * p.dx_sc, v.I,
                   g);
          ndy.prefetch(r);
          nx.prefetch(r);
        }
      }
    });
    return;
  }

  if (need_sums && !cf_expanded) {
    if (!v.channels_last) {
      const int64_t rows_per_part = cf_rows_per_part(v), dist = cf_prefetch_distance<T>(v, rows_per_part);
      at::parallel_for(0, C * P, grain_for(cf_part_elems(v)), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t c = t / P, q = t % P;
          const int64_t r0 = q * rows_per_part, r1 = std::min(v.O, r0 + rows_per_part);
          RunAcc<T> s, sx;
          // (one pass per task: a later task's rows are prefetched along it)
          const CfNextRows<T> ndy = cf_task_rows(dy, p.dy_so, p.dy_sc, v, P, rows_per_part, t + dist, end, true);
          const CfNextRows<T> nx = cf_task_rows(x, p.x_so, p.x_sc, v, P, rows_per_part, t + dist, end, true);
          for (int64_t r = r0; r < r1; ++r) {
            grad_sums_run(dy + r * p.dy_so + c * p.dy_sc, x + r * p.x_so + c * p.x_sc, v.I, mean[c], s, sx);
            ndy.prefetch(r - r0);
            nx.prefetch(r - r0);
          }
          sdy[t] = s.total();
          sdyx[t] = sx.total();
        }
      });
    } else {
      grad_sums_cl_parts<T>(v, P, dy, p.dy_so, x, p.x_so, mean, sdy, sdyx);
    }
  }

  const A count = static_cast<A>(v.O * v.I / v.G);  // elements per (ghost, feature)
  A* gw = static_cast<A*>(p.grad_weight);
  A* gb = static_cast<A*>(p.grad_bias);
  if (need_sums && v.channels_last) sum_cl_partials(sdy, sdyx, P, C, v.G);  // totals: each group's first row
  const int64_t sum_rows = v.channels_last || cf_expanded ? 1 : P;
  if (v.channels_last && need_sums && !given && !p.out_sum_dy) {
    cl_grad_coeffs<A>(p, sdy, sdyx, count, CoeffArrays4<A>{g_mean, g_kdy, g_kx, g_k0});
  } else {
    // Per-feature totals and coefficients (thousands of features are worth the threads).
    at::parallel_for(0, F, grain_for(16 * sum_rows), [&](int64_t f0, int64_t f1) {
      for (int64_t c = f0; c < f1; ++c) {  // c: feature index, ghost-major with ghosts
        A s = A(0), sx = A(0);
        if (need_sums) {
          for (int64_t q = 0; q < sum_rows; ++q) {
            const int64_t idx = v.channels_last ? merged_cl_index(v, P, c) : c * P + q;
            s += sdy[idx];
            sx += sdyx[idx];
          }
        }
        if (given) {
          s = static_cast<const A*>(p.given_sum_dy)[c];
          sx = static_cast<const A*>(p.given_sum_dy_xmu)[c];
        }
        if (p.out_sum_dy) {
          static_cast<A*>(p.out_sum_dy)[c] = s;
          static_cast<A*>(p.out_sum_dy_xmu)[c] = sx;
        }
        if (gw) gw[c] = sx * invstd[c];
        if (gb) gb[c] = s;
        const A n = given ? static_cast<const A*>(p.given_count)[c] : count;
        const GradCoeffs<A> g = grad_coeffs(mean[c], invstd[c], w ? w[c] : A(1), s, sx, n, p.train, p.mask != nullptr);
        g_mean[c] = g.mean;
        g_kdy[c] = g.k_dy;
        g_kx[c] = g.k_xmu;
        g_k0[c] = g.k_0;
      }
    });
  }
  if (!p.dx) return;
  const bool fold = !p.mask && folding_is_exact(mean, invstd, F);
  if (cf_expanded && cf_expand_elementwise<T>(v)) {
    // The channels-last input gradient over rows of W = C * I, each feature's coefficients
    // repeated I times (the same arithmetic per element).
    const int64_t W = C * v.I;
    const auto e = scratch<A>(4 * W);
    A* ge[4] = {e.get(), e.get() + W, e.get() + 2 * W, e.get() + 3 * W};
    const A* gf[4] = {g_mean, g_kdy, g_kx, g_k0};
    for (int j = 0; j < 4; ++j) expand_features(gf[j], ge[j], C, v.I);
    BackwardParams pe = p;
    pe.x_so = pe.dy_so = pe.dx_so = W;
    pe.x_sc = pe.dy_sc = pe.dx_sc = 1;
    for (int64_t t0 = 0; t0 < W; t0 += kCfExpandTile) {  // (as apply_all's expanded tiles)
      const int64_t t1 = std::min(W, t0 + kCfExpandTile);
      pe.v = rows_as_features(v, t1 - t0);
      pe.x = x + t0;
      pe.dy = dy + t0;
      pe.dx = static_cast<T*>(p.dx) + t0;
      grad_input_all<T>(pe, ge[0] + t0, ge[1] + t0, ge[2] + t0, ge[3] + t0, fold);
    }
    return;
  }
  grad_input_all<T>(p, g_mean, g_kdy, g_kx, g_k0, fold);
}

// A call's per-feature tensors to and from float32, the accumulation type of 16-bit and float32
// input (glue.cpp's convert_features / write_back, AVX2 only): every element through the vector
// conversions, the last partial step too (zero-padded), as Tensor::to converts them, NaN encodings
// included (bf16 NaN -> 0xffff, fp16 payloads kept; the scalar casts give 0x7fc0 / drop payloads).
template <typename T>
void to_float(const void* src, float* d, int64_t n) {
  const T* s = static_cast<const T*>(src);
  if constexpr (std::is_same_v<T, float>) {
    std::copy(s, s + n, d);
  } else if constexpr (std::is_same_v<acc_t<T>, float>) {
    using IO = Io<T>;
    typename IO::AV a, b;
    int64_t i = 0;
    for (; i + IO::K <= n; i += IO::K) {
      IO::load(s + i, a, b);
      a.store(d + i);
      b.store(d + i + IO::L);
    }
    if (i < n) {
      T in[IO::K] = {};
      float out[IO::K];
      std::copy(s + i, s + n, in);
      IO::load(in, a, b);
      a.store(out);
      b.store(out + IO::L);
      std::copy(out, out + (n - i), d + i);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
}

template <typename T>
void from_float(const float* s, void* dst, int64_t n) {
  T* d = static_cast<T*>(dst);
  if constexpr (std::is_same_v<T, float>) {
    std::copy(s, s + n, d);
  } else if constexpr (std::is_same_v<acc_t<T>, float>) {
    using IO = Io<T>;
    int64_t i = 0;
    for (; i + IO::K <= n; i += IO::K) IO::store(d + i, IO::AV::loadu(s + i), IO::AV::loadu(s + i + IO::L));
    if (i < n) {
      float in[IO::K] = {};
      T out[IO::K];
      std::copy(s + i, s + n, in);
      IO::store(out, IO::AV::loadu(in), IO::AV::loadu(in + IO::L));
      std::copy(out, out + (n - i), d + i);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(s[i]);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace bn_cuda
