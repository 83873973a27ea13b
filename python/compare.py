"""Reproduce the comparison in one command: fine-tune SeLoRA (per lambda), LoRA, DyLoRA and AdaLoRA on the same
data and seed, generate the evaluation prompts over 3 seeds, score FID-64/192/2048 + CLIP, write the report.
Argument parsing only; the work is in selora_kernels.evaluation.comparison.

    python -m python.compare --stand-in-eval-models --max-steps 8 --steps 5     # tiny smoke run, CPU
    python -m python.compare --pretrained /models/sd15 --dataset iu_xray --data-dir /data/iu --epochs 10 \
        --thresholds 1.0 1.1 1.3 --inception-weights /w/weights-inception-2015-12-05-6726825d.pth \
        --clip-model /w/clip-vit-large-patch14 --device cuda
"""
from __future__ import annotations

import argparse
import sys

from selora_kernels.evaluation.comparison import KNOWN_METHODS, CompareOptions, run_comparison
from selora_kernels.evaluation.metrics import MissingWeightsError


def build_parser() -> argparse.ArgumentParser:
    d = CompareOptions()
    p = argparse.ArgumentParser(prog="python -m python.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--methods", default=",".join(KNOWN_METHODS), help="comma-separated subset of " + ",".join(KNOWN_METHODS))
    p.add_argument("--thresholds", type=float, nargs="+", default=list(d.thresholds),
                   help="SeLoRA lambdas, one run each (Table 3: 1.0 1.1 1.3)")
    p.add_argument("--pretrained", default=None, help="local diffusers folder (default: the tiny pipeline)")
    p.add_argument("--dataset", choices=["synthetic", "folder", "iu_xray", "montgomery"], default=d.dataset)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic-count", type=int, default=d.synthetic_count)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--interval", type=int, default=d.interval, help="SeLoRA t (also the log interval)")
    p.add_argument("--seed", type=int, default=d.seed, help="training seed, the same for every method")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-seeds", type=int, nargs="+", default=list(d.eval_seeds))
    p.add_argument("--steps", type=int, default=d.num_inference_steps, help="sampler steps")
    p.add_argument("--guidance", type=float, default=d.guidance_scale)
    p.add_argument("--generation-batch-size", type=int, default=d.generation_batch_size)
    p.add_argument("--max-eval-prompts", type=int, default=None)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--clip-model", default=None)
    p.add_argument("--stand-in-eval-models", action="store_true",
                   help="random Inception + tiny CLIP (plumbing check only; the numbers mean nothing)")
    p.add_argument("--inception-input-size", type=int, default=d.inception_input_size)
    p.add_argument("--kid", action="store_true")
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = CompareOptions(
            output_dir=args.output_dir, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            thresholds=tuple(args.thresholds), pretrained=args.pretrained, dataset=args.dataset,
            data_dir=args.data_dir, synthetic_count=args.synthetic_count, epochs=args.epochs,
            batch_size=args.batch_size, resolution=args.resolution, lr=args.lr, interval=args.interval,
            seed=args.seed, max_steps=args.max_steps, eval_seeds=tuple(args.eval_seeds),
            num_inference_steps=args.steps, guidance_scale=args.guidance,
            generation_batch_size=args.generation_batch_size, max_eval_prompts=args.max_eval_prompts,
            inception_weights=args.inception_weights, clip_model=args.clip_model,
            stand_in_eval_models=args.stand_in_eval_models, inception_input_size=args.inception_input_size,
            kid=args.kid, device=args.device, progress=not args.no_progress)
        report = run_comparison(options)
    except (MissingWeightsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
