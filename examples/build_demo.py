"""Rebuild the shipped demo model from scratch on real offline data, with a fixed seed.

Stages:
  vision     a small SigLIP vision tower, contrastive against frozen MiniLM caption embeddings (`SparTrainer`)
  dcae       a small DC-AE (`AutoencoderDC`), the pixel latent teacher (`SparTrainer`)
  data       imagefolders: the captioned emoji, and emoji + crops of the training photos (eval photos held out)
  tokenizer  the SPAR tokenizer, both stages, by examples/train_tokenizer.py
  generator  targets stored by examples/extract_generator_targets.py, then queries, DTR, connector and SANA DiT
             under the frozen MiniLM trained by examples/train_generator.py (flow matching + self-alignment)
  assemble   the pipeline folder (model_index.json + components) that `SparPipeline.from_pretrained` loads
  card       the pipeline's README.md model card, with the figures of benchmarks/results/demo_eval.json

Usage: python examples/build_demo.py --output-dir outputs/demo_build --stages all
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import torch
from diffusers import AutoencoderDC
from transformers import AutoModel, AutoTokenizer, SiglipVisionConfig, SiglipVisionModel, TrainingArguments, set_seed

from spar_hf import SparTokenizerModel
from spar_hf.data import load_emoji, load_photos, photo_crops, to_pixel_values
from spar_hf.generator import resolve_pretrained_path
from spar_hf.presets import MINILM_PACKAGE_PATH, preset_configs
from spar_hf.training import DictDataset, SparTrainer, VisionTextContrastiveModel

logger = logging.getLogger("build_demo")
EXAMPLES = os.path.dirname(os.path.abspath(__file__))
STAGES = ("vision", "dcae", "data", "tokenizer", "generator", "assemble", "card")
RESOLUTION = 32


def training_arguments(output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=min(100, steps // 10), weight_decay=0.0, logging_steps=25,
        save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )


@torch.no_grad()
def minilm_sentence_embeddings(captions: list[str]) -> torch.Tensor:
    """Mean-pooled MiniLM embeddings, the way sentence-transformers pools all-MiniLM-L6-v2."""
    path = resolve_pretrained_path(MINILM_PACKAGE_PATH)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    states = model(**batch).last_hidden_state  # (N, L, 384)
    mask = batch["attention_mask"][..., None].float()
    return (states * mask).sum(1) / mask.sum(1)  # (N, 384)


def build_vision(args, emoji_pixels, captions) -> None:
    tokenizer_config, _ = preset_configs("demo")
    encoder = SiglipVisionModel(SiglipVisionConfig(**tokenizer_config.vision_config.to_diff_dict()))
    model = VisionTextContrastiveModel(encoder, text_dim=384)
    dataset = DictDataset(pixel_values=emoji_pixels, text_embeds=minilm_sentence_embeddings(captions))
    SparTrainer(model=model, args=training_arguments(f"{args.output_dir}/vision_run", args.vision_steps, 128, 1e-3, args.seed),
                train_dataset=dataset).train()
    encoder.save_pretrained(f"{args.output_dir}/vision")


def build_dcae(args, pixels) -> None:
    tokenizer_config, _ = preset_configs("demo")
    model = AutoencoderDC(**tokenizer_config.pixel_teacher_config)
    SparTrainer(model=model, args=training_arguments(f"{args.output_dir}/dcae_run", args.dcae_steps, 32, 1e-3, args.seed),
                train_dataset=DictDataset(sample=pixels)).train()
    model.save_pretrained(f"{args.output_dir}/dcae")


def write_image_folder(folder: str, images, captions: list[str]) -> None:
    """Write PNGs with a `metadata.jsonl` of captions: the `imagefolder` layout the training scripts read."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for index, (image, caption) in enumerate(zip(images, captions)):
            name = f"{index:05d}.png"
            image.save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")


def build_data(args, emoji_images, captions, crops) -> None:
    write_image_folder(f"{args.output_dir}/data/emoji", emoji_images, captions)
    write_image_folder(f"{args.output_dir}/data/tokenizer", emoji_images + crops, captions + [""] * len(crops))


