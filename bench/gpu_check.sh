#!/usr/bin/env bash
# The GPU checks, as one run: versions, the Qwen2.5-VL forward bench in fp32 and bf16 (bf16 numerics
# against the fp32 reference), then the fp32 parity tests with jax on the GPU (torch stays on the CPU).
#   bash bench/gpu_check.sh [LOG_DIR]
# Needs a python3 with jax[cuda], torch (CUDA), transformers, flax, pytest; run from the repo root.
# Every step runs even if an earlier one fails; the exit status says whether all passed.
# REPEATS (default 2) sets the fp32 bench's rounds, BF16_REPEATS (default REPEATS) the bf16 one's;
# TEST_TIMEOUT (default 240 s) bounds the parity tests.
set -uo pipefail
fail=0
LOG=${1:-out/gpu_check}
mkdir -p "$LOG"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { echo "== $1 ($(date +%T))"; }

step versions
nvidia-smi -L || true
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
'| torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', '| transformers', transformers.__version__)" || fail=1

step "bench fp32"
python3 bench/bench_qwen2_vl.py --repeats "${REPEATS:-2}" --calls 20 --save-logits /tmp/jaxvlm_logits \
  2>&1 | tee "$LOG/bench_fp32.txt" || fail=1
step "bench bf16"
python3 bench/bench_qwen2_vl.py --repeats "${BF16_REPEATS:-${REPEATS:-2}}" --calls 20 --dtype bfloat16 --save-logits /tmp/jaxvlm_logits \
  2>&1 | tee "$LOG/bench_bf16.txt" || fail=1

step "fp32 parity tests, jax on its default backend (the GPU where there is one)"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_qwen2_vl_parity.py \
  tests/test_llava_parity.py 2>&1 | tee "$LOG/parity.txt" | tail -25 || fail=1
step "done ($([ $fail = 0 ] && echo 'all steps passed' || echo 'a step FAILED: see above'))"
exit $fail
