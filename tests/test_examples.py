"""Two-step runs of the training scripts in examples/ on the tiny preset: train, save, resume, export."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from spar_hf import SparForConditionalGeneration, SparPipeline, SparTokenizerModel
from spar_hf.presets import preset_configs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 30)}
SHAPES = ("square", "circle")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An imagefolder of coloured shapes with a `metadata.jsonl` of captions."""
    folder = tmp_path_factory.mktemp("shapes")
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            image = Image.new("RGB", (24, 24), "white")
            draw = ImageDraw.Draw(image)
            (draw.rectangle if shape == "square" else draw.ellipse)((4, 4, 19, 19), fill=rgb)
            name = f"{colour}_{shape}.png"
            image.save(folder / name)
            rows.append({"file_name": name, "text": f"{colour} {shape}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory, text_processor):
    folder = tmp_path_factory.mktemp("processor")
    text_processor.save_pretrained(folder)
    return folder


def run_script(name, *argv):
    old = sys.argv
    sys.argv = [name, *map(str, argv)]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = old


COMMON = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none", "--use_cpu",
          "--disable_tqdm", "true", "--seed", "0"]


def logged_losses(folder):
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def tokenizer_stages(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("tok")
    run_script("train_tokenizer.py", "--data", image_folder, "--stage", "1", "--output_dir", root / "s1", "--max_steps", "2", *COMMON)
    run_script("train_tokenizer.py", "--data", image_folder, "--stage", "2", "--init_from", root / "s1" / "final",
               "--output_dir", root / "s2", "--max_steps", "2", "--save_steps", "2", "--ema_decay", "0.9", *COMMON)
    return root


def test_tokenizer_stages_train_and_save(tokenizer_stages, image_folder):
    from safetensors.torch import load_file

    from spar_hf.training import ImageCaptionTransform, load_image_text_dataset

    stage1 = SparTokenizerModel.from_pretrained(tokenizer_stages / "s1" / "final")
    stage2 = SparTokenizerModel.from_pretrained(tokenizer_stages / "s2" / "final")
    # Stage 2 trained the encoder, so it moved away from stage 1's.
    before = stage1.vision_encoder.embeddings.patch_embedding.weight
    assert not torch.equal(stage2.vision_encoder.embeddings.patch_embedding.weight, before)
    # ...while the anchor, kept in the checkpoints, is stage 1's encoder, untouched.
    checkpoint = load_file(tokenizer_stages / "s2" / "checkpoint-2" / "model.safetensors")
    assert torch.equal(checkpoint["vision_anchor.embeddings.patch_embedding.weight"], before)
    # The final model is the generator's frozen codec: no anchor, and latents of unit scale on the training images.
    assert stage2.vision_anchor is None
    assert not stage2.config.train_vision_encoder
    assert stage2.config.semantic_loss_weight == 0.0
    images = load_image_text_dataset(str(image_folder))
    images.set_transform(ImageCaptionTransform(stage2.config.image_size))
    pixels = torch.stack(list(images[:]["pixel_values"]))
    with torch.no_grad():
        scaled = (stage2.encode(pixels).latents - stage2.config.shift_factor) * stage2.config.scaling_factor
    assert scaled.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scaled.std().item() == pytest.approx(1.0, abs=1e-4)


def test_tokenizer_gan_starts_at_given_step(image_folder, tokenizer_stages, tmp_path):
    from spar_hf.adversarial import PatchDiscriminator

    args = ["--data", image_folder, "--stage", "2", "--init_from", tokenizer_stages / "s1" / "final", "--max_steps", "3",
            "--save_steps", "3", "--gan_loss_weight", "0.1", "--discriminator_channels", "8", "--discriminator_layers", "2",
            *COMMON]
    run_script("train_tokenizer.py", *args, "--gan_start_step", "1", "--output_dir", tmp_path / "a")
    state = json.loads((tmp_path / "a" / "checkpoint-3" / "trainer_state.json").read_text())
    logged = {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}
    assert "loss_gan" not in logged[1]
    assert "loss_gan" in logged[2]
    assert "loss_disc" in logged[3]
    first = PatchDiscriminator.from_pretrained(tmp_path / "a" / "discriminator")
    assert first.config.num_layers == 2
    assert SparTokenizerModel.from_pretrained(tmp_path / "a" / "final").vision_anchor is None

    # A later run continues with the saved discriminator and trains it further.
    run_script("train_tokenizer.py", *args, "--discriminator_from", tmp_path / "a" / "discriminator",
               "--output_dir", tmp_path / "b")
    second = PatchDiscriminator.from_pretrained(tmp_path / "b" / "discriminator")
    fresh = PatchDiscriminator(base_channels=8, num_layers=2)
    assert not torch.equal(second.layers[0].weight, first.layers[0].weight)
    assert (second.layers[0].weight - first.layers[0].weight).abs().max() < (fresh.layers[0].weight - first.layers[0].weight).abs().max()


def test_generator_stages_export_a_pipeline(tmp_path, image_folder, tokenizer_stages, processor_dir):
    tokenizer = tokenizer_stages / "s2" / "final"
    run_script("train_generator.py", "--data", image_folder, "--tokenizer", tokenizer, "--processor", processor_dir,
               "--stage", "1", "--output_dir", tmp_path / "g1", "--max_steps", "2", *COMMON)
    first = SparForConditionalGeneration.from_pretrained(tmp_path / "g1" / "final")
    run_script("train_generator.py", "--data", image_folder, "--tokenizer", tokenizer, "--processor", processor_dir,
               "--stage", "2", "--init_from", tmp_path / "g1" / "final", "--output_dir", tmp_path / "g2",
               "--max_steps", "2", "--export_pipeline", "--ema_decay", "0.9", *COMMON)
    second = SparForConditionalGeneration.from_pretrained(tmp_path / "g2" / "final")
    # Stage 1 kept the DiT frozen; stage 2 trained it.
    assert not torch.equal(first.transformer.proj_out.weight, second.transformer.proj_out.weight)
    pipe = SparPipeline.from_pretrained(tmp_path / "g2" / "pipeline")
    image = pipe("red square", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)


def test_generator_stage1_leaves_dit_unchanged(tmp_path, image_folder, tokenizer_stages, processor_dir):
    torch.manual_seed(0)
    start = SparForConditionalGeneration(preset_configs("tiny")[1])
    start.save_pretrained(tmp_path / "start")
    run_script("train_generator.py", "--data", image_folder, "--tokenizer", tokenizer_stages / "s2" / "final",
               "--processor", processor_dir, "--stage", "1", "--init_from", tmp_path / "start",
               "--output_dir", tmp_path / "g1", "--max_steps", "2", *COMMON)
    trained = SparForConditionalGeneration.from_pretrained(tmp_path / "g1" / "final")
    assert torch.equal(trained.transformer.proj_out.weight, start.transformer.proj_out.weight)
    assert not torch.equal(trained.connector.proj.weight, start.connector.proj.weight)


@pytest.mark.parametrize(
    "script", ["train_tokenizer.py", "train_tokenizer.py --gan", "train_generator.py", "finetune.py", "finetune.py --lora"]
)
def test_resume_is_exact(tmp_path, image_folder, tokenizer_stages, processor_dir, tiny_pipeline, script):
    script, *option = script.split()
    if script == "train_tokenizer.py":
        args = ["--stage", "2", "--init_from", tokenizer_stages / "s1" / "final"]
        if option:
            args += ["--gan_loss_weight", "0.1", "--gan_start_step", "1", "--discriminator_channels", "8"]
    elif script == "train_generator.py":
        args = ["--tokenizer", tokenizer_stages / "s2" / "final", "--processor", processor_dir, "--stage", "2"]
    else:
        tiny_pipeline.save_pretrained(tmp_path / "start")
        args = ["--pipeline", tmp_path / "start", *(["--lora", "transformer"] if option else [])]
    args += ["--data", image_folder, "--max_steps", "3", "--save_steps", "1", "--ema_decay", "0.9",
             "--learning_rate", "1e-3", *COMMON]
    run_script(script, *args, "--output_dir", tmp_path / "full")
    uninterrupted = logged_losses(tmp_path / "full" / "checkpoint-3")
    # A run killed after step 2 restarts from its last checkpoint and trains step 3 only.
    shutil.rmtree(tmp_path / "full" / "checkpoint-1")
    shutil.rmtree(tmp_path / "full" / "checkpoint-3")
    run_script(script, *args, "--output_dir", tmp_path / "full", "--resume_from_checkpoint", tmp_path / "full" / "checkpoint-2")
    assert not (tmp_path / "full" / "checkpoint-1").exists()
    resumed = logged_losses(tmp_path / "full" / "checkpoint-3")
    assert uninterrupted[3] != uninterrupted[2]
    assert resumed[3] == pytest.approx(uninterrupted[3], abs=1e-4)
    assert (tmp_path / "full" / "checkpoint-2" / "ema.safetensors").exists()


def test_stored_targets_match_encoding_and_train(tmp_path, image_folder, tokenizer_stages, processor_dir):
    from spar_hf.training import ImageCaptionTransform, extract_generator_targets, load_generator_targets, load_image_text_dataset

    tokenizer = tokenizer_stages / "s2" / "final"
    run_script("extract_generator_targets.py", "--data", image_folder, "--tokenizer", tokenizer,
               "--output_dir", tmp_path / "targets", "--batch_size", "3")
    tokenizer_model = SparTokenizerModel.from_pretrained(tokenizer)
    stored = load_generator_targets(str(tmp_path / "targets"), tokenizer_model, grid_size=4)
    images = load_image_text_dataset(str(image_folder))
    images.set_transform(ImageCaptionTransform(16, output_column="target_pixel_values"))
    pixels = torch.stack([images[i]["target_pixel_values"] for i in range(len(images))])
    latents, features = extract_generator_targets(tokenizer_model, pixels, grid_size=4)
    stored = stored[:]
    assert list(stored["caption"]) == [images[i]["caption"] for i in range(len(images))]
    torch.testing.assert_close(stored["latents"], latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(stored["semantic_features"], features, rtol=0, atol=1e-6)

    run_script("train_generator.py", "--data", tmp_path / "targets", "--tokenizer", tokenizer, "--processor", processor_dir,
               "--stage", "2", "--max_steps", "2", "--output_dir", tmp_path / "g", *COMMON)
    assert (tmp_path / "g" / "final" / "model.safetensors").exists()


def test_stored_targets_checked_and_never_overwritten(tmp_path, image_folder, tokenizer_stages):
    from spar_hf.training import load_generator_targets

    tokenizer = tokenizer_stages / "s2" / "final"
    target = tmp_path / "targets"
    run_script("extract_generator_targets.py", "--data", image_folder, "--tokenizer", tokenizer, "--output_dir", target)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run_script("extract_generator_targets.py", "--data", image_folder, "--tokenizer", tokenizer, "--output_dir", target)
    assert exit_info.value.code == 2
    assert sorted(p.name for p in target.iterdir()) == before
    with pytest.raises(SystemExit):
        run_script("extract_generator_targets.py", "--data", image_folder, "--tokenizer", tokenizer,
                   "--output_dir", tmp_path / "odd", "--patch_size", "3")
    assert not (tmp_path / "odd").exists()
    assert len(load_generator_targets(str(target), grid_size=4)) == len(COLOURS) * len(SHAPES)
    with pytest.raises(ValueError, match="extracted with grid_size=4, but this run needs grid_size=2"):
        load_generator_targets(str(target), grid_size=2)
    run_script("extract_generator_targets.py", "--data", image_folder, "--tokenizer", tokenizer, "--output_dir", target,
               "--overwrite", "--patch_size", "2")
    assert len(load_generator_targets(str(target), grid_size=2)) == len(COLOURS) * len(SHAPES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_parquet_data(tmp_path, image_folder):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(image_folder), split="train")
    dataset.to_parquet(str(tmp_path / "shapes.parquet"))
    run_script("train_tokenizer.py", "--data", tmp_path / "shapes.parquet", "--output_dir", tmp_path / "out", "--max_steps", "1", *COMMON)
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("lora", [None, "transformer", "mllm,transformer"])
def test_finetune_exports_pipeline(tmp_path, image_folder, tiny_pipeline, lora):
    tiny_pipeline.save_pretrained(tmp_path / "start")
    extra = ["--lora", lora] if lora else []
    run_script("finetune.py", "--pipeline", tmp_path / "start", "--data", image_folder, "--output_dir", tmp_path / "ft",
               "--max_steps", "2", "--learning_rate", "1e-2", *extra, *COMMON)
    tuned = SparPipeline.from_pretrained(tmp_path / "ft" / "pipeline")
    before = tiny_pipeline.model.transformer.transformer_blocks[0].attn1.to_q.weight
    after = tuned.model.transformer.transformer_blocks[0].attn1.to_q.weight
    assert not torch.equal(before, after)  # trained, or LoRA merged into the base weight
    if lora:
        assert (tmp_path / "ft" / "lora").is_dir()
        # LoRA trains adapters only: the connector, trained by full fine-tuning, is unchanged.
        assert torch.equal(tuned.model.connector.proj.weight, tiny_pipeline.model.connector.proj.weight)
    image = tuned("red square", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)


DEMO_MODEL = Path(__file__).resolve().parent.parent / "src" / "spar_hf" / "demo_model"

# (script, arguments, part of the one-line message). The placeholders DATA, EMPTY, GENERATOR, TOKENIZER,
# PROCESSOR and PIPELINE stand for folders the test builds.
USAGE_ERRORS = {
    "gan-weight": ("train_tokenizer.py", ["--data", "DATA", "--gan_loss_weight", "-0.5"], "--gan_loss_weight must be >= 0. Got -0.5."),
    "gan-start": ("train_tokenizer.py", ["--data", "DATA", "--gan_start_step", "-1"], "--gan_start_step must be >= 0. Got -1."),
    "statistics": ("train_tokenizer.py", ["--data", "DATA", "--latent_statistics_samples", "0"],
                   "--latent_statistics_samples must be >= 1. Got 0."),
    "tokenizer-stage": ("train_tokenizer.py", ["--data", "DATA", "--stage", "3"], "--stage must be 1 or 2. Got 3."),
    "stage2-no-init": ("train_tokenizer.py", ["--data", "DATA", "--stage", "2"], "--stage 2 needs --init_from"),
    "missing-data": ("train_tokenizer.py", ["--data", "/nonexistent/shapes.parquet"],
                     "--data: '/nonexistent/shapes.parquet' not found; expected a folder of images"),
    "empty-data": ("train_tokenizer.py", ["--data", "EMPTY"], "--data: No images"),
    "generator-as-tokenizer": ("train_tokenizer.py", ["--data", "DATA", "--stage", "2", "--init_from", "GENERATOR"],
                               "'GENERATOR' contains a 'spar' checkpoint, but SparTokenizerModel loads 'spar_tokenizer'"),
    "generator-stage": ("train_generator.py", ["--data", "DATA", "--tokenizer", "TOKENIZER", "--processor", "PROCESSOR",
                                               "--stage", "3"], "--stage must be one of (1, 2). Got 3."),
    "missing-tokenizer": ("train_generator.py", ["--data", "DATA", "--tokenizer", "/nonexistent/tok", "--processor", "PROCESSOR"],
                          "--tokenizer '/nonexistent/tok' not found."),
    "wrong-tokenizer": ("train_generator.py", ["--data", "DATA", "--tokenizer", "GENERATOR", "--processor", "PROCESSOR"],
                        "'GENERATOR' contains a 'spar' checkpoint, but SparTokenizerModel loads 'spar_tokenizer'"),
    "vocabulary": ("train_generator.py", ["--data", "DATA", "--tokenizer", "TOKENIZER", "--processor", str(DEMO_MODEL / "processor")],
                   "--processor has 30522 tokens, but the generator's MLLM embeds only 1000"),
    "latent-channels": ("train_generator.py", ["--data", "DATA", "--tokenizer", "TOKENIZER", "--processor", "PROCESSOR",
                                               "--init_from", str(DEMO_MODEL)],
                        "--tokenizer makes 4-channel latents, but the generator's DiT takes 8 channels"),
    "lora-target": ("finetune.py", ["--pipeline", "PIPELINE", "--data", "DATA", "--lora", "vae"], "--lora got ['vae']"),
    "lora-rank": ("finetune.py", ["--pipeline", "PIPELINE", "--data", "DATA", "--lora", "transformer", "--lora_rank", "0"],
                  "--lora_rank must be >= 1. Got 0."),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error_is_one_line(case, capsys, tmp_path, image_folder, tokenizer_stages, processor_dir, tiny_generator, tiny_pipeline):
    script, argv, message = USAGE_ERRORS[case]
    places = {"DATA": image_folder, "EMPTY": tmp_path / "empty", "TOKENIZER": tokenizer_stages / "s2" / "final",
              "PROCESSOR": processor_dir, "GENERATOR": tmp_path / "generator", "PIPELINE": tmp_path / "pipeline"}
    (tmp_path / "empty").mkdir()
    if "GENERATOR" in argv:
        tiny_generator.save_pretrained(tmp_path / "generator")
    if "PIPELINE" in argv:
        tiny_pipeline.save_pretrained(tmp_path / "pipeline")
    argv = [str(places.get(arg, arg)) for arg in argv]
    message = message.replace("GENERATOR", str(places["GENERATOR"]))
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, *argv, "--output_dir", tmp_path / "out", "--max_steps", "1", *COMMON)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last_line
    assert not (tmp_path / "out" / "final").exists()


def test_earlier_run_kept_unless_overwrite(tmp_path, capsys, image_folder, tokenizer_stages):
    shutil.copytree(tokenizer_stages / "s1", tmp_path / "earlier")
    weights = tmp_path / "earlier" / "final" / "model.safetensors"
    before = weights.read_bytes()
    argv = ["--data", image_folder, "--output_dir", tmp_path / "earlier", "--max_steps", "1", "--seed", "1", *COMMON[:-2]]
    with pytest.raises(SystemExit) as exit_info:
        run_script("train_tokenizer.py", *argv)
    assert exit_info.value.code == 2
    assert "'final']; pass --resume_from_checkpoint to continue that run or --overwrite" in capsys.readouterr().err
    assert weights.read_bytes() == before
    run_script("train_tokenizer.py", *argv, "--overwrite")
    assert weights.read_bytes() != before
