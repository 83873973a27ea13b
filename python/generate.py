"""Generate one image per prompt with a Stable Diffusion pipeline and an adapter (argument parsing only; the
work is in selora_kernels.evaluation.generation).

    python -m python.generate --adapter runs/selora/peft_lora --prompts prompts.txt --seeds 0 1 2 --out gen/
    python -m python.generate --pretrained /models/sd15 --adapter runs/lora/best --prompts-from real/ --out gen/

Without --pretrained the base is the tiny pipeline that fine-tuning saved in <run dir>/tiny_pipeline, next to the
adapter folder (<run dir>/peft_lora or <run dir>/best). If that folder is missing, the tiny pipeline is rebuilt
from configs with --pipeline-seed, which matches the adapter only if fine-tuning ran with --seed equal to it (a
warning says so). Pass --resolution with the training resolution (64 for the tiny pipeline, 224 in the paper):
by default the pipeline samples at its own size (512 px for SD 1.5).
"""
from __future__ import annotations

import argparse
import os
import sys

from selora_kernels.data.records import caption_rows, read_jsonl
from selora_kernels.evaluation.generation import (PAPER_GUIDANCE, PAPER_STEPS, generate_for_seeds,
                                                  load_pipeline_with_adapter)
from selora_kernels.experiments.options import report_user_errors


def read_prompts(args) -> list:
    if args.prompts_from:
        path = os.path.join(args.prompts_from, "metadata.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--prompts-from {args.prompts_from}: no metadata.jsonl (file_name, text) there")
        return [str(row["text"]) for row in caption_rows(path, read_jsonl(path), ("text",))]
    if args.prompts is None:
        raise ValueError("give --prompts FILE (one prompt per line) or --prompts-from FOLDER (metadata.jsonl)")
    with open(args.prompts) as handle:
        return [line.strip() for line in handle if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m python.generate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[2],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained", default=None,
                   help="local diffusers folder (default: the tiny pipeline fine-tuning saved in "
                        "<run dir>/tiny_pipeline next to --adapter; if absent, one rebuilt with --pipeline-seed)")
    p.add_argument("--adapter", default=None,
                   help="folder with pytorch_lora_weights.safetensors (any method: <run dir>/peft_lora or best), "
                        "or a SeLoRA adapter file (<run dir>/adapter.safetensors)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--prompts-from", default=None, help="an image folder with metadata.jsonl (e.g. real test images)")
    p.add_argument("--out", required=True, help="output folder; one sub-folder seed_<s> per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=PAPER_STEPS)
    p.add_argument("--guidance", type=float, default=PAPER_GUIDANCE)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=None,
                   help="height = width; use the training resolution (default: the pipeline's own, 512 for SD 1.5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pipeline-seed", type=int, default=0,
                   help="only without --pretrained and without a saved <run dir>/tiny_pipeline: seed of the rebuilt "
                        "tiny pipeline's random weights; must equal the fine-tuning --seed")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: generate(args))


def generate(args) -> int:
    prompts = read_prompts(args)
    pipe = load_pipeline_with_adapter(args.pretrained, args.adapter, device=args.device, seed=args.pipeline_seed)
    folders = generate_for_seeds(pipe, prompts, args.seeds, args.out, num_inference_steps=args.steps,
                                 guidance_scale=args.guidance, batch_size=args.batch_size, height=args.resolution,
                                 width=args.resolution, progress=not args.no_progress)
    print("\n".join(folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
