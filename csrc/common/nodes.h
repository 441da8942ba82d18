// What the hand-written autograd nodes (autograd.cpp: the functional ops; keras_step.cpp: the Keras
// training step) share: the node handle of this torch, node construction, and compiled autograd's
// opaque call of a node's backward.
#pragma once

#include <torch/autograd.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace bn_cuda {

// Node handles: c10::intrusive_ptr<Node> in recent torch (2.13, 2.14: pytorch#181782, April 2026),
// std::shared_ptr<Node> in earlier releases (the GPU machine's 2.11); the node code is written
// against either.
using NodePtr = decltype(std::declval<torch::autograd::Node&>().getptr());
constexpr bool kIntrusiveNodes = std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>;

template <typename N, typename... Args>
auto new_node(Args&&... args) {
  if constexpr (kIntrusiveNodes)
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  else
    return std::make_shared<N>(std::forward<Args>(args)...);
}

// torch's SavedVariable refuses an inference tensor (made under torch.inference_mode()), but only
// when the node is built, after the forward ran and moved the running statistics. The same
// refusal, first, naming the tensor: a failing call changes no running statistic.
inline void check_savable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.defined() || !t.is_inference(), "bn_cuda: ", name,
              " is an inference tensor (created under torch.inference_mode()), and inference tensors cannot be "
              "saved for backward, which this call needs (a tensor among its inputs requires grad); clone() it "
              "outside inference mode, or run the call under torch.inference_mode() or torch.no_grad(). Nothing "
              "was updated.");
}
inline void check_savable(const std::optional<at::Tensor>& t, const char* name) {
  if (t.has_value()) check_savable(*t, name);
}

// A node whose saved tensors are an array of K SavedVariables (none of them an output of the node)
// plus constants: their release, and compiled autograd's collection of both (the constants through
// Derived::collect_constants).
template <typename Derived, size_t K>
struct SavedArrayNode : torch::autograd::Node {
  std::array<torch::autograd::SavedVariable, K> saved_;

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& sv : saved_) sv.reset_data();
  }

  // (Both constnesses, no `override`: torch made Node::compiled_args const in 2025; whichever the
  // base declares is the one overridden.)
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) { collect(args); }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const { collect(args); }

 protected:
  std::array<at::Tensor, K> unpack_all() {
    std::array<at::Tensor, K> t;
    for (size_t k = 0; k < K; ++k) t[k] = saved_[k].unpack();
    return t;
  }

  // Which of the node's first N edges (default: one per saved tensor) the running backward needs.
  template <size_t N = K>
  std::array<bool, N> needs() {
    std::array<bool, N> n{};
    for (size_t k = 0; k < N; ++k) n[k] = task_should_compute_output(k);
    return n;
  }

 private:
  void collect(torch::dynamo::autograd::CompiledNodeArgs& args) const {
    for (const auto& sv : saved_) args.collect(sv, /*is_output=*/false);
    static_cast<const Derived*>(this)->collect_constants(args);
  }
};

// Compiled autograd (torch._dynamo.compiled_autograd): a node's backward handed to the compiler as
// an opaque function of IValues (the saved tensors, already swapped for the compiler's proxies by
// the caller, then the node's constants), as torch's CppNode does for C++ custom Functions; it runs
// eagerly inside the compiled graph.
inline torch::autograd::variable_list call_opaque(const std::string& name,
                                                  torch::dynamo::autograd::functional_apply_t fn,
                                                  const std::vector<c10::IValue>& args,
                                                  const torch::autograd::variable_list& inputs,
                                                  const torch::autograd::edge_list& next_edges,
                                                  torch::dynamo::autograd::SwapSavedVariables& saved) {
  std::vector<at::TypePtr> schema;
  schema.reserve(args.size());
  for (const auto& iv : args) schema.emplace_back(iv.isTensor() ? at::TensorType::get() : iv.type());
  const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
  const auto output_metadata =
      torch::dynamo::autograd::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          torch::dynamo::autograd::get_input_metadata(next_edges));
  const std::string bound = py->bind_function(saved.get_py_compiler(), name, std::move(fn), schema,
                                              /*is_custom_function=*/true, /*is_traceable=*/false);
  return py->call_function(saved.get_py_compiler(), "apply_functional", bound, inputs, args, output_metadata);
}

// Forward-mode AD: whether any of the tensors carries a tangent (grad mode does not matter).
inline bool has_forward_grad(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
inline bool has_forward_grad(const std::optional<at::Tensor>& t) { return t.has_value() && has_forward_grad(*t); }

template <typename... T>
bool any_forward_grad(const T&... tensors) {
  return (has_forward_grad(tensors) || ...);
}

// For a path with no forward-mode formula (the Keras step): say so rather than drop the tangents.
template <typename... T>
void check_no_forward_ad(const T&... tensors) {
  TORCH_CHECK_NOT_IMPLEMENTED(!any_forward_grad(tensors...),
                              "bn_cuda: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
                              "supported by bn_cuda.BatchNormalization's fused ghost-batch / renorm / "
                              "adjustment / mask training step; use reverse mode, or fused=False (plain "
                              "batch norm and the functional ops support it)");
}

}  // namespace bn_cuda
