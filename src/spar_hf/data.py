"""Real data available offline: Noto Color Emoji captioned with CLDR names, and bundled photos.

Emoji come from Debian's `fonts-noto-color-emoji` and are named with the `emoji` package; photos
come from the image files that scikit-image, scikit-learn and matplotlib install.
"""

import importlib.util
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
)
# Noto Color Emoji is a bitmap font whose only strike is 109 px.
EMOJI_FONT_SIZE = 109

# (package, file inside it). The held-out photos never enter tokenizer training.
TRAIN_PHOTOS = (
    ("skimage", "data/astronaut.png"), ("skimage", "data/coffee.png"), ("skimage", "data/rocket.jpg"),
    ("skimage", "data/brick.png"), ("skimage", "data/grass.png"), ("skimage", "data/gravel.png"),
    ("skimage", "data/hubble_deep_field.jpg"), ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/retina.jpg"), ("skimage", "data/ihc.png"), ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
)
EVAL_PHOTOS = (
    ("skimage", "data/chelsea.png"), ("skimage", "data/motorcycle_right.png"),
    ("sklearn", "datasets/images/china.jpg"), ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


def find_emoji_font() -> str:
    """Return the path of Noto Color Emoji, or raise with the install command."""
    for path in EMOJI_FONT_PATHS:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Noto Color Emoji not found at {EMOJI_FONT_PATHS}; install it with `apt-get install fonts-noto-color-emoji`."
    )


def emoji_caption(character: str) -> str:
    """Return the CLDR name of an emoji as plain words, e.g. "red apple"."""
    import emoji

    return emoji.EMOJI_DATA[character]["en"].strip(":").replace("_", " ")


def render_emoji(character: str, resolution: int, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """Render one emoji centred on white at `resolution` pixels; None when the font has no glyph."""
    canvas = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((10, 10), character, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    return square.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)


def load_emoji(resolution: int = 32) -> tuple[list[Image.Image], list[str]]:
    """Render every single-code-point emoji the font draws, with a unique CLDR caption each.

    Returns `(images, captions)` in a fixed order (sorted by code point).
    """
    import emoji

    font = ImageFont.truetype(find_emoji_font(), EMOJI_FONT_SIZE)
    images, captions, seen = [], [], set()
    for character in sorted(c for c in emoji.EMOJI_DATA if len(c) == 1):
        caption = emoji_caption(character)
        if caption in seen:
            continue
        image = render_emoji(character, resolution, font)
        if image is None or np.asarray(image).min() > 250:  # blank: the font lacks this glyph
            continue
        seen.add(caption)
        images.append(image)
        captions.append(caption)
    return images, captions


def _package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package {package!r} is not installed; it provides the photo {relative}.")
    return os.path.join(list(spec.submodule_search_locations)[0], relative)


def load_photos(split: str = "train") -> list[Image.Image]:
    """Load the bundled real photos of `split` ("train" or "eval") as RGB images."""
    if split not in ("train", "eval"):
        raise ValueError(f"`split` must be 'train' or 'eval'. Got {split!r}.")
    sources = TRAIN_PHOTOS if split == "train" else EVAL_PHOTOS
    return [Image.open(_package_file(package, path)).convert("RGB") for package, path in sources]


def photo_crops(photos: list[Image.Image], resolution: int, count: int, seed: int) -> list[Image.Image]:
    """Cut `count` random square crops (a quarter to all of the short side) and resize them to `resolution`."""
    rng = random.Random(seed)
    crops = []
    for _ in range(count):
        photo = rng.choice(photos)
        short = min(photo.size)
        side = rng.randint(max(resolution, short // 4), short)
        left, top = rng.randint(0, photo.size[0] - side), rng.randint(0, photo.size[1] - side)
        crop = photo.crop((left, top, left + side, top + side))
        crops.append(crop.resize((resolution, resolution), Image.Resampling.BICUBIC))
    return crops


def eval_photo_crops(resolution: int, per_photo: int = 16) -> list[Image.Image]:
    """Deterministic evaluation crops: a 4x4 grid of half-short-side crops from each held-out photo."""
    crops = []
    for photo in load_photos("eval"):
        side = min(photo.size) // 2
        steps = int(per_photo ** 0.5)
        for i in range(steps):
            for j in range(steps):
                left = (photo.size[0] - side) * i // max(steps - 1, 1)
                top = (photo.size[1] - side) * j // max(steps - 1, 1)
                crop = photo.crop((left, top, left + side, top + side))
                crops.append(crop.resize((resolution, resolution), Image.Resampling.BICUBIC))
    return crops


def to_16x16_vectors(images: list[Image.Image]) -> np.ndarray:
    """Box-downsample images to 16x16 RGB and flatten them: the space where prompt following counts neighbours.

    Returns a float array of shape `(N, 768)`.
    """
    return np.stack([np.asarray(i.convert("RGB").resize((16, 16), Image.Resampling.BOX), dtype=np.float32).ravel() for i in images])


def to_pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """Stack PIL images into a float tensor of shape `(N, 3, H, W)` in [-1, 1]."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])  # (N, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1  # (N, 3, H, W)
