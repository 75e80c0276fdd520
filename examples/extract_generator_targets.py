"""Encode a generator dataset once with the frozen SPAR tokenizer and store latents and alignment targets.

The generator then trains on the stored targets instead of running the tokenizer at every step:

  python examples/extract_generator_targets.py --data DIR --tokenizer out/tok2/final --output_dir out/targets
  accelerate launch examples/train_generator.py --data out/targets --tokenizer out/tok2/final ...

`--data` is a folder of images with captions in metadata.jsonl, or a parquet file. `--patch_size` is
the DiT's patch size (1 for SANA), which sets the grid of the alignment targets.
"""

import os
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from spar_hf.tokenizer import SparTokenizerModel
from spar_hf.training import ImageCaptionTransform, load_image_text_dataset, save_generator_targets


@dataclass
class ExtractArguments:
    data: str = field(metadata={"help": "Image folder with metadata.jsonl captions, or a .parquet file."})
    tokenizer: str = field(metadata={"help": "Trained SPAR tokenizer folder."})
    output_dir: str = field(metadata={"help": "Folder for the stored targets (a `datasets.save_to_disk` folder)."})
    patch_size: int = field(default=1, metadata={"help": "Patch size of the DiT that will train on the targets."})
    image_column: str = field(default="image", metadata={"help": "Dataset column with the images."})
    caption_column: str = field(default="text", metadata={"help": "Dataset column with the captions."})
    batch_size: int = field(default=64, metadata={"help": "Images encoded per tokenizer call."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})


def extract(args: ExtractArguments) -> None:
    for name in ("patch_size", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1. Got {getattr(args, name)}.")
    if os.path.exists(args.output_dir) and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir!r} already exists; pass --overwrite to replace it.")
    tokenizer_model = SparTokenizerModel.from_pretrained(args.tokenizer)
    if torch.cuda.is_available():
        tokenizer_model.to("cuda")
    config = tokenizer_model.config
    side = config.image_size // config.downsample_ratio
    if side % args.patch_size:
        raise ValueError(f"--patch_size {args.patch_size} does not divide the tokenizer's {side}x{side} latent grid.")
    grid = side // args.patch_size
    try:
        dataset = load_image_text_dataset(args.data, image_column=args.image_column, caption_column=args.caption_column)
    except ValueError as error:
        raise ValueError(f"--data: {error}") from error
    dataset.set_transform(ImageCaptionTransform(config.image_size, args.image_column, args.caption_column,
                                                output_column="target_pixel_values"))
    info = save_generator_targets(tokenizer_model, dataset, args.output_dir, grid, args.batch_size, args.overwrite)
    print(f"Stored targets of {info['rows']} images ({grid}x{grid} alignment grid) in {args.output_dir}")


def main() -> None:
    parser = HfArgumentParser(ExtractArguments)
    (args,) = parser.parse_args_into_dataclasses()
    try:
        extract(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
