"""Fine-tune a SPAR pipeline on your own captioned images, fully or with LoRA, and export a new pipeline.

Data: a folder of images with `metadata.jsonl` (`{"file_name": "a.png", "text": "a caption"}` per line)
or a parquet file with `image` and `text` columns.

  accelerate launch examples/finetune.py --pipeline PIPELINE_DIR --data DIR --lora transformer \
      --output_dir out/ft --max_steps 500 --learning_rate 1e-4

`--lora` takes `mllm`, `transformer` or both (comma-separated); without it, the generator is fully
fine-tuned (queries, DTR, connector, DiT; the MLLM stays frozen). The tokenizer stays frozen and
provides latents and alignment targets. Adapters are merged before export, so `<output_dir>/pipeline`
loads with `SparPipeline.from_pretrained` and needs no peft at inference.
"""

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from spar_hf import SparPipeline
from spar_hf.lora import LORA_TARGETS, add_lora, merge_lora, save_lora
from spar_hf.training import (
    EMACallback,
    ImageCaptionTransform,
    PromptCollator,
    SparGeneratorTrainer,
    check_output_dir,
    check_path_argument,
    configure_generator_stage,
    load_image_text_dataset,
    parse_and_set_up,
)


@dataclass
class FinetuneArguments:
    pipeline: str = field(metadata={"help": "SparPipeline folder or Hub repo id to start from."})
    data: str = field(metadata={"help": "Image folder with metadata.jsonl captions, or a .parquet file."})
    lora: str | None = field(
        default=None,
        metadata={"help": f"Comma-separated LoRA targets from {LORA_TARGETS}; unset or empty: full fine-tuning."},
    )
    lora_rank: int = field(default=8, metadata={"help": "Rank of each LoRA adapter."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha / rank."})
    image_column: str = field(default="image", metadata={"help": "Dataset column with the images."})
    caption_column: str = field(default="text", metadata={"help": "Dataset column with the captions."})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the trained weights; 0 disables EMA."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier run's results and checkpoints in --output_dir."})


def parse_lora_targets(value: str | None) -> list[str]:
    targets = [t.strip() for t in value.split(",") if t.strip()] if value else []
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"--lora got {unknown}; accepted targets are {list(LORA_TARGETS)} (comma-separated).")
    return targets


def setup(args: FinetuneArguments, training_args: TrainingArguments):
    """Check the arguments and load pipeline and data: every error here is a usage error."""
    check_output_dir(training_args.output_dir, training_args.resume_from_checkpoint, args.overwrite)
    targets = parse_lora_targets(args.lora)
    for flag in ("lora_rank", "lora_alpha"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1. Got {getattr(args, flag)}.")
    for flag in ("pipeline", "data"):
        check_path_argument(f"--{flag}", getattr(args, flag))
    pipe = SparPipeline.from_pretrained(args.pipeline)
    try:
        dataset = load_image_text_dataset(args.data, image_column=args.image_column, caption_column=args.caption_column)
    except ValueError as error:
        raise ValueError(f"--data: {error}") from error
    dataset.set_transform(ImageCaptionTransform(pipe.vae.config.image_size, args.image_column, args.caption_column,
                                                output_column="target_pixel_values"))
    return targets, pipe, dataset


def main() -> None:
    args, training_args, (targets, pipe, dataset) = parse_and_set_up(FinetuneArguments, setup)
    model = pipe.model

    configure_generator_stage(model, 2)
    if targets:
        # LoRA: freeze everything SPAR would train, then let only the adapters learn.
        model.requires_grad_(False)
        for target in targets:
            add_lora(model, target, r=args.lora_rank, alpha=args.lora_alpha)
        model.alignment_enabled = False  # the projector is frozen and the DiT changes little

    resume = training_args.resume_from_checkpoint
    ema = EMACallback(model, args.ema_decay, resume_from=resume) if args.ema_decay > 0 else None
    trainer = SparGeneratorTrainer(
        model=model, args=training_args, train_dataset=dataset,
        data_collator=PromptCollator(getattr(pipe.processor, "tokenizer", pipe.processor)),
        tokenizer_model=pipe.vae, callbacks=[ema] if ema else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    if ema:
        ema.copy_to_model()
    if targets:
        save_lora(model, os.path.join(training_args.output_dir, "lora"))
        merge_lora(model)
    model.eval()
    pipe.save_pretrained(os.path.join(training_args.output_dir, "pipeline"))


if __name__ == "__main__":
    main()
