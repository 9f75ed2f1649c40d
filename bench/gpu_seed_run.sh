#!/usr/bin/env bash
# The seed's full run on one GPU: seed config (82M), 15 epochs of 《西游记》 chapters 1-95, stride 512,
# batch 8; held-out loss on chapters 96-100; then the reference generation (10 x 1000), scored.
# Reports wall time, tokens/s, MFU against the GPU's dense bf16 peak (and against a measured matmul),
# final training and held-out loss.
# Usage (from the project root, torch with CUDA installed):
#   OUT=gpu_results bash bench/gpu_seed_run.sh [xiyouji.txt]
# Env: PYTHON (default python3), EPOCHS (default 15), PEAK_TFLOPS (default 989, H100/H200 SXM dense bf16),
#      COMPILE (default 1: --compile, falling back to eager if compiling fails),
#      MODEL_CONFIG (default config/model_config_small.json; a smaller one checks this script quickly).
# On the lent device machine ../shared does not travel: copy the corpus into an ignored folder of the
# checkout, carry it, and pass its path.
set -uo pipefail
cd "$(dirname "$0")/.."
novel="${1:-../shared/corpus/xiyouji.txt}"
out="${OUT:-gpu_results}"
py="${PYTHON:-python3}"
epochs="${EPOCHS:-15}"
peak_tflops="${PEAK_TFLOPS:-989}"
work="$out/data"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py - <<'PY' | tee -a "$out/gpu.txt"
import sys, torch, transformers
sys.path.insert(0, "bench")
from common import matmul_peak
print(f"torch {torch.__version__}, transformers {transformers.__version__}; "
      f"measured bf16 matmul 8192^3: {matmul_peak(torch.bfloat16, 8192, 10, 'cuda') / 1e12:.0f} TFLOP/s")
PY

$py txt_to_json.py "$novel" --eval_articles 5 --output "$work/input.json" --eval_output "$work/eval_input.json" || exit 1
$py clr_ctrl.py --input "$work/input.json" --output "$work/train.json" || exit 1
$py clr_ctrl.py --input "$work/eval_input.json" --output "$work/eval.json" || exit 1

train() {  # extra flags of train.py
  $py train.py --model_config "${MODEL_CONFIG:-config/model_config_small.json}" --tokenizer_path cache/vocab_small.txt \
    --raw_data_path "$work/train.json" --tokenized_data_path "$work/tokenized/" --raw --num_pieces 100 \
    --epochs "$epochs" --batch_size 8 --stride 512 --log_step 100 --device 0 \
    --eval_data_path "$work/eval.json" --output_dir "$out/model/" --writer_dir "$out/tb/" --overwrite "$@" \
    2>&1 | tee "$out/train.log"
}
start=$(date +%s)
if [ "${COMPILE:-1}" = 1 ]; then
  train --compile || { echo "training with --compile failed; again without it" | tee "$out/compile_failed.txt"
                       start=$(date +%s); train || exit 1; }
else
  train || exit 1
fi
end=$(date +%s)

$py generate.py --device 0 --length 1000 --nsamples 10 --tokenizer_path cache/vocab_small.txt \
  --model_path "$out/model/final_model" --prefix "[CLS]悟空大喝一声" --topp 1 --temperature 1.0 --seed 1 \
  --save_samples --save_samples_path "$out/" 2>&1 | tee "$out/generate.log"
$py score_samples.py "$out/samples.txt" --json "$out/sample_scores.json" | tee "$out/sample_scores.txt"
$py - "$out" "$((end - start))" "$peak_tflops" <<'PY' | tee "$out/summary.txt"
import json, sys
sys.path.insert(0, "bench")
from common import flops_per_token
from gpt2zh.model import build_model, load_config
out, wall, peak = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) * 1e12
rows = [json.loads(line) for line in open(f"{out}/model/metrics.jsonl")]
speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first window includes compilation
flops_per_token = flops_per_token(build_model(load_config(f"{out}/model/final_model/config.json")))
tokens_per_s = sum(speeds) / len(speeds)
print(f"train.py wall time (start-up, tokenizing, compiling, evaluating, saving included): {wall} s")
print(f"tokens/s (mean over log windows after the first): {tokens_per_s:,.0f}; "
      f"MFU {100 * tokens_per_s * flops_per_token / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s "
      f"({tokens_per_s * flops_per_token / 1e12:.0f} TFLOP/s achieved)")
print(f"final training loss: {[r['train_loss'] for r in rows if 'train_loss' in r][-1]:.4f}")
print(f"held-out loss (chapters 96-100) per epoch: {[round(r['eval_loss'], 4) for r in rows if 'eval_loss' in r]}")
PY
