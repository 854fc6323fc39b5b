"""What each training lever is worth in dB: train one variant per lever on the same budget, score each one-step.

    python benchmarks/levers.py                                   # benchmarks/levers.yaml, 1000 lossless images
    python benchmarks/levers.py --only reference,"dropout 0.1" --n-images 300

Every variant is params.yaml + the file's ``budget`` + its own overrides, trained from the same seed on the same
images (``train.max_train_images`` per epoch), then denoised in one step on the lossless CIFAR-10 test subset with
the same noisy inputs. Prints PSNR per sigma, the mean, the delta against the first variant, training img/s and
seconds. Each variant is one MLflow run (``lever-<name>``) in params.yaml's experiment; checkpoints go to
``--out/<variant>/``, and a variant whose ``best.pt`` is there already is scored without retraining.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from eval_lossless import DEFAULT_DATA  # benchmarks/ is on sys.path when this file runs as a script

from ddim_denoise.pipeline.params import ParamsError, load_params, read_yaml_mapping
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.data.cifar10 import load_images_npz
from ddim_denoise.evaluation.evaluate import model_methods, run_methods
from ddim_denoise.core.metrics import to_float


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def train_variant(params_path: str, overrides: dict, folder: Path, name: str) -> dict:
    from ddim_denoise.training.build import build_trainer

    summary_path = folder / "training" / "summary.json"
    if (folder / "models" / "best.pt").is_file() and summary_path.is_file():
        logging.info("%s: trained already in %s", name, folder)
        return json.loads(summary_path.read_text())
    params = load_params(params_path, {**overrides, "train.out_dir": str(folder / "models"), "train.resume": "never"})
    return build_trainer(params, run_name=f"lever-{slug(name)}", training_dir=folder / "training").fit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--levers", type=Path, default=Path(__file__).with_name("levers.yaml"))
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/levers"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    spec = read_yaml_mapping(args.levers, ParamsError, "see benchmarks/levers.yaml", "budget and variants")
    variants = spec["variants"]
    names = [n.strip() for n in args.only.split(",")] if args.only else list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: {args.levers} has {list(variants)}")
    clean = to_float(load_images_npz(args.data, "x_test", args.n_images))

    rows = []
    for name in names:
        folder = args.out / slug(name)
        summary = train_variant(args.params, {**spec["budget"], **(variants[name] or {})}, folder, name)
        denoiser = Denoiser.from_checkpoint(folder / "models" / "best.pt", device="cpu")
        eval_cfg = denoiser.params.eval
        table = run_methods(clean, eval_cfg.sigmas, model_methods(denoiser, [1], eval_cfg.batch_size),
                            eval_cfg.noise_seed).table
        psnr = dict(zip(table["sigma"], table["psnr"]))
        rows.append((name, psnr, summary))
        print(f"{name}: " + ", ".join(f"sigma {s:g} {v:.2f} dB" for s, v in psnr.items()), flush=True)

    sigmas = list(rows[0][1])
    ref_mean = sum(rows[0][1].values()) / len(sigmas)
    print(f"\n### One-step PSNR (dB) on {len(clean)} lossless test images; budget: {args.levers}\n")
    print("| variant | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " | mean | delta | train img/s | train s |")
    print("|---" * (len(sigmas) + 5) + "|")
    for name, psnr, summary in rows:
        mean = sum(psnr.values()) / len(sigmas)
        print(f"| {name} | " + " | ".join(f"{psnr[s]:.2f}" for s in sigmas)
              + f" | {mean:.2f} | {mean - ref_mean:+.2f} | {summary['images_per_s']:.1f}"
              f" | {summary['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
