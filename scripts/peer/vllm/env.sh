# Source this on the GPU machine before running vLLM from /tmp/site:
#   source scripts/peer/vllm/env.sh
# Every variable here is explained in scripts/peer/vllm/README.md ("Environment").
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# FlashInfer is not carried: use vLLM's own top-k/top-p path (only requests that set
# top_k/top_p ever reach the FlashInfer sampler; greedy and plain temperature don't).
export VLLM_USE_FLASHINFER_SAMPLER=0
# No network there: never try the usage-stats endpoint, the HF hub, or a route lookup.
export VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export VLLM_HOST_IP=127.0.0.1
# The workplace asks for NVLink multicast off on its GPU hosts; harmless with one GPU.
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1
