#!/usr/bin/env bash
# CPU preset: a 6.5M-parameter model on 《西游记》 chapters 1-95 in under 30 minutes on 2 cores,
# held-out loss on chapters 96-100, then 10 samples of 1000 characters, scored.
# Usage: bash cpu_preset.sh [novel.txt]   (default: ../shared/corpus/xiyouji.txt)
# Its files go to data/cpu_preset/, model/cpu_preset/ and mnt/cpu_preset/.
set -euo pipefail
cd "$(dirname "$0")"
novel="${1:-../shared/corpus/xiyouji.txt}"
work=data/cpu_preset

python txt_to_json.py "$novel" --eval_articles 5 --output "$work/input.json" --eval_output "$work/eval_input.json"
python clr_ctrl.py --input "$work/input.json" --output "$work/train.json"
python clr_ctrl.py --input "$work/eval_input.json" --output "$work/eval.json"
python cache/make_vocab.py --from_json "$work/train.json" --output "$work/vocab.txt"
# Two training processes of half the cores each (torchrun, gloo), 4 windows each = the batch of 8: on 2 cores
# they train as fast as one process of 2 threads or faster, and steadier (docs/RESULTS.md).
threads=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))
OMP_NUM_THREADS=$threads python -m torch.distributed.run --standalone --nproc_per_node 2 train.py \
  --model_config config/model_config_cpu.json --tokenizer_path "$work/vocab.txt" \
  --raw_data_path "$work/train.json" --tokenized_data_path "$work/tokenized/" --raw --num_pieces 1 \
  --stride 256 --batch_size 4 --epochs 12 --lr 1e-3 --warmup_steps 100 --lr_schedule cosine \
  --weight_decay 0.1 --input_noise 0.1 --log_step 50 \
  --device cpu --eval_data_path "$work/eval.json" --output_dir model/cpu_preset/ \
  --writer_dir model/cpu_preset/tensorboard/ --overwrite
python eval.py --pretrained_model model/cpu_preset/final_model --raw_data_path "$work/eval.json" \
  --tokenized_data_path "$work/tokenized_eval/" --raw --num_pieces 1 --stride 128 --log_step 20 --device cpu \
  --output_dir model/cpu_preset/
python generate.py --model_path model/cpu_preset/final_model --device cpu --length 1000 --nsamples 10 \
  --prefix "[CLS]却说那大圣" --topk 40 --topp 1 --temperature 1.0 --repetition_penalty 1.25 --seed 1 \
  --save_samples --save_samples_path mnt/cpu_preset/
python score_samples.py mnt/cpu_preset/samples.txt --json model/cpu_preset/sample_scores.json
