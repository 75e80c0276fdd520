"""Training throughput and peak memory per stage, and the share of a generator step spent on DTR + alignment.

Runs on the CPU with the `demo` preset (random weights, fp32) unless `--device cuda` is given; on
an accelerator, `--dtype bfloat16` measures mixed precision. Each stage is timed over the same
number of optimizer steps after warm-up; samples/s counts images.

The DTR + alignment share compares, in the same process and with the same weights, a full step
with one that uses `routing_mode="last"` and no alignment. Their difference, over the full step,
is the cost of DTR and alignment.

Usage: python benchmarks/bench_training.py [--steps 10] [--batch-size 32] [--device cpu]
"""

import argparse
import json
import resource
import statistics
import time

import torch

from spar_hf import SparForConditionalGeneration, SparTokenizerModel
from spar_hf.presets import preset_configs
from spar_hf.training import configure_generator_stage


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_steps(step, steps: int, device: str) -> float:
    """Median seconds per call of `step()` after two warm-up calls."""
    step()
    step()
    samples = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def make_step(model, batch: dict, dtype):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def tokenizer_stage(stage: int, batch_size: int, device: str, dtype) -> tuple:
    overrides = {"tokenizer_train_vision_encoder": True, "tokenizer_semantic_loss_weight": 1.0} if stage == 2 else {}
    model = SparTokenizerModel(preset_configs("demo", **overrides)[0]).to(device).train()
    size = model.config.image_size
    batch = {"pixel_values": torch.rand(batch_size, 3, size, size, device=device) * 2 - 1}
    return model, batch


def generator_stage(stage: int, batch_size: int, device: str, dtype, **overrides) -> tuple:
    _, config = preset_configs("demo", **{f"generator_{k}": v for k, v in overrides.items()})
    config.mllm_pretrained_path = None  # random weights: nothing to load
    torch.manual_seed(0)
    model = SparForConditionalGeneration(config).to(device).train()
    configure_generator_stage(model, stage)
    grid = config.transformer_config["sample_size"]
    channels = config.transformer_config["in_channels"]
    batch = {
        "input_ids": torch.randint(1000, 20000, (batch_size, 8), device=device),
        "latents": torch.randn(batch_size, channels, grid, grid, device=device),
        "semantic_features": torch.randn(batch_size, grid * grid, config.align_feature_dim, device=device),
    }
    return model, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output", default="benchmarks/results/training_speed.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    results = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    stages = {
        "tokenizer_stage1": lambda: tokenizer_stage(1, args.batch_size, args.device, dtype),
        "tokenizer_stage2": lambda: tokenizer_stage(2, args.batch_size, args.device, dtype),
        "generator_stage1": lambda: generator_stage(1, args.batch_size, args.device, dtype),
        "generator_stage2": lambda: generator_stage(2, args.batch_size, args.device, dtype),
    }
    for name, build in stages.items():
        model, batch = build()
        seconds = time_steps(make_step(model, batch, dtype), args.steps, args.device)
        results[name] = {"samples_per_s": args.batch_size / seconds, "seconds_per_step": seconds,
                         "peak_memory_mb_so_far": peak_memory_mb(args.device)}
        print(f"{name}: {args.batch_size / seconds:.1f} samples/s ({seconds * 1e3:.0f} ms/step), "
              f"peak memory so far {results[name]['peak_memory_mb_so_far']:.0f} MB")
        del model

    full_model, batch = generator_stage(2, args.batch_size, args.device, dtype)
    full = time_steps(make_step(full_model, batch, dtype), args.steps, args.device)
    bare_model, _ = generator_stage(2, args.batch_size, args.device, dtype, routing_mode="last", align_loss_weight=0.0)
    bare_batch = {k: v for k, v in batch.items() if k != "semantic_features"}
    bare = time_steps(make_step(bare_model, bare_batch, dtype), args.steps, args.device)
    results["dtr_and_alignment_share_of_step"] = (full - bare) / full
    print(f"generator stage 2 step: {full * 1e3:.0f} ms with DTR + alignment, {bare * 1e3:.0f} ms with last-layer "
          f"routing and no alignment: DTR + alignment cost {results['dtr_and_alignment_share_of_step']:.1%} of a step")
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
