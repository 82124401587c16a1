#!/usr/bin/env bash
# A GPU session's checks in one command (the device tool runs it in the repository root):
# the CUDA tests, then the bf16 train-step benchmark (with compiled, reduce-overhead steps of
# the small workload: `--compile`). Logs and JSON go to $OUT (or here).
set -o pipefail
out=${OUT:-.}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)"
timeout 300 python3 -m pytest -p no:cacheprovider -q -x tests/test_devices.py tests/test_fused.py \
    tests/test_compute_copies.py \
    2>&1 | tee "$out/gpu_tests.txt" | tail -25
python3 benchmarks/gpu_train_step.py --reps "${REPS:-20}" --json "$out/gpu_train_step.json" \
    2>&1 | grep -v -i warn | tee "$out/gpu_train_step.txt"
