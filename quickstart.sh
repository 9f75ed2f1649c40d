#!/usr/bin/env bash
# The whole pipeline on CPU in a few minutes: a small model trained on a short text, then samples in mnt/.
# Usage: bash quickstart.sh [novel.txt]   (default: examples/sample_novel.txt, written for this project)
# Everything goes to its own folders (data/quickstart/, model/quickstart/), so your own data and models
# in data/ and model/ are left alone.
set -euo pipefail
cd "$(dirname "$0")"
novel="${1:-examples/sample_novel.txt}"
work=data/quickstart

python txt_to_json.py "$novel" --output "$work/input.json"
python clr_ctrl.py --input "$work/input.json" --output "$work/train.json"
python train.py --model_config config/model_config_quick.json --raw_data_path "$work/train.json" \
  --tokenized_data_path "$work/tokenized/" --raw --num_pieces 1 --min_length 64 --stride 8 \
  --epochs 5 --batch_size 8 --lr 1e-3 --warmup_steps 20 --log_step 50 --device cpu \
  --output_dir model/quickstart/ --writer_dir model/quickstart/tensorboard/ --overwrite
python generate.py --model_path model/quickstart/final_model --device cpu --length 120 --nsamples 3 \
  --prefix "[CLS]阿福" --save_samples --save_samples_path ./mnt/ --seed 0
echo "quickstart done: samples in mnt/samples.txt, model in model/quickstart/final_model"
