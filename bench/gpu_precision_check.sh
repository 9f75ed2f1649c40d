#!/usr/bin/env bash
# Mixed precision on the GPUs of this machine, as users run it: the seed command with --device 0,1
# (DataParallel over every GPU present; one GPU runs it unwrapped, and says so) in the default bf16, with
# --fp16 (fp16 autocast + GradScaler, the path of T4/V100/2080 Ti cards) and in fp32, a few hundred steps
# each on 《西游记》 chapters 1-95; prints their training and held-out losses side by side. First it checks
# that every DataParallel replica runs in the precision train.py announces (autocast is thread-local).
# Usage (from the project root, torch with CUDA installed):
#   OUT=gpu_precision bash bench/gpu_precision_check.sh [xiyouji.txt]
# Env: PYTHON (default python3), EPOCHS (default 2: about 350 steps of batch 8 at stride 512),
#      MODEL_CONFIG (default config/model_config_small.json).
# On the lent device machine ../shared does not travel: copy the corpus into an ignored folder, carry it, pass it.
set -uo pipefail
cd "$(dirname "$0")/.."
novel="${1:-../shared/corpus/xiyouji.txt}"
out="${OUT:-gpu_precision}"
py="${PYTHON:-python3}"
work="$out/data"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
gpus=$($py -c "import torch; print(torch.cuda.device_count())")
devices=$($py -c "print(','.join(map(str, range(max(1, $gpus)))))")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
echo "GPUs: $gpus; --device $devices" | tee -a "$out/gpus.txt"

$py - <<'PY' 2>&1 | tee "$out/replica_precision.txt"
# Each replica's first projection reports the dtype it computed in, from its own thread.
import threading, torch
from gpt2zh.devices import bf16_supported
from gpt2zh.model import CausalLMLoss, build_model, load_config
seen = []
config = load_config("config/model_config_tiny.json")
for dtype in [torch.bfloat16 if bf16_supported(torch.device("cuda")) else None, torch.float16, None]:
    seen.clear()
    model = build_model(config).cuda()
    model.transformer.h[0].attn.c_attn.register_forward_hook(
        lambda m, i, o: seen.append((threading.current_thread().name, o.dtype)))
    wrapped = torch.nn.DataParallel(CausalLMLoss(model, dtype), device_ids=list(range(torch.cuda.device_count())))
    batch = torch.randint(5, 13317, (2 * torch.cuda.device_count(), 32), device="cuda")
    wrapped(batch, batch).mean().backward()
    expected = dtype or torch.float32
    ok = all(d == expected for _, d in seen)
    print(f"asked {expected}: replicas computed in {sorted({str(d) for _, d in seen})} "
          f"({len(seen)} replicas) -> {'OK' if ok else 'WRONG'}")
PY

$py txt_to_json.py "$novel" --eval_articles 5 --output "$work/input.json" --eval_output "$work/eval_input.json" || exit 1
$py clr_ctrl.py --input "$work/input.json" --output "$work/train.json" || exit 1
$py clr_ctrl.py --input "$work/eval_input.json" --output "$work/eval.json" || exit 1

run() {  # name, extra flags of train.py
  name=$1; shift
  start=$(date +%s)
  $py train.py --model_config "${MODEL_CONFIG:-config/model_config_small.json}" --tokenizer_path cache/vocab_small.txt \
    --raw_data_path "$work/train.json" --tokenized_data_path "$work/tokenized/" --raw --num_pieces 100 \
    --epochs "${EPOCHS:-2}" --batch_size 8 --stride 512 --log_step 50 --device "$devices" \
    --eval_data_path "$work/eval.json" --output_dir "$out/$name/" --writer_dir "$out/$name/tb/" --overwrite "$@" \
    2>&1 | tee "$out/$name.log"
  echo "$name $(( $(date +%s) - start ))" >> "$out/wall_s.txt"
}
rm -f "$out/wall_s.txt"
run bf16
run fp16 --fp16
run fp32 --precision fp32

$py - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
out = sys.argv[1]
walls = dict(line.split() for line in open(f"{out}/wall_s.txt"))
print(f"{'run':<6}{'precision (as train.py printed it)':<70}{'last train loss':>16}{'held-out':>10}{'wall s':>8}")
for name in ("bf16", "fp16", "fp32"):
    rows = [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")]
    said = next(line.strip() for line in open(f"{out}/{name}.log") if line.startswith("precision:"))
    train = [r["train_loss"] for r in rows if "train_loss" in r][-1]
    held_out = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    print(f"{name:<6}{said:<70}{train:>16.4f}{held_out:>10.4f}{walls.get(name, '?'):>8}")
PY
