"""Score generated images against real ones: FID at Inception-v3 depths 64, 192, 2048 and CLIP score, mean and
std over the generated folders (one per seed). Argument parsing only; the work is in
selora_kernels.evaluation.metrics. Weights are local files (nothing is downloaded).

    python -m python.evaluate --real real/ --generated gen/seed_0 gen/seed_1 gen/seed_2 \
        --inception-weights weights-inception-2015-12-05-6726825d.pth --clip-model clip-vit-large-patch14/
"""
from __future__ import annotations

import argparse
import json
import sys

from selora_kernels.evaluation.metrics import Evaluator, evaluate_folders
from selora_kernels.experiments.options import report_user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m python.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--real", required=True, help="folder of real images")
    p.add_argument("--generated", nargs="+", required=True,
                   help="generated folders (metadata.jsonl gives prompts for CLIP score)")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity Inception file (default: torch hub's checkpoint cache)")
    p.add_argument("--clip-model", default=None, help="local CLIP folder (save_pretrained); omit: no CLIP score")
    p.add_argument("--resolution", type=int, default=None, help="resize short side + centre crop both sets")
    p.add_argument("--kid", action="store_true", help="also Kernel Inception Distance")
    p.add_argument("--inception-input-size", type=int, default=299)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: evaluate(args))  # MissingWeightsError is a FileNotFoundError


def evaluate(args) -> int:
    evaluator = Evaluator.from_paths(args.inception_weights, args.clip_model, kid=args.kid,
                                     inception_input_size=args.inception_input_size, device=args.device)
    result = evaluate_folders(evaluator, args.generated, args.real, resolution=args.resolution)
    for key, entry in result["summary"].items():
        print(f"{key}: {entry['mean']:.4f} ± {entry['std']:.4f} (n={entry['n']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
