// Canonicalization of any strided input with any set of feature axes into the kernels'
// (O, C, I) view, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>

#include <string>
#include <vector>

#include "bn_cuda/params.h"

namespace bn_cuda {

// How an input's dims map onto (O, C, I): perm orders the dims; perm[0:a] are the outer (reduced)
// dims, perm[a:b] the feature dims, perm[b:] the inner (reduced) dims. Size-1 dims may sit in any
// group; they never constrain strides.
// (Inline storage for up to 6 dims: planning a call allocates nothing for the usual ranks.)
using DimVec = c10::SmallVector<int64_t, 6>;
struct Canonical {
  DimVec axes;  // sorted, non-negative feature axes
  DimVec perm;
  int64_t a = 0, b = 0;
  View3 v;
  DimVec feature_shape;  // sizes of the feature dims, in axis order
};

// A tensor viewed as (O, C, I) with inner stride 1 (or I == 1 and feature stride 1).
struct Strided3 {
  at::Tensor t;  // keeps the storage alive; data_ptr() is element (0, 0, 0)
  int64_t so = 0, sc = 0;
  const void* data() const { return t.data_ptr(); }
  void* mutable_data() const { return t.data_ptr(); }
};

// Sorted feature axes; errors name the argument and the value received.
DimVec normalize_axes(at::IntArrayRef axis, int64_t ndim);

// Plan the view for `x` (no data is copied here).
Canonical plan_canonical(const at::Tensor& x, at::IntArrayRef axis);

// `t` (same shape as the planned input) as a Strided3: a view when its strides allow the planned
// layout, otherwise a dense copy in the planned dim order.
Strided3 as_strided3(const at::Tensor& t, const Canonical& c);

// A view of `t` as a Strided3 when possible; false when it would need a copy.
bool try_strided3(const at::Tensor& t, const Canonical& c, Strided3& out);

// Ghost batches (tf_keras's virtual_batch_size, sample n in ghost n % ghosts) as ghost rows of a
// channels-last view: possible when the planned view is channels-last and its outer group starts
// with the batch dim (dim 0). set_ghost_rows sets View3::G / S (asserting that it is possible).
bool ghost_rows_apply(const Canonical& c, const at::Tensor& input);
void set_ghost_rows(Canonical& c, const at::Tensor& input, int64_t ghosts);

// The (outer, feature, inner) element strides of `t` under the planned grouping, without the
// layout-class check; false when a group's dims do not collapse into one stride.
bool group_strides(const at::Tensor& t, const Canonical& c, int64_t& so, int64_t& sc, int64_t& si);

// A 0/1 mask (bool or uint8, broadcastable to `input`) as bytes viewed like the input: strides
// (so, sc) with inner stride 1 (any feature stride, e.g. 0 for a per-row mask); a dense byte copy
// in the planned dim order when the strides do not allow a view. Errors name `name`.
Strided3 mask_strided3(const at::Tensor& mask, const at::Tensor& input, const Canonical& c, const char* name);
// The checks of mask_strided3, then the mask expanded to the input's shape as bytes.
at::Tensor expand_mask(const at::Tensor& mask, const at::Tensor& input, const char* name);

// Dense (O, C, I) scratch laid out in the planned dim order, and its view with the original dim
// order (to copy into a user-visible tensor).
at::Tensor dense_in_perm_order(const at::Tensor& like, const Canonical& c);

std::string shape_str(at::IntArrayRef s);

}  // namespace bn_cuda
