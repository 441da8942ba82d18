#include "canonical.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>
#include <sstream>

namespace bn_cuda {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

DimVec normalize_axes(at::IntArrayRef axis, int64_t ndim) {
  TORCH_CHECK_VALUE(!axis.empty(), "bn_cuda: axis must name at least one feature axis, got []");
  DimVec out;
  for (int64_t a : axis) {
    TORCH_CHECK_VALUE(a >= -ndim && a < ndim, "bn_cuda: axis ", a, " is out of range for an input of rank ",
                      ndim, " (valid: ", -ndim, " .. ", ndim - 1, "); axis=", shape_str(axis));
    out.push_back(a < 0 ? a + ndim : a);
  }
  std::sort(out.begin(), out.end());
  for (size_t i = 1; i < out.size(); ++i)
    TORCH_CHECK_VALUE(out[i] != out[i - 1], "bn_cuda: axis contains dimension ", out[i],
                      " more than once; axis=", shape_str(axis));
  return out;
}

namespace {

struct GroupView {
  int64_t so = 0, sc = 0, si = 1;
  bool ok = true;
};

// Collapse the dims perm[lo:hi] (sizes / strides of one tensor) into one (size, stride); size-1
// dims are skipped. (ArrayRefs rather than Tensor::size(d) / stride(d), which wrap the dim each
// time: this runs for every tensor of every call.)
bool collapse(at::IntArrayRef sizes, at::IntArrayRef strides, const DimVec& perm, int64_t lo, int64_t hi,
              int64_t& stride) {
  int64_t prev = -1;
  bool any = false;
  for (int64_t k = lo; k < hi; ++k) {
    const int64_t d = perm[k];
    if (sizes[d] == 1) continue;
    if (prev >= 0 && strides[prev] != strides[d] * sizes[d]) return false;
    prev = d;
    any = true;
  }
  stride = any ? strides[prev] : 0;
  return true;
}

// The three groups of `t` collapsed (group_strides without the inner-stride default).
bool collapse3(const at::Tensor& t, const Canonical& c, int64_t& so, int64_t& sc, int64_t& si, bool& has_inner) {
  const at::IntArrayRef sizes = t.sizes(), strides = t.strides();
  const int64_t n = static_cast<int64_t>(c.perm.size());
  has_inner = false;
  for (int64_t k = c.b; k < n; ++k) has_inner |= sizes[c.perm[k]] != 1;
  return collapse(sizes, strides, c.perm, 0, c.a, so) && collapse(sizes, strides, c.perm, c.a, c.b, sc) &&
         collapse(sizes, strides, c.perm, c.b, n, si);
}

GroupView group_view(const at::Tensor& t, const Canonical& c) {
  GroupView g;
  int64_t si = 0;
  bool has_inner = false;
  g.ok = collapse3(t, c, g.so, g.sc, si, has_inner);
  g.si = has_inner ? si : 1;
  if (!g.ok) return g;
  if (c.v.channels_last) {
    g.ok = c.v.C <= 1 || g.sc == 1;
    g.sc = 1;
  } else {
    g.ok = c.v.I <= 1 || g.si == 1;
  }
  return g;
}

void fill_sizes(const at::Tensor& x, Canonical& c) {
  const int64_t n = static_cast<int64_t>(c.perm.size());
  c.v.O = 1;
  c.v.C = 1;
  c.v.I = 1;
  const at::IntArrayRef sizes = x.sizes();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t s = sizes[c.perm[k]];
    (k < c.a ? c.v.O : (k < c.b ? c.v.C : c.v.I)) *= s;
  }
  c.v.channels_last = c.v.I == 1;
}

}  // namespace

Canonical plan_canonical(const at::Tensor& x, at::IntArrayRef axis) {
  const int64_t nd = x.dim();
  const at::IntArrayRef sizes = x.sizes(), strides = x.strides();
  Canonical c;
  c.axes = normalize_axes(axis, nd);
  c10::SmallVector<bool, 8> is_feat(nd, false);
  for (int64_t a : c.axes) {
    is_feat[a] = true;
    c.feature_shape.push_back(sizes[a]);
  }

  // 1) Follow memory order: non-size-1 dims by decreasing stride. The features must form one run
  //    (in axis order, so the flat feature index matches the weight's row-major order).
  //    (A stable insertion sort: a handful of dims, and no buffer as std::stable_sort takes.)
  DimVec order;
  for (int64_t d = 0; d < nd; ++d) {
    if (sizes[d] == 1) continue;
    order.push_back(d);
    for (size_t k = order.size() - 1; k > 0 && strides[order[k - 1]] < strides[d]; --k) std::swap(order[k - 1], order[k]);
  }
  int64_t first = -1, last = -1;
  for (int64_t k = 0; k < static_cast<int64_t>(order.size()); ++k)
    if (is_feat[order[k]]) {
      if (first < 0) first = k;
      last = k;
    }
  bool run_ok = true;
  if (first >= 0) {
    for (int64_t k = first; k <= last; ++k) run_ok &= is_feat[order[k]];
    for (int64_t k = first + 1; run_ok && k <= last; ++k) run_ok &= order[k] > order[k - 1];
  }
  if (run_ok) {
    c.perm = order;
    if (first < 0) {  // every feature dim has size 1: C == 1
      c.a = 0;
      c.b = 0;
    } else {
      c.a = first;
      c.b = last + 1;
    }
    for (int64_t d = 0; d < nd; ++d)
      if (sizes[d] == 1) c.perm.push_back(d);
    fill_sizes(x, c);
    if (group_view(x, c).ok) return c;
  }

  // 2) The strides do not allow a view: plan a dense copy. Adjacent feature axes keep the
  //    input's own dim order (a plain .contiguous()); otherwise features go last.
  c.perm.clear();
  bool adjacent = true;
  for (size_t k = 1; k < c.axes.size(); ++k) adjacent &= c.axes[k] == c.axes[k - 1] + 1;
  if (adjacent) {
    for (int64_t d = 0; d < nd; ++d) c.perm.push_back(d);
    c.a = c.axes.front();
    c.b = c.axes.back() + 1;
  } else {
    for (int64_t d = 0; d < nd; ++d)
      if (!is_feat[d]) c.perm.push_back(d);
    c.a = static_cast<int64_t>(c.perm.size());
    for (int64_t d : c.axes) c.perm.push_back(d);
    c.b = nd;
  }
  fill_sizes(x, c);
  return c;
}

