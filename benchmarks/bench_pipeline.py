"""Time the pipeline's denoising loop against the bare DiT forward, and one demo image end to end.

The per-step cost of the loop is the slope of total time over the number of steps, so prompt
encoding and decoding cancel out. It is compared in the same process with the DiT's forward at
the batch the loop runs: 2 images with guidance, the conditional and unconditional branches.

Usage: python benchmarks/bench_pipeline.py [--model PATH] [--repeats 5]
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from spar_hf import SparPipeline
from spar_hf.cli import default_model_path


def timed(function, repeats: int) -> float:
    """Median wall time of `function()` over `repeats` runs after one warm-up."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model_path(), help="Pipeline folder (default: the shipped demo).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/pipeline_speed.json")
    args = parser.parse_args()

    pipe = SparPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.vae.config.image_size

    def run(steps: int, output_type: str = "latent"):
        return pipe("red apple", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type=output_type)

    low, high = 5, 25
    per_step_loop = (timed(lambda: run(high), args.repeats) - timed(lambda: run(low), args.repeats)) / (high - low)

    transformer = pipe.model.transformer
    latents = torch.randn(2, pipe.vae.config.latent_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    condition = torch.randn(2, pipe.model.config.num_queries, pipe.model.config.transformer_config["caption_channels"])
    timestep = torch.full((2,), 500.0)
    with torch.no_grad():
        bare = timed(lambda: transformer(latents, encoder_hidden_states=condition, timestep=timestep), args.repeats * 20)

    image_seconds = timed(lambda: run(20, "pil"), args.repeats)
    with torch.no_grad():
        ids = pipe.processor(["red apple"], return_tensors="pt")
        encode_seconds = timed(lambda: pipe.model.encode_condition(ids["input_ids"], ids["attention_mask"]), args.repeats * 4)

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "per_step_loop_ms": per_step_loop * 1e3,
        "bare_dit_forward_batch2_ms": bare * 1e3,
        "loop_overhead": per_step_loop / bare - 1,
        "prompt_encoding_ms": encode_seconds * 1e3,
        "one_image_default_settings_s": image_seconds,
    }
    print(f"denoising loop: {results['per_step_loop_ms']:.2f} ms/step vs bare DiT forward (batch 2) "
          f"{results['bare_dit_forward_batch2_ms']:.2f} ms: overhead {results['loop_overhead']:+.1%}")
    print(f"prompt encoding (MLLM + DTR + connector, once per prompt): {results['prompt_encoding_ms']:.1f} ms")
    print(f"one {size}x{size} image, 20 steps, guidance 4.5: {image_seconds:.2f} s on {results['machine']}")
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
