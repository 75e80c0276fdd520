"""Measure the demo model's prompt following and its tokenizer's reconstruction quality.

Prompt following: for 100 random CLDR names (fixed sample), generate one image (seed 0, default
settings) and count how often the prompted emoji is among the 5 nearest real emoji in 16x16 pixel
space. Reconstruction: PSNR of the tokenizer on crops of held-out photos, against bicubic
down- and up-sampling that stores at most the same number of values per image as the latent.

Usage: python benchmarks/eval_demo.py [--model PATH] [--output benchmarks/results/demo_eval.json]
"""

import argparse
import json
import math
import random
import time

import numpy as np
import torch
from PIL import Image

from spar_hf import SparPipeline
from spar_hf.cli import default_model_path
from spar_hf.data import eval_photo_crops, load_emoji, to_16x16_vectors, to_pixel_values


def prompt_following(pipe: SparPipeline, count: int, batch_size: int, sample_path: str | None) -> dict:
    images, captions = load_emoji(pipe.vae.config.image_size)
    reference = to_16x16_vectors(images)  # (N, 768)
    chosen = random.Random(0).sample(range(len(captions)), count)
    generated = []
    start = time.time()
    for offset in range(0, count, batch_size):
        indices = chosen[offset : offset + batch_size]
        prompts = [captions[i] for i in indices]
        generators = [torch.Generator().manual_seed(0) for _ in prompts]  # seed 0 for every image
        generated += pipe(prompts, generator=generators).images
    seconds = time.time() - start

    distances = ((to_16x16_vectors(generated)[:, None, :] - reference[None, :, :]) ** 2).sum(-1)  # (count, N)
    top5 = np.argsort(distances, axis=1)[:, :5]
    hits = [int(target in row) for target, row in zip(chosen, top5)]
    top1 = [int(target == row[0]) for target, row in zip(chosen, top5)]
    if sample_path:
        save_grid(generated[:20], [images[i] for i in chosen[:20]], sample_path)
    return {
        "prompts": count,
        "top5_rate": sum(hits) / count,
        "top1_rate": sum(top1) / count,
        "chance_top5": 5 / len(captions),
        "emoji_vocabulary": len(captions),
        "seconds_per_image": seconds / count,
        "examples": [{"prompt": captions[i], "top5_hit": bool(h)} for i, h in zip(chosen[:20], hits[:20])],
    }


def save_grid(generated: list[Image.Image], real: list[Image.Image], path: str, scale: int = 3) -> None:
    """Two rows: generated images above the real emoji of the same prompts."""
    side = generated[0].width * scale
    grid = Image.new("RGB", (side * len(generated), side * 2), "white")
    for column, (fake, true) in enumerate(zip(generated, real)):
        grid.paste(fake.resize((side, side), Image.Resampling.NEAREST), (column * side, 0))
        grid.paste(true.resize((side, side), Image.Resampling.NEAREST), (column * side, side))
    grid.save(path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@torch.no_grad()
def reconstruction(pipe: SparPipeline) -> dict:
    vae = pipe.vae.eval()
    size = vae.config.image_size
    crops = eval_photo_crops(size)
    pixels = to_pixel_values(crops)
    latents = vae.encode(pixels).latents
    values_per_image = latents[0].numel()
    decoded = ((vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    # Bicubic baseline: the largest square RGB thumbnail that stores no more values than the latent.
    side = int(math.isqrt(values_per_image // 3))
    ours, bicubic = [], []
    for crop, reconstructed in zip(crops, decoded):
        original = np.asarray(crop)
        thumb = crop.resize((side, side), Image.Resampling.BICUBIC).resize((size, size), Image.Resampling.BICUBIC)
        ours.append(psnr(reconstructed, original))
        bicubic.append(psnr(np.asarray(thumb), original))
    return {
        "crops": len(crops),
        "resolution": size,
        "latent_values_per_image": values_per_image,
        "bicubic_side": side,
        "bicubic_values_per_image": side * side * 3,
        "psnr_tokenizer": float(np.mean(ours)),
        "psnr_bicubic": float(np.mean(bicubic)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model_path(), help="Pipeline folder (default: the shipped demo).")
    parser.add_argument("--prompts", type=int, default=100, help="Number of random CLDR names to generate.")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--output", default="benchmarks/results/demo_eval.json", help="JSON file for the figures.")
    parser.add_argument("--samples", default="benchmarks/results/demo_samples.png", help="Grid of the first 20 prompts.")
    args = parser.parse_args()

    pipe = SparPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    results = {"reconstruction": reconstruction(pipe), "prompt_following": prompt_following(pipe, args.prompts, args.batch_size, args.samples)}
    rec, gen = results["reconstruction"], results["prompt_following"]
    print(f"prompt following: top-5 {gen['top5_rate']:.0%} (top-1 {gen['top1_rate']:.0%}; chance {gen['chance_top5']:.2%}) "
          f"over {gen['prompts']} prompts, {gen['seconds_per_image']:.2f} s/image")
    print(f"reconstruction on {rec['crops']} held-out photo crops at {rec['resolution']}px: tokenizer {rec['psnr_tokenizer']:.2f} dB "
          f"({rec['latent_values_per_image']} values) vs bicubic {rec['psnr_bicubic']:.2f} dB ({rec['bicubic_values_per_image']} values)")
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
