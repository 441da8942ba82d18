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

// The training case with inv_m = 1 / M given (M > 0): loops over features with one M hoist it.
template <typename T>
BN_HD GradCoeffs<T> grad_coeffs_train(T mean, T invstd, T w, T sum_dy, T sum_dy_xmu, T inv_m) {
  GradCoeffs<T> g;
  g.mean = mean;
  g.k_dy = w * invstd;
  g.k_xmu = -g.k_dy * invstd * invstd * sum_dy_xmu * inv_m;
  g.k_0 = -g.k_dy * sum_dy * inv_m;
  return g;
}

// One value per feature in training (M == 1; tf_keras's ghost batches allow it): dy - mean(dy)
// and x - mean are both 0, so the input gradient is exactly 0, as tf_keras and torch's formula
// give. k_dy * dy + k_0 would leave the rounding of k_dy * dy wherever a * b + c is fused into
// one fma (the CUDA compiler's default, the CPU's vector code), so every coefficient is 0 instead.
// Not for weighted (masked) statistics, whose masked-out elements keep k_dy * dy.
template <typename T>
BN_HD GradCoeffs<T> grad_coeffs_single(T mean) {
  GradCoeffs<T> g;
  g.mean = mean;
  g.k_dy = T(0);
  g.k_xmu = T(0);
  g.k_0 = T(0);
  return g;
}

