"""Command-line entry point: `spar generate`, `spar reconstruct`."""

import argparse
import logging
import os
import sys
import tempfile
from importlib import resources

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("spar_hf.cli")

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def default_model_path() -> str:
    """Return the path of the demo pipeline shipped inside the package."""
    return str(resources.files("spar_hf") / "demo_model")


def _output_format(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"--output {path!r} has an unsupported extension; use one of {sorted(IMAGE_SUFFIXES)}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--output {path!r}: folder {folder!r} does not exist.")
    return IMAGE_SUFFIXES[suffix]


def save_image_atomically(image: Image.Image, path: str, image_format: str) -> None:
    """Write to a temporary file beside `path`, then rename, so an existing file is never left half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            image.save(f, format=image_format)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _load_pipeline(model: str):
    """Load `--model`, naming the flag in the error."""
    from .pipeline import SparPipeline

    try:
        return SparPipeline.from_pretrained(model)
    except (ValueError, OSError) as error:
        raise ValueError(f"--model {model!r} could not be loaded: {error}") from error


def generate(args: argparse.Namespace) -> None:
    image_format = _output_format(args.output)
    if not args.prompt.strip():
        raise ValueError(f"prompt {args.prompt!r} is empty; describe the image to generate, e.g. 'red apple'.")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1. Got {args.steps}.")
    if args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (values <= 1 disable guidance). Got {args.guidance}.")
    pipe = _load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=args.quiet)
    size = args.size or pipe.vae.config.image_size
    multiple = pipe.vae_scale_factor * pipe.model.transformer.config.patch_size
    if size % multiple != 0 or size <= 0:
        raise ValueError(f"--size must be a positive multiple of {multiple}. Got {size}.")
    image = pipe(
        args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        height=size, width=size, generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    if args.upscale > 1:
        image = image.resize((image.width * args.upscale, image.height * args.upscale), Image.Resampling.NEAREST)
    save_image_atomically(image, args.output, image_format)
    logger.info("Saved %s (%dx%d) for prompt %r", args.output, image.width, image.height, args.prompt)


def reconstruct(args: argparse.Namespace) -> None:
    from .tokenizer import SparTokenizerModel

    image_format = _output_format(args.output)
    if os.path.isdir(args.image):
        raise ValueError(f"image {args.image!r} is a folder; pass one image file.")
    if not os.path.isfile(args.image):
        raise ValueError(f"image {args.image!r} does not exist.")
    try:
        source = Image.open(args.image).convert("RGB")
    except OSError as error:
        raise ValueError(f"image {args.image!r} could not be read as an image: {error}") from error

    model_dir = args.model if os.path.isdir(args.model) else None
    vae = SparTokenizerModel.from_pretrained(model_dir or args.model, subfolder="vae").eval()
    size = args.size or vae.config.image_size
    if size % vae.config.downsample_ratio != 0:
        raise ValueError(f"--size must be a multiple of {vae.config.downsample_ratio}. Got {size}.")

    side = min(source.size)  # centre square crop, then the tokenizer's resolution
    left, top = (source.width - side) // 2, (source.height - side) // 2
    square = source.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    pixel_values = torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        sample = vae.decode(vae.encode(pixel_values).latents).sample  # (1, 3, size, size)
    array = ((sample[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    save_image_atomically(Image.fromarray(array), args.output, image_format)
    psnr = 10 * np.log10(255.0**2 / np.mean((array.astype(np.float64) - np.asarray(square, dtype=np.float64)) ** 2))
    logger.info("Saved %s (%dx%d); PSNR against the resized input: %.2f dB", args.output, size, size, psnr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spar", description="SPAR: generate and reconstruct images.")
    parser.add_argument("--quiet", action="store_true", help="Hide progress bars and info logs (put it before the command).")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="Generate an image from a text prompt.")
    gen.add_argument("prompt", help="What to draw, e.g. 'red apple'.")
    gen.add_argument("-o", "--output", required=True,
                     help="Output image file (.png, .jpg, .webp, .bmp). An existing file is replaced once the new image is written.")
    gen.add_argument("--model", default=default_model_path(), help="Pipeline folder or Hub repo id (default: the shipped demo).")
    gen.add_argument("--seed", type=int, default=0, help="Seed of the initial noise (default: 0).")
    gen.add_argument("--steps", type=int, default=20, help="Number of denoising steps (default: 20).")
    gen.add_argument("--guidance", type=float, default=4.5, help="Classifier-free guidance scale; <= 1 disables it (default: 4.5).")
    gen.add_argument("--negative-prompt", default=None, help="Negative prompt (default: the learned null condition).")
    gen.add_argument("--size", type=int, default=None, help="Height and width in pixels (default: the model's resolution).")
    gen.add_argument("--upscale", type=int, default=1, help="Nearest-neighbour enlargement factor for viewing (default: 1).")
    gen.set_defaults(func=generate)

    rec = commands.add_parser("reconstruct", help="Encode and decode an image through the SPAR tokenizer.")
    rec.add_argument("image", help="Input image file.")
    rec.add_argument("-o", "--output", required=True,
                     help="Output image file (.png, .jpg, .webp, .bmp). An existing file is replaced once the new image is written.")
    rec.add_argument("--model", default=default_model_path(), help="Pipeline folder or Hub repo id (default: the shipped demo).")
    rec.add_argument("--size", type=int, default=None, help="Side of the centre crop in pixels (default: the tokenizer's resolution).")
    rec.set_defaults(func=reconstruct)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if getattr(args, "upscale", 1) < 1:
        print(f"spar {args.command}: error: --upscale must be >= 1. Got {args.upscale}.", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"spar {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
