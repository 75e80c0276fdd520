"""Train the SPAR tokenizer on a folder of images (imagefolder) or a parquet file.

Stage 1: vision encoder frozen, L_r + L_p.  Stage 2: encoder unfrozen and anchored by L_s.
With `--gan_loss_weight`, L_r gains a hinge GAN term from step `--gan_start_step` on, against a
patch discriminator trained alongside (saved to `<output_dir>/discriminator`).

  accelerate launch examples/train_tokenizer.py --data DIR --preset demo --stage 1 --output_dir out/tok1 --max_steps 1000
  accelerate launch examples/train_tokenizer.py --data DIR --init_from out/tok1/final --stage 2 --output_dir out/tok2 --max_steps 500

Every `transformers.TrainingArguments` flag applies (`--per_device_train_batch_size`, `--save_steps`,
`--resume_from_checkpoint`, `--bf16`, ...). The trained model is saved to `<output_dir>/final`, ready to
serve the generator: the stage 2 anchor is dropped (checkpoints keep it, so a resumed run is exact) and
the latent scaling is measured on up to `--latent_statistics_samples` training images.
"""

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from spar_hf import SparTokenizerModel
from spar_hf.adversarial import AdversarialStartCallback, PatchDiscriminator, SparTokenizerWithDiscriminator
from spar_hf.presets import PRESETS, preset_configs
from spar_hf.training import (
    EMACallback,
    ImageCaptionTransform,
    SparTrainer,
    check_output_dir,
    check_path_argument,
    load_image_text_dataset,
    parse_and_set_up,
    prepare_tokenizer_for_inference,
)


@dataclass
class TokenizerArguments:
    data: str = field(metadata={"help": "Image folder (with optional metadata.jsonl) or a .parquet file."})
    stage: int = field(default=1, metadata={"help": "1: encoder frozen. 2: encoder trained with L_s."})
    init_from: str | None = field(default=None, metadata={"help": "Tokenizer checkpoint to start from (required for stage 2)."})
    preset: str = field(default="tiny", metadata={"help": f"Size preset when starting from scratch: {sorted(PRESETS)}."})
    semantic_loss_weight: float = field(default=1.0, metadata={"help": "Weight of L_s in stage 2."})
    image_column: str = field(default="image", metadata={"help": "Dataset column with the images."})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the trained weights; 0 disables EMA."})
    gan_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the GAN term of L_r; 0 disables the GAN."})
    gan_start_step: int = field(default=0, metadata={"help": "Optimizer step (0-based) from which the GAN terms train."})
    discriminator_channels: int = field(default=64, metadata={"help": "Width of the discriminator's first layer."})
    discriminator_layers: int = field(default=3, metadata={"help": "Stride-2 convolutions of the discriminator."})
    discriminator_from: str | None = field(
        default=None, metadata={"help": "Discriminator folder to continue from, e.g. <stage 1 output_dir>/discriminator."}
    )
    latent_statistics_samples: int = field(
        default=2048, metadata={"help": "Training images (a seeded random subset) that set the latent scaling of the final model."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier run's final/ and checkpoints in --output_dir."})


def build_model(args: TokenizerArguments) -> SparTokenizerModel:
    if args.latent_statistics_samples < 1:
        raise ValueError(f"--latent_statistics_samples must be >= 1. Got {args.latent_statistics_samples}.")
    if args.gan_loss_weight < 0:
        raise ValueError(f"--gan_loss_weight must be >= 0. Got {args.gan_loss_weight}.")
    if args.gan_start_step < 0:
        raise ValueError(f"--gan_start_step must be >= 0. Got {args.gan_start_step}.")
    if args.stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2. Got {args.stage}.")
    for flag in ("init_from", "discriminator_from"):
        check_path_argument(f"--{flag}", getattr(args, flag))
    if args.stage == 2:
        if not args.init_from:
            raise ValueError("--stage 2 needs --init_from, the stage 1 tokenizer.")
        return SparTokenizerModel.from_pretrained(
            args.init_from, train_vision_encoder=True, semantic_loss_weight=args.semantic_loss_weight
        )
    if args.init_from:
        return SparTokenizerModel.from_pretrained(args.init_from, train_vision_encoder=False, semantic_loss_weight=0.0)
    return SparTokenizerModel(preset_configs(args.preset)[0])


def setup(args: TokenizerArguments, training_args: TrainingArguments):
    """Check the arguments and load model and data: every error here is a usage error."""
    check_output_dir(training_args.output_dir, training_args.resume_from_checkpoint, args.overwrite)
    model = build_model(args)
    try:
        dataset = load_image_text_dataset(args.data, image_column=args.image_column, caption_column=args.image_column)
    except ValueError as error:
        raise ValueError(f"--data: {error}") from error
    dataset.set_transform(ImageCaptionTransform(model.config.image_size, image_column=args.image_column, caption_column="_none"))
    trained = model
    if args.gan_loss_weight > 0:
        if args.discriminator_from:
            discriminator = PatchDiscriminator.from_pretrained(args.discriminator_from)
        else:
            discriminator = PatchDiscriminator(base_channels=args.discriminator_channels, num_layers=args.discriminator_layers)
        trained = SparTokenizerWithDiscriminator(model, discriminator, args.gan_loss_weight)
    return model, trained, dataset


def main() -> None:
    args, training_args, (model, trained, dataset) = parse_and_set_up(TokenizerArguments, setup)

    resume = training_args.resume_from_checkpoint
    callbacks = []
    ema = EMACallback(model, args.ema_decay, resume_from=resume) if args.ema_decay > 0 else None  # tokenizer weights only
    if ema:
        callbacks.append(ema)
    if trained is not model:
        callbacks.append(AdversarialStartCallback(trained, args.gan_start_step))
    trainer = SparTrainer(model=trained, args=training_args, train_dataset=dataset, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    if ema:
        ema.copy_to_model()
    if trained is not model:
        trained.discriminator.save_pretrained(os.path.join(training_args.output_dir, "discriminator"))
    count = min(args.latent_statistics_samples, len(dataset))
    sample = dataset.shuffle(seed=training_args.seed).select(range(count))[:]["pixel_values"]
    pixels = torch.stack(list(sample)).to(next(model.parameters()).device)
    scale, shift = prepare_tokenizer_for_inference(model, pixels)
    print(f"Latent scaling_factor={scale:.4f} shift_factor={shift:.4f} from {count} training images")
    model.save_pretrained(os.path.join(training_args.output_dir, "final"))


if __name__ == "__main__":
    main()
