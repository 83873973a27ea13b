"""Fine-tune Stable Diffusion with SeLoRA adapters (argument parsing only; the work is in
selora_kernels.training).

    python -m python.finetune                       # tiny pipeline + synthetic X-rays, ~2-4 min on 2 CPU cores
    python -m python.finetune --pretrained /models/sd15 --dataset iu_xray --data-dir /data/iu \
        --resolution 224 --epochs 10 --batch-size 8
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from selora_kernels.baselines import register_baselines
from selora_kernels.training.finetune import FinetuneOptions, rank_summary, run_finetune
from selora_kernels.training.methods import METHODS

register_baselines()  # --method lora|dylora|adalora next to selora


def build_parser() -> argparse.ArgumentParser:
    defaults = FinetuneOptions()
    p = argparse.ArgumentParser(prog="python -m python.finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained", default=None,
                   help="local diffusers StableDiffusionPipeline folder (default: a tiny pipeline from configs)")
    p.add_argument("--dataset", choices=["synthetic", "folder", "iu_xray", "montgomery"], default=defaults.dataset)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--caption-column", default=defaults.caption_column, help="caption column (--dataset folder)")
    p.add_argument("--on-bad-image", choices=["skip", "fail"], default=defaults.on_bad_image,
                   help="missing/corrupt images: report and skip, or stop")
    p.add_argument("--output-dir", default=defaults.output_dir)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny pipeline), 224 otherwise")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--method", choices=sorted(METHODS), default=defaults.method)
    p.add_argument("--threshold", type=float, default=defaults.threshold, help="lambda of the FI-Ratio test")
    p.add_argument("--interval", type=int, default=defaults.interval,
                   help="t: steps between expansion tests (also the log interval)")
    p.add_argument("--max-rank", type=int, default=None)
    p.add_argument("--trial", choices=["same_backward", "reference_code"], default=defaults.trial)
    p.add_argument("--targets", nargs="+", default=defaults.targets,
                   help="preset (reference_code, all_linear) or module name patterns")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=defaults.mixed_precision)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--resume", default=None, help="a checkpoint folder or a previous --output-dir")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--synthetic-count", type=int, default=defaults.synthetic_count)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("selora_kernels.expansion.controller").setLevel(logging.WARNING)  # summary at the end
    options = FinetuneOptions(
        output_dir=args.output_dir, pretrained=args.pretrained, dataset=args.dataset, data_dir=args.data_dir,
        caption_column=args.caption_column, on_bad_image=args.on_bad_image, synthetic_count=args.synthetic_count,
        epochs=args.epochs, batch_size=args.batch_size, resolution=args.resolution, lr=args.lr,
        method=args.method, threshold=args.threshold, interval=args.interval, max_rank=args.max_rank,
        trial=args.trial, targets=args.targets, mixed_precision=args.mixed_precision, seed=args.seed,
        resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress, threads=args.threads)
    began = time.perf_counter()
    result = run_finetune(options)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # multi-process run (torchrun / accelerate launch): the first process reports
    print(f"\n{result.steps} steps in {time.perf_counter() - began:.0f} s; best validation loss "
          f"{result.best_validation_loss:.5f}")
    print(rank_summary(result.ranks))
    print(f"outputs in {result.output_dir}: train_log.csv, expansions.csv, rank_heatmap.png, "
          f"adapter.safetensors, peft_lora/, best/, checkpoints/, tensorboard/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
