r"""Build SPAR in the paper configuration from local checkpoints and write it as a pipeline folder.

SPAR-1B combines InternVL3-1B-hf, DC-AE f32c32 and a SANA DiT, and SPAR-3B uses InternVL3-2B-hf and
SANA-1.6B. The pretrained parts keep their weights, and SPAR's new layers start from random weights
drawn with `--seed`. A diffusers SANA pipeline folder can serve as both `--dcae` (its `vae/`) and
`--sana` (its `transformer/`).

Usage:
    python examples/build_paper_model.py --mllm checkpoints/InternVL3-1B-hf \
        --dcae checkpoints/Sana_600M_512px_diffusers --sana checkpoints/Sana_600M_512px_diffusers \
        --output build/spar-1b-init
"""

import argparse
import logging
import os
import shutil
import tempfile

logger = logging.getLogger("build_paper_model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mllm", required=True, help="Folder of an InternVL3-hf checkpoint (weights and tokenizer).")
    parser.add_argument("--dcae", required=True, help="Folder of a diffusers AutoencoderDC, or of a SANA pipeline (uses vae/).")
    parser.add_argument(
        "--sana", required=True, help="Folder of a diffusers SanaTransformer2DModel, or of a SANA pipeline (uses transformer/)."
    )
    parser.add_argument("--output", required=True, help="Folder to write the pipeline to; must be empty or absent.")
    parser.add_argument("--num-queries", type=int, default=256, help="Learnable query tokens read by the MLLM.")
    parser.add_argument("--connector-num-layers", type=int, default=6, help="Transformer layers between DTR and the DiT.")
    parser.add_argument(
        "--align-layer", type=int, default=8, help="1-based DiT block aligned with the tokenizer's semantic features."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the randomly initialised SPAR layers.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a non-empty --output folder once the new one is written."
    )
    return parser


def check_output(parser: argparse.ArgumentParser, output: str, overwrite: bool) -> None:
    """Exit with a usage error when `output` is a file, or a non-empty folder without --overwrite."""
    if os.path.isfile(output):
        parser.error(f"--output {output!r} is a file; pass a folder.")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        parser.error(f"--output {output!r} is not empty; pass an empty folder or add --overwrite.")


def write_pipeline(pipe, output: str) -> None:
    """Save into a temporary sibling folder, then move it to `output`, so a failed save leaves `output` as it was."""
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}-")
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(output):
        shutil.rmtree(output)
    os.replace(staging, output)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output(parser, args.output, args.overwrite)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # Imported after the argument checks, so a rejected command returns without loading torch.
    from transformers import set_seed

    from spar_hf.paper import build_paper_pipeline

    set_seed(args.seed)
    try:
        pipe = build_paper_pipeline(
            args.mllm, args.dcae, args.sana, num_queries=args.num_queries,
            connector_num_layers=args.connector_num_layers, align_layer=args.align_layer,
        )
    except ValueError as error:
        parser.error(str(error))
    write_pipeline(pipe, args.output)
    logger.info("Wrote the SPAR pipeline to %s; load it with SparPipeline.from_pretrained.", args.output)


if __name__ == "__main__":
    main()
