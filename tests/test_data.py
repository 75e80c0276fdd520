import pytest
import torch

from spar_hf import data

pytestmark = pytest.mark.skipif(
    not any(__import__("os").path.exists(p) for p in data.EMOJI_FONT_PATHS),
    reason="needs Debian's fonts-noto-color-emoji (.ci/run installs it)",
)


def test_emoji_are_unique_captioned_and_rendered():
    images, captions = data.load_emoji(32)
    assert len(images) == len(captions) > 1300
    assert len(set(captions)) == len(captions)
    assert "red apple" in captions
    apple = data.to_pixel_values([images[captions.index("red apple")]])
    red, green = apple[0, 0].mean().item(), apple[0, 1].mean().item()
    assert red > green  # a red apple on white is redder than it is green


def test_photo_splits_are_disjoint_and_eval_crops_fixed():
    assert not set(data.TRAIN_PHOTOS) & set(data.EVAL_PHOTOS)
    first, second = data.eval_photo_crops(32), data.eval_photo_crops(32)
    assert len(first) == 16 * len(data.EVAL_PHOTOS)
    assert torch.equal(data.to_pixel_values(first), data.to_pixel_values(second))


def test_random_crops_follow_seed():
    photos = data.load_photos("train")
    a = data.to_pixel_values(data.photo_crops(photos, 16, 4, seed=0))
    b = data.to_pixel_values(data.photo_crops(photos, 16, 4, seed=0))
    assert a.shape == (4, 3, 16, 16)
    assert torch.equal(a, b)
    assert a.min() >= -1
    assert a.max() <= 1


def test_unknown_split_rejected():
    with pytest.raises(ValueError, match="`split` must be 'train' or 'eval'"):
        data.load_photos("test")
