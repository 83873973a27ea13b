"""Fine-tune Stable Diffusion with SeLoRA adapters, or a baseline method (argument parsing only; the work is in
selora_kernels.experiments.finetune).

    python -m python.finetune                       # tiny pipeline + synthetic X-rays, ~2-4 min on 2 CPU cores
    python -m python.finetune --pretrained /models/sd15 --dataset iu_xray --data-dir /data/iu \
        --resolution 224 --epochs 10 --batch-size 8
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from selora_kernels.experiments.finetune import FinetuneOptions, rank_summary, run_finetune
from selora_kernels.experiments.options import options_parser, parse_options, report_user_errors


def build_parser():
    return options_parser(FinetuneOptions, prog="python -m python.finetune", description=__doc__.split("\n\n")[0])


def main(argv=None) -> int:
    options = parse_options(FinetuneOptions, argv, build_parser())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("selora_kernels.expansion.controller").setLevel(logging.WARNING)  # summary at the end
    return report_user_errors(lambda: finetune(options))


def finetune(options: FinetuneOptions) -> int:
    began = time.perf_counter()
    result = run_finetune(options)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # multi-process run (torchrun / accelerate launch): the first process reports
    print(f"\n{result.steps} steps in {time.perf_counter() - began:.0f} s; best validation loss "
          f"{result.best_validation_loss:.5f}")
    print(rank_summary(result.ranks))
    kohya = "kohya/, " if (Path(result.output_dir) / "kohya").is_dir() else ""
    print(f"outputs in {result.output_dir}: train_log.csv, expansions.csv, rank_heatmap.png, "
          f"adapter.safetensors, peft_lora/, {kohya}best/, checkpoints/, tensorboard/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
