// Per-feature epilogues shared by the CPU and CUDA kernels: turning moments into the saved
// statistics, updating running statistics, and the per-feature coefficients of the apply steps.
#pragma once

#include <cmath>

#include "config.h"
#include "welford.h"

namespace BN_CUDA_NAMESPACE {

BN_HD float bn_sqrt(float x) { return sqrtf(x); }
BN_HD double bn_sqrt(double x) { return sqrt(x); }

// 1 / sqrt(var + eps), rounded correctly in both precisions (no fast-math rsqrt, so the CPU and
// the GPU agree to the last bit on this step).
template <typename T>
BN_HD T invstd_of(T var, T eps) {
  return T(1) / bn_sqrt(var + eps);
}

// Biased (population) variance of a state; 0 for an empty one.
template <typename T>
BN_HD T biased_var(const WelfordState<T>& s) {
  return s.n > T(0) ? s.m2 / s.n : T(0);
}

// Bessel-corrected variance used for running statistics (torch and tf's fused path). With a
// single value the correction factor is 1, as in TensorFlow's fused kernel (torch refuses one
// value per feature in training before it gets here).
template <typename T>
BN_HD T unbiased_var(const WelfordState<T>& s) {
  return s.n > T(1) ? s.m2 / (s.n - T(1)) : s.m2;
}

// torch convention: running = (1 - momentum) * running + momentum * batch.
template <typename T>
BN_HD T running_update(T running, T batch, T momentum) {
  return momentum * batch + (T(1) - momentum) * running;
}

// Forward apply: y = (x - mean) * scale + shift with scale = gamma * invstd, shift = beta.
// Subtracting the mean before scaling keeps the result accurate when |mean| >> std; folding the
// mean into the shift (x * scale + (beta - mean * scale)) would cancel catastrophically.
template <typename T>
struct ApplyCoeffs {
  T mean;
  T scale;
  T shift;
};

template <typename T>
BN_HD ApplyCoeffs<T> apply_coeffs(T mean, T invstd, const T* weight, const T* bias, int64_t c) {
  ApplyCoeffs<T> k;
  k.mean = mean;
  k.scale = weight ? weight[c] * invstd : invstd;
  k.shift = bias ? bias[c] : T(0);
  return k;
}

template <typename T>
BN_HD T apply_one(T x, const ApplyCoeffs<T>& k) {
  return (x - k.mean) * k.scale + k.shift;
}

// Backward of y = (x - mean) * invstd * w + b over M reduced elements per feature.
// With sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (x - mean)):
//   grad_w = sum_dy_xmu * invstd,   grad_b = sum_dy,
//   training:  dx = w*invstd * (dy - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu / M)
//   inference: dx = w*invstd * dy            (mean and invstd are constants)
// written as dx = k_dy * dy + k_xmu * (x - mean) + k_0.
template <typename T>
struct GradCoeffs {
  T mean;
  T k_dy;
  T k_xmu;
  T k_0;
};

template <typename T>
BN_HD GradCoeffs<T> grad_coeffs(T mean, T invstd, T w, T sum_dy, T sum_dy_xmu, T count, bool train) {
  GradCoeffs<T> g;
  g.mean = mean;
  g.k_dy = w * invstd;
  if (train && count > T(0)) {
    const T inv_m = T(1) / count;
    g.k_xmu = -g.k_dy * invstd * invstd * sum_dy_xmu * inv_m;
    g.k_0 = -g.k_dy * sum_dy * inv_m;
  } else {
    g.k_xmu = T(0);
    g.k_0 = T(0);
  }
  return g;
}

template <typename T>
BN_HD T grad_one(T dy, T x, const GradCoeffs<T>& g) {
  return g.k_dy * dy + g.k_xmu * (x - g.mean) + g.k_0;
}

// Merged statistics of W per-source states for one feature (sources in order), and the running
// statistics update; an all-empty feature leaves the running statistics unchanged.
template <typename A>
struct GatheredStats {
  A mean;
  A invstd;
  A count;
};

template <typename A>
BN_HD GatheredStats<A> gather_finalize(const WelfordState<A>& st, A eps, A momentum, bool unbiased, A* running_mean,
                                       A* running_var) {
  GatheredStats<A> g;
  g.count = st.n;
  g.mean = st.mean;
  const A var = biased_var(st);
  g.invstd = invstd_of(var, eps);
  if (st.n > A(0)) {
    if (running_mean) *running_mean = running_update(*running_mean, st.mean, momentum);
    if (running_var) *running_var = running_update(*running_var, unbiased ? unbiased_var(st) : var, momentum);
  }
  return g;
}

}  // namespace BN_CUDA_NAMESPACE
