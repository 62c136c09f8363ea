#!/usr/bin/env bash
# tunelab on a GPU, in under 5 minutes on one GPU:
#   1. the family matrix (tests/training/test_families.py) on CUDA: packed loss and LoRA
#      gradients equal stock transformers, bf16 training, generation and merge, every family;
#   2. a short throughput comparison against TRL's packed bf16 SFTTrainer on CUDA, on the
#      Qwen3-0.6B and Gemma-3-270M shapes (random weights; tokenizer: SmolLM2's when it is
#      installed, else the test suite's tiny BPE one, so no download is needed);
#   3. where the machine has 2 GPUs or more: two processes under torchrun, one GPU each (NCCL),
#      matching one process (data parallel and FSDP); skipped with a message on one GPU.
# Usage: bash benchmarks/gpu_check.sh    (needs the test and bench extras: pytest, trl, psutil)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

python - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here; this script checks tunelab on a GPU.")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
PY

echo "== 1. family matrix on CUDA"
TUNELAB_TEST_DEVICE=cuda timeout 150 python -m pytest tests/training/test_families.py -q -x \
    -p no:cacheprovider

echo "== 2. throughput: tunelab vs TRL on CUDA"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tokenizer_args=()
if ! python -c "from tunelab.models import resolve_model; resolve_model(None)" 2>/dev/null; then
    python - "$work/tokenizer" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from conftest import build_tiny_model  # noqa: E402

build_tiny_model(Path(sys.argv[1]), vocab_size=2048)
PY
    tokenizer_args=(--tokenizer "$work/tokenizer")
fi
timeout 150 python benchmarks/train_throughput.py --device cuda --systems trl,tunelab \
    --shapes qwen3-0.6b,gemma3-270m --steps 6 --batch 4 --max-length 512 --heldout 4 \
    --cooldown 0 "${tokenizer_args[@]}"

echo "== 3. two processes, one GPU each (torchrun, NCCL)"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
    echo "gpu_check: skipped, $gpus GPU here; two processes need a GPU each (2 or more GPUs)."
else
    # the processes tests launch torchrun --nproc_per_node 2: on a GPU machine each process takes
    # cuda:LOCAL_RANK and they join over NCCL (the tests' names say gloo: their CPU run)
    timeout 420 python -m pytest tests/test_training_processes.py -q -x -p no:cacheprovider \
        -k "two_gloo_processes_match_one_process or fsdp_over_two_gloo_processes"
fi
