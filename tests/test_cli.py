import os

import numpy as np
import pytest
from PIL import Image

from spar_hf.cli import main


@pytest.fixture
def pipeline_dir(tmp_path, tiny_pipeline):
    folder = tmp_path / "pipe"
    tiny_pipeline.save_pretrained(folder)
    return folder


def test_generate_writes_image(tmp_path, pipeline_dir):
    out = tmp_path / "apple.png"
    assert main(["--quiet", "generate", "red apple", "-o", str(out), "--model", str(pipeline_dir), "--steps", "2"]) == 0
    image = Image.open(out)
    assert image.size == (16, 16)


def test_generate_is_seeded(tmp_path, pipeline_dir):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("0", "0", "1")):
        main(["--quiet", "generate", "red apple", "-o", str(path), "--model", str(pipeline_dir), "--steps", "2", "--seed", seed])
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert np.array_equal(arrays[0], arrays[1])
    assert not np.array_equal(arrays[0], arrays[2])


def test_upscale(tmp_path, pipeline_dir):
    out = tmp_path / "big.png"
    main(["--quiet", "generate", "sun", "-o", str(out), "--model", str(pipeline_dir), "--steps", "1", "--upscale", "4"])
    assert Image.open(out).size == (64, 64)


def test_failed_generate_keeps_existing_output(tmp_path, pipeline_dir, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"previous result")
    # Fails after the pipeline has loaded, the latest point before writing.
    assert main(["generate", "sun", "-o", str(out), "--size", "18", "--model", str(pipeline_dir)]) == 2
    assert "--size must be a positive multiple" in capsys.readouterr().err
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png", "pipe"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "sun", "-o", "out.gif"], "unsupported extension"),
        (["generate", "sun", "-o", "missing_dir/out.png"], "does not exist"),
        (["generate", "sun", "-o", "out.png", "--steps", "0"], "--steps must be >= 1. Got 0."),
        (["generate", "sun", "-o", "out.png", "--guidance", "-2"], "--guidance must be >= 0"),
        (["generate", "sun", "-o", "out.png", "--size", "18"], "--size must be a positive multiple of 4. Got 18."),
        (["generate", "sun", "-o", "out.png", "--upscale", "0"], "--upscale must be >= 1"),
        (["reconstruct", "nothing.png", "-o", "out.png"], "does not exist"),
        (["reconstruct", ".", "-o", "out.png"], "image '.' is a folder; pass one image file."),
        (["generate", "  ", "-o", "out.png"], "prompt '  ' is empty"),
    ],
)
def test_bad_arguments(tmp_path, pipeline_dir, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--model", str(pipeline_dir)]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    assert main(["generate", "sun", "-o", str(tmp_path / "a.png"), "--model", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert "--model" in error
    assert "is not an existing folder" in error


def test_output_file_gets_usual_mode(tmp_path, pipeline_dir):
    out = tmp_path / "mode.png"
    main(["--quiet", "generate", "sun", "-o", str(out), "--model", str(pipeline_dir), "--steps", "1"])
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_reconstruct(tmp_path, pipeline_dir):
    source = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "rec.png"
    assert main(["--quiet", "reconstruct", str(source), "-o", str(out), "--model", str(pipeline_dir)]) == 0
    assert Image.open(out).size == (16, 16)


def test_reconstruct_rejects_non_image(tmp_path, pipeline_dir, capsys):
    source = tmp_path / "notes.png"
    source.write_text("not an image")
    assert main(["reconstruct", str(source), "-o", str(tmp_path / "out.png"), "--model", str(pipeline_dir)]) == 2
    assert "could not be read as an image" in capsys.readouterr().err