bool ghost_rows_apply(const Canonical& c, const at::Tensor& input) {
  if (!c.v.channels_last || c.a == 0 || input.size(0) < 1) return false;
  for (int64_t a : c.axes)
    if (a == 0) return false;
  // The first non-size-1 outer dim must be the batch dim (a size-1 batch has one ghost anyway).
  for (int64_t k = 0; k < c.a; ++k) {
    const int64_t d = c.perm[k];
    if (input.size(d) == 1) continue;
    return d == 0;
  }
  return false;
}

void set_ghost_rows(Canonical& c, const at::Tensor& input, int64_t ghosts) {
  TORCH_INTERNAL_ASSERT(ghost_rows_apply(c, input) && input.size(0) % ghosts == 0, "bn_cuda: ghost rows do not apply");
  c.v.G = ghosts;
  c.v.S = c.v.O / input.size(0);
}

bool group_strides(const at::Tensor& t, const Canonical& c, int64_t& so, int64_t& sc, int64_t& si) {
  bool has_inner = false;
  if (!collapse3(t, c, so, sc, si, has_inner)) return false;
  if (!has_inner) si = 1;
  return true;
}

at::Tensor expand_mask(const at::Tensor& mask, const at::Tensor& input, const char* name) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, "bn_cuda: ", name,
                   " must be a bool (or uint8 0/1) tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == input.device(), "bn_cuda: ", name, " is on ", mask.device(), " but input is on ",
              input.device());
  TORCH_CHECK(at::is_expandable_to(mask.sizes(), input.sizes()),
              "bn_cuda: ", name, " of shape ", shape_str(mask.sizes()), " does not broadcast to the input shape ",
              shape_str(input.sizes()));
  at::Tensor m = mask.expand(input.sizes());
  return m.scalar_type() == at::kBool ? m.view(at::kByte) : m;
}

Strided3 mask_strided3(const at::Tensor& mask, const at::Tensor& input, const Canonical& c, const char* name) {
  at::Tensor m = expand_mask(mask, input, name);
  Strided3 out;
  int64_t so = 0, sc = 0, si = 1;
  if (group_strides(m, c, so, sc, si) && (c.v.I <= 1 || si == 1)) {
    out.t = m;
    out.so = so;
    out.sc = sc;
    return out;
  }
  at::Tensor dense = dense_in_perm_order(m, c);
  dense.copy_(m);
  group_strides(dense, c, so, sc, si);
  out.t = dense;
  out.so = so;
  out.sc = sc;
  return out;
}

bool try_strided3(const at::Tensor& t, const Canonical& c, Strided3& out) {
  const GroupView g = group_view(t, c);
  if (!g.ok) return false;
  out.t = t;
  out.so = g.so;
  out.sc = g.sc;
  return true;
}

at::Tensor dense_in_perm_order(const at::Tensor& like, const Canonical& c) {
  std::vector<int64_t> sizes;
  for (int64_t d : c.perm) sizes.push_back(like.size(d));
  at::Tensor dense = at::empty(sizes, like.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<int64_t> inv(c.perm.size());
  for (size_t k = 0; k < c.perm.size(); ++k) inv[c.perm[k]] = static_cast<int64_t>(k);
  return dense.permute(inv);  // same shape as `like`, dense in perm order
}

Strided3 as_strided3(const at::Tensor& t, const Canonical& c) {
  Strided3 out;
  if (try_strided3(t, c, out)) return out;
  at::Tensor dense = dense_in_perm_order(t, c);
  dense.copy_(t);
  const bool ok = try_strided3(dense, c, out);
  TORCH_INTERNAL_ASSERT(ok, "bn_cuda: dense copy did not give a canonical view");
  return out;
}

}  // namespace bn_cuda
