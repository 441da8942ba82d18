// What ops_cuda.cpp takes from c10/cuda, for the host emulation (BN_CUDA_EMULATE, cuda_emu.h):
// the current stream is the null stream, the multiprocessor count is the emulation's, and a
// failed launch raises with the emulation's message. No c10::cuda symbol is defined or called.
#pragma once

#include <cuda_runtime_api.h>

#include <c10/util/Exception.h>

// (declared here too: ops_cuda.cpp includes torch, so not cuda_emu.h, which redefines CUDA's keywords)
namespace bn_emu {
int sm_count();
const char* last_message();
}  // namespace bn_emu

#define C10_CUDA_CHECK(EXPR)                                                                      \
  do {                                                                                            \
    const cudaError_t bn_emu_err_ = (EXPR);                                                       \
    TORCH_CHECK(bn_emu_err_ == cudaSuccess, "bn_cuda (emulated CUDA kernels): launch failed: ", \
                ::bn_emu::last_message());                                                        \
  } while (0)
