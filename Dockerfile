# Builds and tests bn_cuda on an official CUDA-devel image with torch.
#   docker build -t bn_cuda .
#   docker run --gpus all --rm bn_cuda                 # test suite on the GPU
#   docker run --gpus all --rm bn_cuda ./scripts/bench.sh
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
FROM ${BASE}
WORKDIR /src
COPY . .
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    BN_CUDA_FORCE_CUDA=1 \
    BN_CUDA_PYTHON=python
RUN python -m pip install --no-cache-dir pytest numpy ninja pybind11 tqdm matplotlib rich onnx onnxscript onnxruntime \
 && MAX_JOBS=4 python setup.py build_ext --inplace
# The image's torch is used as is; tensorflow parity tests skip here (CI runs them on CPU).
ENV BN_CUDA_SKIP_BUILD=1
CMD ["./scripts/test.sh"]