// `weighted`: the statistics are a mask's weighted moments (see grad_coeffs_single).
template <typename T>
BN_HD GradCoeffs<T> grad_coeffs(T mean, T invstd, T w, T sum_dy, T sum_dy_xmu, T count, bool train, bool weighted) {
  if (train && count == T(1) && !weighted) return grad_coeffs_single(mean);
  if (train && count > T(0)) return grad_coeffs_train(mean, invstd, w, sum_dy, sum_dy_xmu, T(1) / count);
  GradCoeffs<T> g;
  g.mean = mean;
  g.k_dy = w * invstd;
  g.k_xmu = T(0);
  g.k_0 = T(0);
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

// tf_keras's moving average: variable - (variable - value) * decay, decay = 1 - momentum computed
// in double and then rounded, as tf_keras does (rounding momentum first and subtracting in float32
// is off by up to 1.7e-4 relative for momentum 0.9999).
template <typename A>
BN_HD A keras_moving_average(A variable, A value, A decay) {
  return variable - (variable - value) * decay;
}

// tf_keras's per-feature training epilogue for ghost batches and batch renormalization, on the
// device in one step: average the G ghost statistics, take renorm's r and d from the pre-update
// renorm statistics (clipped; a NaN bound means "no clip"), and update every moving variable.
// Features without any data keep their moving variables unless always_update (tf_keras's
// masked moments move them towards 0 too).
struct KerasFinalizeParams {
  int64_t G = 1, C = 0;
  const void* mean = nullptr;  // G * C, ghost-major
  const void* var = nullptr;
  const void* count = nullptr;
  void* moving_mean = nullptr;  // C each
  void* moving_variance = nullptr;
  void* moving_stddev = nullptr;  // renorm only (all three non-null, or all null)
  void* renorm_mean = nullptr;
  void* renorm_stddev = nullptr;
  void* r = nullptr;  // C outputs: 1 and 0 without renorm
  void* d = nullptr;
  double momentum = 0.99, renorm_momentum = 0.99, eps = 1e-3;
  double rmin = 0, rmax = 0, dmax = 0;  // NaN: no clip on that side
  bool always_update = false;
  // Coefficient mode (keras_coeffs): the ghosts' Welford states in, the apply step's coefficients
  // out, so that one step replaces gather_stats + keras_finalize + the composition of gamma / beta
  // with the adjustment and r / d. When m2 is given, `var` is unused: each (ghost, feature)
  // variance is m2 / count (biased_var) and its 1 / sqrt(var + eps) is written to invstd.
  const void* m2 = nullptr;      // G * C
  void* invstd = nullptr;        // G * C out
  const void* gamma = nullptr;   // C each, optional: tf_keras's y * adj_scale + adj_bias, then
  const void* beta = nullptr;    //   * gamma + beta, with renorm x_hat * r + d first
  const void* adj_scale = nullptr;
  const void* adj_bias = nullptr;
  void* weight = nullptr;  // G * C out: the apply step's per-(ghost, feature) scale and shift
  void* bias = nullptr;
  // Coefficient mode, optional (keras_forward on CUDA): normalize's apply coefficients too, 3 * G *
  // C out: (mean, weight * invstd, bias) per (ghost, feature), as apply_coeffs computes them from
  // the values written above, so that the apply kernel needs no kernel of its own before it.
  void* apply = nullptr;
};

// a * b and a + b rounded on their own: the device compiler would otherwise fuse a * b + c into
// one fma, and the composition would differ in the last bit from the same products computed as
// separate tensor ops (the Python path's).
BN_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
BN_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
BN_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
BN_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// The apply step's scale and shift of feature c given renorm's (r, d): tf_keras composes
// (adj_scale, adj_bias) with (gamma, beta), then (r, d) with that: scale = r * S, shift = d * S + O
// with S = adj_scale * gamma, O = adj_bias * gamma + beta (absent factors drop out, as in
// tf_keras's _compose_transforms with None).
template <typename A>
BN_HD void keras_compose(const KerasFinalizeParams& p, int64_t c, A r, A d, bool renorm, A& scale, A& shift) {
  const A* gamma = static_cast<const A*>(p.gamma);
  const A* beta = static_cast<const A*>(p.beta);
  const A* adj_s = static_cast<const A*>(p.adj_scale);
  const A* adj_b = static_cast<const A*>(p.adj_bias);
  bool has_s = false, has_o = false;
  A s = A(1), o = A(0);
  if (adj_s) {
    s = adj_s[c];
    has_s = true;
  }
  if (adj_b) {
    o = adj_b[c];
    has_o = true;
  }
  if (gamma) {
    s = has_s ? mul_rn(s, gamma[c]) : gamma[c];
    if (has_o) o = mul_rn(o, gamma[c]);
    has_s = true;
  }
  if (beta) {
    o = has_o ? add_rn(o, beta[c]) : beta[c];
    has_o = true;
  }
  if (renorm) {
    const A rs = has_s ? mul_rn(r, s) : r;
    A ro = has_s ? mul_rn(d, s) : d;
    if (has_o) ro = add_rn(ro, o);
    s = rs;
    o = ro;
  }
  scale = s;
  shift = o;
}

// The backward of keras_coeffs' composition for feature c (keras_grads): from d loss / d (the
// apply step's scale, shift) summed over the ghosts (d_s, d_h), the gradients of gamma, beta and
// the adjustment's (scale, bias) through scale = r * S1, shift = d * S1 + O1, S1 = adj_scale *
// gamma, O1 = adj_bias * gamma + beta (r and d constant: tf_keras's stop_gradient), each product
// and sum rounded on its own as the same tensor ops would round them.
struct KerasGradParams {
  int64_t G = 1, C = 0;
  const void* d_scale = nullptr;  // G * C, ghost-major: per (ghost, feature)
  const void* d_shift = nullptr;
  const void* r = nullptr;  // C each, optional (renorm: r and d both)
  const void* d = nullptr;
  const void* gamma = nullptr;
  const void* adj_scale = nullptr;
  const void* adj_bias = nullptr;
  void* grad_gamma = nullptr;  // C each; null: not wanted
  void* grad_beta = nullptr;
  void* grad_adj_scale = nullptr;
  void* grad_adj_bias = nullptr;
};

template <typename A>
BN_HD void keras_grads_compose(const KerasGradParams& p, int64_t c, A d_s, A d_h) {
  const A* gamma = static_cast<const A*>(p.gamma);
  const A* adj_s = static_cast<const A*>(p.adj_scale);
  const A* adj_b = static_cast<const A*>(p.adj_bias);
  // d loss / d S1 (renorm: d_s * r + d_h * d) and d loss / d O1 (= d loss / d (adj_bias * gamma))
  const A d_s1 = p.r ? add_rn(mul_rn(d_s, static_cast<const A*>(p.r)[c]), mul_rn(d_h, static_cast<const A*>(p.d)[c]))
                     : d_s;
  if (p.grad_gamma) {
    A t = adj_s ? mul_rn(d_s1, adj_s[c]) : d_s1;
    if (adj_b) t = add_rn(t, mul_rn(d_h, adj_b[c]));
    static_cast<A*>(p.grad_gamma)[c] = t;
  }
  if (p.grad_beta) static_cast<A*>(p.grad_beta)[c] = d_h;
  if (p.grad_adj_scale) static_cast<A*>(p.grad_adj_scale)[c] = gamma ? mul_rn(d_s1, gamma[c]) : d_s1;
  if (p.grad_adj_bias) static_cast<A*>(p.grad_adj_bias)[c] = gamma ? mul_rn(d_h, gamma[c]) : d_h;
}

// The host's keras_grads for feature c: the ghosts summed in order.
template <typename A>
BN_HD void keras_grads_feature(const KerasGradParams& p, int64_t c) {
  const A* ds = static_cast<const A*>(p.d_scale);
  const A* dh = static_cast<const A*>(p.d_shift);
  A s = ds[c], h = dh[c];
  for (int64_t g = 1; g < p.G; ++g) {
    s = add_rn(s, ds[g * p.C + c]);
    h = add_rn(h, dh[g * p.C + c]);
  }
  keras_grads_compose<A>(p, c, s, h);
}

template <typename A>
BN_HD void keras_finalize_feature(const KerasFinalizeParams& p, int64_t c) {
  const A* mean = static_cast<const A*>(p.mean);
  const A* var = static_cast<const A*>(p.var);
  const A* m2 = static_cast<const A*>(p.m2);
  const A* cnt = static_cast<const A*>(p.count);
  const A decay = static_cast<A>(1.0 - p.momentum), eps = static_cast<A>(p.eps);
  A m = A(0), v = A(0), n = A(0);
  for (int64_t g = 0; g < p.G; ++g) {  // tf_keras: reduce_mean over the ghost axis, in order
    const int64_t i = g * p.C + c;
    A vg;
    if (m2) {  // coefficient mode: the state's biased variance and its invstd
      WelfordState<A> st;
      st.mean = mean[i];
      st.m2 = m2[i];
      st.n = cnt[i];
      vg = biased_var(st);
      static_cast<A*>(p.invstd)[i] = invstd_of(vg, eps);
    } else {
      vg = var[i];
    }
    m += mean[i];
    v += vg;
    n += cnt[i];
  }
  m = m / static_cast<A>(p.G);
  v = v / static_cast<A>(p.G);
  const bool update = p.always_update || n > A(0);
  A* mm = static_cast<A*>(p.moving_mean);
  A* mv = static_cast<A*>(p.moving_variance);
  A r = A(1), d = A(0);
  if (p.renorm_mean) {
    A* rm = static_cast<A*>(p.renorm_mean);
    A* rs = static_cast<A*>(p.renorm_stddev);
    A* ms = static_cast<A*>(p.moving_stddev);
    const A stddev = bn_sqrt(v + eps);
    const A floor = bn_sqrt(eps);
    const A denom = rs[c] < floor ? floor : rs[c];  // tf.maximum: a NaN renorm_stddev stays NaN
    r = stddev / denom;
    d = (m - rm[c]) / denom;
    const A rmin = static_cast<A>(p.rmin), rmax = static_cast<A>(p.rmax), dmax = static_cast<A>(p.dmax);
    if (rmin == rmin && r < rmin) r = rmin;  // (x == x: not NaN)
    if (rmax == rmax && r > rmax) r = rmax;
    if (dmax == dmax) d = d < -dmax ? -dmax : (d > dmax ? dmax : d);
    if (update) {
      const A rdecay = static_cast<A>(1.0 - p.renorm_momentum);
      rm[c] = keras_moving_average(rm[c], m, rdecay);
      rs[c] = keras_moving_average(rs[c], stddev, rdecay);
      ms[c] = keras_moving_average(ms[c], stddev, decay);
      const A var_from_std = ms[c] * ms[c] - eps;  // tf_keras keeps relu(stddev^2 - eps)
      mv[c] = var_from_std < A(0) ? A(0) : var_from_std;  // (NaN stays NaN, as in tf.nn.relu)
    }
  } else if (update) {
    mv[c] = keras_moving_average(mv[c], v, decay);
  }
  if (update) mm[c] = keras_moving_average(mm[c], m, decay);
  static_cast<A*>(p.r)[c] = r;
  static_cast<A*>(p.d)[c] = d;
  if (p.weight) {  // coefficient mode: the same scale and shift for every ghost of feature c
    A scale, shift;
    keras_compose<A>(p, c, r, d, p.renorm_mean != nullptr, scale, shift);
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t i = g * p.C + c;
      static_cast<A*>(p.weight)[i] = scale;
      static_cast<A*>(p.bias)[i] = shift;
      if (p.apply) {
        const A* wi = static_cast<const A*>(p.weight);
        const A* bi = static_cast<const A*>(p.bias);
        const ApplyCoeffs<A> k = apply_coeffs(mean[i], static_cast<const A*>(p.invstd)[i], wi, bi, i);
        A* out = static_cast<A*>(p.apply);
        out[i] = k.mean;
        out[p.G * p.C + i] = k.scale;
        out[2 * p.G * p.C + i] = k.shift;
      }
    }
  }
}

}  // namespace BN_CUDA_NAMESPACE
