// Welford running moments and Chan's pairwise merge, torch-free, for host and device.
//
// A state holds the count n, the mean and M2 = sum((x - mean)^2) of the values it has seen.
// Adding one value x with a new count n:  d = x - mean;  mean += d / n;  M2 += d * (x - mean).
// Merging two states a, b (Chan, Golub & LeVeque 1979):
//   n = na + nb;  delta = mean_b - mean_a;
//   mean = mean_a + delta * nb / n;  M2 = M2a + M2b + delta^2 * na * nb / n.
// Neither form subtracts two large sums, so the variance stays accurate (and never negative)
// when |mean| >> std, which is where sum / sum-of-squares formulas lose every digit.
#pragma once

#include "config.h"

namespace BN_CUDA_NAMESPACE {

template <typename T>
struct WelfordState {
  T mean;
  T m2;
  T n;
};

template <typename T>
BN_HD WelfordState<T> welford_empty() {
  return WelfordState<T>{T(0), T(0), T(0)};
}

// One value into a running (mean, m2) whose count has just become 1 / inv_n. V may be a scalar
// or a SIMD vector type (one independent state per lane that share the count).
template <typename V>
BN_HD void welford_step(V& mean, V& m2, const V& x, const V& inv_n) {
  const V d = x - mean;
  mean = mean + d * inv_n;
  m2 = m2 + d * (x - mean);
}

// Chan's merge. Merging with an empty state returns the other one unchanged, so partial
// results that saw no data (an empty tile, a masked-out chunk) are harmless.
template <typename T>
BN_HD WelfordState<T> welford_merge(const WelfordState<T>& a, const WelfordState<T>& b) {
  const T n = a.n + b.n;
  if (b.n == T(0)) return a;
  if (a.n == T(0)) return b;
  const T nb_over_n = b.n / n;
  const T delta = b.mean - a.mean;
  WelfordState<T> r;
  r.mean = a.mean + delta * nb_over_n;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * nb_over_n;
  r.n = n;
  return r;
}

// The exact moments of K values (two passes over registers), as a state to merge.
template <int K, typename T>
BN_HD WelfordState<T> welford_of_values(const T (&v)[K]) {
  T s = T(0);
#pragma unroll
  for (int k = 0; k < K; ++k) s += v[k];
  const T mean = s / T(K);
  T m2 = T(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const T d = v[k] - mean;
    m2 += d * d;
  }
  return WelfordState<T>{mean, m2, T(K)};
}

}  // namespace BN_CUDA_NAMESPACE
