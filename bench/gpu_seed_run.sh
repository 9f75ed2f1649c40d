#!/usr/bin/env bash
# The seed's full run on one GPU: seed config (82M), 15 epochs of 《西游记》 chapters 1-95, stride 512,
# batch 8; held-out loss on chapters 96-100; then the reference generation, scored.
# Reports wall time, tokens/s, MFU against the GPU's dense bf16 peak, training and held-out loss.
# Usage (from the project root, torch with CUDA installed): OUT=results bash bench/gpu_seed_run.sh [xiyouji.txt]
# On the lent device machine ../shared does not travel: copy the corpus into an ignored folder of the
# checkout, carry it, and pass its path.
set -euo pipefail
cd "$(dirname "$0")/.."
novel="${1:-../shared/corpus/xiyouji.txt}"
out="${OUT:-gpu_results}"
work="$out/data"
peak_tflops="${PEAK_TFLOPS:-989}"  # H100/H200 SXM dense bf16
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"

python txt_to_json.py "$novel" --eval_articles 5 --output "$work/input.json" --eval_output "$work/eval_input.json"
python clr_ctrl.py --input "$work/input.json" --output "$work/train.json"
python clr_ctrl.py --input "$work/eval_input.json" --output "$work/eval.json"
start=$(date +%s)
python train.py --model_config config/model_config_small.json --tokenizer_path cache/vocab_small.txt \
  --raw_data_path "$work/train.json" --tokenized_data_path "$work/tokenized/" --raw --num_pieces 100 \
  --epochs 15 --batch_size 8 --stride 512 --log_step 200 --device 0 --compile \
  --eval_data_path "$work/eval.json" --output_dir "$out/model/" --writer_dir "$out/tb/" --save_minutes 1000 \
  --overwrite 2>&1 | tee "$out/train.log"
end=$(date +%s)
python generate.py --device 0 --length 1000 --tokenizer_path cache/vocab_small.txt --model_path "$out/model/final_model" \
  --prefix "[CLS]悟空大喝一声" --topp 1 --temperature 1.0 --seed 1 --save_samples --save_samples_path "$out/" \
  2>&1 | tee "$out/generate.log"
python score_samples.py "$out/samples.txt" --json "$out/sample_scores.json" | tee "$out/sample_scores.txt"
python - "$out" "$((end - start))" "$peak_tflops" <<'PY' | tee "$out/summary.txt"
import json, sys
out, wall, peak = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) * 1e12
rows = [json.loads(line) for line in open(f"{out}/model/metrics.jsonl")]
speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first window includes compilation
params, layers, width, n_ctx = 81894144 - 1024 * 768, 10, 768, 1024
flops_per_token = 6 * params + 12 * layers * width * n_ctx
tokens_per_s = sum(speeds) / len(speeds)
print(f"train.py wall time (start-up, tokenizing, compiling, evaluating, saving included): {wall} s")
print(f"tokens/s (mean over log windows): {tokens_per_s:,.0f}; MFU {100 * tokens_per_s * flops_per_token / peak:.1f}% "
      f"of {peak / 1e12:.0f} TFLOP/s")
print(f"final training loss: {[r['train_loss'] for r in rows if 'train_loss' in r][-1]:.4f}")
print(f"held-out loss (chapters 96-100) per epoch: {[round(r['eval_loss'], 4) for r in rows if 'eval_loss' in r]}")
PY
