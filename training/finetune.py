#!/usr/bin/env python
"""Fine-tune MedDINOv3 for CT segmentation on an nnU-Net raw dataset (thin wrapper; see
`meddinov3_hf.finetuning`). Every `transformers.TrainingArguments` flag works, e.g.

    python training/finetune.py --dataset Dataset001 --model meddinov3-vitb16 --fold 0 \\
        --output_dir runs/fold0 --max_steps 250000 --per_device_train_batch_size 2 --bf16 \\
        --eval_strategy steps --save_strategy steps --eval_steps 2500 --save_steps 2500 \\
        --load_best_model_at_end --dataloader_num_workers 8

It runs unchanged under `accelerate launch` and `torchrun`.
"""

import sys

import meddinov3_hf  # noqa: F401  (registers the model with transformers' Auto classes)
from meddinov3_hf.finetuning import run_finetune

if __name__ == "__main__":
    sys.exit(run_finetune(sys.argv[1:]))
