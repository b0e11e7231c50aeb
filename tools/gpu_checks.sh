#!/usr/bin/env bash
# The CUDA checks and figures in one run, on a machine with a CUDA GPU (nothing is downloaded):
#   bash tools/gpu_checks.sh [OUT]        outputs in OUT (default: gpu_checks/), a summary at the end
# 1. tests/test_cuda.py: two CUDA runs bit-identical, SIGTERM + rerun bit-exact (float32, and float16 with its
#    loss scaler), the deterministic attention core, the precision that amp_dtype=auto picks;
# 2. the cost of --deterministic, the official DINO-4scale R50 at 800x1333, batch 2 (benchmark's
#    train_ratio_deterministic row; random backbone weights: nothing is downloaded);
# 3. the chaos scoreboard on CUDA: 6 kills of a one-epoch demo run on 400 generated images.
set -u
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: tools/gpu_checks.sh needs a CUDA GPU, and torch sees none on this machine" >&2
    exit 2
fi
mkdir -p "${1:-gpu_checks}"
out=$(cd "${1:-gpu_checks}" && pwd)  # absolute: the checks run from the repository root
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    >> "$out/gpu.txt"

python -m pytest -q -p no:xdist -o addopts= tests/test_cuda.py > "$out/tests.txt" 2>&1
tests=$?
python -m tools.benchmark -c config/DINO/DINO_4scale.py --options backbone_weights=None --size 800 1333 \
    --batch 2 --runs 5 --device cuda --json "$out/benchmark.json" > "$out/benchmark.md" 2> "$out/benchmark.err"
benchmark=$?
python -m tools.chaos --kills 6 --seed 1 -c config/DINO/DINO_demo.py --coco_path "$out/synthetic" \
    --workdir "$out/chaos" --options epochs=1 synthetic_num_train=400 synthetic_num_val=50 -- --device cuda \
    > "$out/chaos.txt" 2>&1
chaos=$?

cat "$out/gpu.txt"
echo "tests (exit $tests): $(tail -n 1 "$out/tests.txt")"
echo "benchmark (exit $benchmark):"
grep -E "training step|cost of --deterministic|eval forward, batch" "$out/benchmark.md"
echo "chaos (exit $chaos):"
tail -n 4 "$out/chaos.txt"
exit $((tests || benchmark || chaos))
