"""Train the SPAR generator with a frozen SPAR tokenizer as latent codec and alignment teacher.

Stage 1 trains queries, DTR and connector with the DiT frozen; stage 2 also trains the DiT with
self-alignment on. Data: a folder of images with captions in metadata.jsonl, a parquet file, or
targets stored by examples/extract_generator_targets.py (the tokenizer then does not run per step).

  accelerate launch examples/train_generator.py --data DIR --tokenizer out/tok2/final --init_from PIPELINE_OR_MODEL \
      --processor MLLM_PATH --stage 1 --output_dir out/gen1 --max_steps 1000

Every `transformers.TrainingArguments` flag applies. The model is saved to `<output_dir>/final` and, with
`--export_pipeline`, a pipeline folder to `<output_dir>/pipeline`.
"""

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from spar_hf import SparForConditionalGeneration
from spar_hf.export import export_pipeline, load_processor
from spar_hf.presets import PRESETS, preset_configs
from spar_hf.tokenizer import SparTokenizerModel
from spar_hf.training import (
    GENERATOR_STAGES,
    EMACallback,
    ImageCaptionTransform,
    PromptCollator,
    SparGeneratorTrainer,
    check_generator_inputs,
    check_output_dir,
    check_path_argument,
    configure_generator_stage,
    is_generator_targets,
    load_generator_targets,
    load_image_text_dataset,
    parse_and_set_up,
)


@dataclass
class GeneratorArguments:
    data: str = field(metadata={"help": "Image folder with metadata.jsonl captions, a .parquet file, or stored targets."})
    tokenizer: str = field(metadata={"help": "Trained SPAR tokenizer folder (frozen)."})
    processor: str = field(metadata={"help": "Folder (or python-package: path) of the MLLM's tokenizer or processor."})
    stage: int = field(default=2, metadata={"help": "1: DiT frozen. 2: DiT trained with self-alignment."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "Generator checkpoint or pipeline folder to start from; without it, a new model of --preset."},
    )
    preset: str = field(
        default="tiny",
        metadata={"help": f"Size preset when starting from scratch: {sorted(PRESETS)}. tiny (16x16 images) is for tests."},
    )
    image_column: str = field(default="image", metadata={"help": "Dataset column with the images."})
    caption_column: str = field(default="text", metadata={"help": "Dataset column with the captions."})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the trained weights; 0 disables EMA."})
    export_pipeline: bool = field(default=False, metadata={"help": "Also write a SparPipeline folder."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier run's final/ and checkpoints in --output_dir."})


def build_model(args: GeneratorArguments) -> SparForConditionalGeneration:
    if args.stage not in GENERATOR_STAGES:
        raise ValueError(f"--stage must be one of {GENERATOR_STAGES}. Got {args.stage}.")
    if args.init_from:
        folder = os.path.join(args.init_from, "model") if os.path.isfile(os.path.join(args.init_from, "model_index.json")) else args.init_from
        model = SparForConditionalGeneration.from_pretrained(folder)
    else:
        model = SparForConditionalGeneration(preset_configs(args.preset)[1])
        if model.config.mllm_pretrained_path:
            model.load_mllm_weights(model.config.mllm_pretrained_path)
    configure_generator_stage(model, args.stage)
    return model


def setup(args: GeneratorArguments, training_args: TrainingArguments):
    """Check the arguments and load models and data: every error here is a usage error."""
    check_output_dir(training_args.output_dir, training_args.resume_from_checkpoint, args.overwrite)
    for flag in ("data", "tokenizer", "processor", "init_from"):
        check_path_argument(f"--{flag}", getattr(args, flag))
    tokenizer_model = SparTokenizerModel.from_pretrained(args.tokenizer)
    model = build_model(args)
    processor = load_processor(args.processor)
    text_tokenizer = getattr(processor, "tokenizer", processor)
    check_generator_inputs(model, tokenizer_model, text_tokenizer)

    try:
        if is_generator_targets(args.data):
            transformer = model.config.transformer_config
            dataset = load_generator_targets(args.data, tokenizer_model, transformer["sample_size"] // transformer["patch_size"])
        else:
            dataset = load_image_text_dataset(args.data, image_column=args.image_column, caption_column=args.caption_column)
            dataset.set_transform(ImageCaptionTransform(tokenizer_model.config.image_size, args.image_column,
                                                        args.caption_column, output_column="target_pixel_values"))
    except ValueError as error:
        raise ValueError(f"--data: {error}") from error
    return tokenizer_model, model, text_tokenizer, dataset


def main() -> None:
    args, training_args, (tokenizer_model, model, text_tokenizer, dataset) = parse_and_set_up(GeneratorArguments, setup)

    resume = training_args.resume_from_checkpoint
    ema = EMACallback(model, args.ema_decay, resume_from=resume) if args.ema_decay > 0 else None
    trainer = SparGeneratorTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=PromptCollator(text_tokenizer),
        tokenizer_model=tokenizer_model, callbacks=[ema] if ema else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    if ema:
        ema.copy_to_model()
    final = os.path.join(training_args.output_dir, "final")
    model.save_pretrained(final)
    if args.export_pipeline:
        export_pipeline(final, args.tokenizer, args.processor, os.path.join(training_args.output_dir, "pipeline"), overwrite=True)


if __name__ == "__main__":
    main()