def run_example(script: str, *argv) -> None:
    """Run one of the training scripts in examples/ as a user would, in a fresh process."""
    command = [sys.executable, os.path.join(EXAMPLES, script), *map(str, argv)]
    logger.info("running %s", " ".join(command))
    subprocess.run(command, check=True)


def trainer_flags(steps: int, batch_size: int, learning_rate: float, seed: int) -> list:
    """Return the `TrainingArguments` flags every SPAR stage of the demo shares, and `--overwrite` (this is a rebuild)."""
    return [
        "--max_steps", steps, "--per_device_train_batch_size", batch_size, "--learning_rate", learning_rate,
        "--lr_scheduler_type", "cosine", "--warmup_steps", min(100, steps // 10), "--weight_decay", 0.0,
        "--logging_steps", 25, "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", seed,
        "--data_seed", seed, "--dataloader_num_workers", 0, "--disable_tqdm", "true", "--overwrite",
    ]


def build_tokenizer(args) -> None:
    tokenizer_config, _ = preset_configs("demo")
    set_seed(args.seed)
    model = SparTokenizerModel(tokenizer_config)
    # The pretrained stand-ins: the vision tower (frozen in stage 1) and the DC-AE teacher, whose
    # decoder also initialises ours where the shapes agree.
    model.vision_encoder.load_state_dict(SiglipVisionModel.from_pretrained(f"{args.output_dir}/vision").state_dict())
    model.pixel_teacher.load_state_dict(AutoencoderDC.from_pretrained(f"{args.output_dir}/dcae").state_dict())
    model.save_pretrained(f"{args.output_dir}/tokenizer_init")

    data = f"{args.output_dir}/data/tokenizer"
    run_example("train_tokenizer.py", "--data", data, "--init_from", f"{args.output_dir}/tokenizer_init", "--stage", 1,
                "--output_dir", f"{args.output_dir}/tokenizer_stage1",
                *trainer_flags(args.tokenizer_steps, 32, 5e-4, args.seed))
    run_example("train_tokenizer.py", "--data", data, "--init_from", f"{args.output_dir}/tokenizer_stage1/final", "--stage", 2,
                "--output_dir", f"{args.output_dir}/tokenizer",
                *trainer_flags(args.tokenizer_stage2_steps, 32, 2e-4, args.seed))


def build_generator(args) -> None:
    _, generator_config = preset_configs("demo")
    tokenizer = f"{args.output_dir}/tokenizer/final"
    targets = f"{args.output_dir}/generator_targets"
    run_example("extract_generator_targets.py", "--data", f"{args.output_dir}/data/emoji", "--tokenizer", tokenizer,
                "--output_dir", targets, "--patch_size", generator_config.transformer_config["patch_size"], "--overwrite")
    # The DiT is trained from scratch here, so there is no stage 1 (which needs pretrained SANA weights).
    run_example("train_generator.py", "--data", targets, "--tokenizer", tokenizer, "--processor", MINILM_PACKAGE_PATH,
                "--preset", "demo", "--stage", 2, "--output_dir", f"{args.output_dir}/generator",
                "--ema_decay", args.generator_ema_decay,
                *trainer_flags(args.generator_steps, args.generator_batch_size, args.generator_learning_rate, args.seed))


def assemble(args) -> None:
    from spar_hf.export import export_pipeline

    export_pipeline(f"{args.output_dir}/generator/final", f"{args.output_dir}/tokenizer/final", MINILM_PACKAGE_PATH,
                    args.pipeline_dir, overwrite=True)
    logger.info("Saved the demo pipeline to %s", args.pipeline_dir)


def write_card(args) -> None:
    from spar_hf.hub import render_model_card
    from spar_hf.pipeline import SparPipeline

    with open(args.eval_results) as f:
        results = json.load(f)
    rec, gen = results["reconstruction"], results["prompt_following"]
    card = render_model_card(
        SparPipeline.from_pretrained(args.pipeline_dir),
        os.path.join(os.path.dirname(__file__), "..", "model_cards", "spar_pipeline.md"),
        model_name="SPAR demo (emoji, 32x32)",
        repo_id="spar_hf/demo_model",
        example_prompt="red apple",
        description="Trained from scratch on a 2-core CPU by `examples/build_demo.py` (seed 0). It shows every "
        "mechanism of SPAR at toy scale and is not a general image generator.",
        training_data=f"{gen['emoji_vocabulary']} Noto Color Emoji (SIL OFL 1.1) rendered at 32x32 on white and captioned "
        "with their CLDR names; the tokenizer also saw random crops of 12 photos bundled with scikit-image, "
        "scikit-learn and matplotlib (4 more photos are held out for evaluation).",
        evaluation=f"- Prompt following: for 100 random CLDR names (seed 0, 20 steps, guidance 4.5), the prompted emoji is "
        f"among the 5 nearest real emoji in 16x16 pixel space in {gen['top5_rate']:.0%} of cases (top-1 "
        f"{gen['top1_rate']:.0%}; chance {gen['chance_top5']:.2%}).\n- Reconstruction on {rec['crops']} crops of held-out "
        f"photos at {rec['resolution']}px: PSNR {rec['psnr_tokenizer']:.2f} dB with {rec['latent_values_per_image']} latent "
        f"values, against {rec['psnr_bicubic']:.2f} dB for bicubic resampling through {rec['bicubic_side']}x"
        f"{rec['bicubic_side']} RGB ({rec['bicubic_values_per_image']} values).\n\nReproduce with "
        "`python benchmarks/eval_demo.py`.",
        limitations="Emoji vocabulary only, 32x32 pixels. The MiniLM backbone reads text only, so this model cannot edit "
        "images and its `generate()` raises: use an InternVL-based SPAR model for editing and understanding.",
    )
    card.save(os.path.join(args.pipeline_dir, "README.md"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo_build", help="Folder for the intermediate checkpoints.")
    parser.add_argument("--pipeline-dir", default="src/spar_hf/demo_model", help="Where `assemble` writes the pipeline.")
    parser.add_argument("--stages", default="all", help=f"Comma-separated subset of {STAGES}, or 'all' (every stage but card).")
    parser.add_argument("--eval-results", default="benchmarks/results/demo_eval.json", help="Figures for the model card.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--dcae-steps", type=int, default=500)
    parser.add_argument("--tokenizer-steps", type=int, default=900, help="Tokenizer stage 1 steps.")
    parser.add_argument("--tokenizer-stage2-steps", type=int, default=200, help="Tokenizer stage 2 steps.")
    parser.add_argument("--generator-steps", type=int, default=4800)
    parser.add_argument("--generator-batch-size", type=int, default=32)
    parser.add_argument("--generator-learning-rate", type=float, default=3e-4)
    parser.add_argument("--generator-ema-decay", type=float, default=0.0,
                        help="EMA decay of the shipped generator weights; 0 (default) ships the last weights.")
    args = parser.parse_args()
    # `card` needs the figures of benchmarks/eval_demo.py, which runs on the assembled pipeline.
    stages = STAGES[:-1] if args.stages == "all" else tuple(args.stages.split(","))
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown stage(s) {sorted(unknown)}; choose from {STAGES}.")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    emoji_images, captions = load_emoji(RESOLUTION)
    emoji_pixels = to_pixel_values(emoji_images)  # (N, 3, 32, 32)
    crops = photo_crops(load_photos("train"), RESOLUTION, count=len(emoji_images), seed=args.seed)
    mixed = torch.cat([emoji_pixels, to_pixel_values(crops)])
    logger.info("data: %d emoji, %d photo crops", len(emoji_pixels), len(crops))
    with open(f"{args.output_dir}/captions.json", "w") as f:
        json.dump(captions, f)

    for stage in stages:
        start = time.time()
        logger.info("stage %s: start", stage)
        if stage == "vision":
            build_vision(args, emoji_pixels, captions)
        elif stage == "dcae":
            build_dcae(args, mixed)
        elif stage == "data":
            build_data(args, emoji_images, captions, crops)
        elif stage == "tokenizer":
            build_tokenizer(args)
        elif stage == "generator":
            build_generator(args)
        elif stage == "assemble":
            assemble(args)
        else:
            write_card(args)
        logger.info("stage %s: done in %.1f min", stage, (time.time() - start) / 60)


if __name__ == "__main__":
    main()
