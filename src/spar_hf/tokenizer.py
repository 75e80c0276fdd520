"""The SPAR unified tokenizer: an asymmetric dual-stream autoencoder.

A *semantic stream* compresses the features of a vision encoder into a few channels per latent
cell, and a *pixel stream* (patch embedding plus transformer blocks) adds the high-frequency
detail that semantic features lose. Both are fused into one latent, which a DC-AE decoder turns
back into pixels. Training losses, named as in the paper:

- `loss_rec` (`L_r`): L2 + L1 on pixels, plus a feature loss in the frozen vision encoder's space;
- `loss_pixel` (`L_p`): the pixel stream, projected, regresses the latent of a frozen DC-AE teacher;
- `loss_sem` (`L_s`): a trainable vision encoder stays close to a frozen copy of itself.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC
from diffusers.models.autoencoders.autoencoder_dc import Decoder
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .checkpoints import check_model_type
from .layers import TransformerBlock, sincos_position_embedding

logger = logging.get_logger(__name__)

# Configuration of the DC-AE decoder that turns the fused latent back into pixels. Keys are the
# `decoder_*` arguments of diffusers' `AutoencoderDC` without the prefix, plus its
# `attention_head_dim` and `upsample_block_type`; the number of blocks fixes the ratio. The last
# three keys take the defaults of diffusers 0.42, so configs saved without them build the same decoder.
DEFAULT_DECODER_CONFIG = {
    "block_out_channels": (64, 128, 256),
    "layers_per_block": (1, 1, 1),
    "block_types": "ResBlock",
    "norm_types": "rms_norm",
    "act_fns": "silu",
    "qkv_multiscales": ((), (), ()),
    "attention_head_dim": 32,
    "upsample_block_type": "pixel_shuffle",
    "in_shortcut": True,
    "conv_act_fn": "relu",
}


class SparTokenizerConfig(PretrainedConfig):
    r"""Configuration of [`SparTokenizerModel`].

    Args:
        vision_config (`dict` or `PretrainedConfig`):
            Config of the semantic vision encoder: any transformers vision model that returns
            `last_hidden_state` of shape `(batch_size, num_patches[+1], hidden_size)`.
        vision_image_size (`int`): Side the image is resized to before the vision encoder.
        vision_image_mean, vision_image_std (`list[float]`): Normalisation the vision encoder expects,
            applied to images in [0, 1].
        train_vision_encoder (`bool`): Train the vision encoder. A frozen copy of it (the anchor) is
            then kept for `L_s` and the feature loss.
        pixel_teacher_config (`dict`, *optional*): `AutoencoderDC` config of the pixel latent teacher.
            `None` disables `L_p`.
        image_size (`int`): Training resolution, used by the pipeline as its default size.
        downsample_ratio (`int`): Pixels per latent cell along each side.
        latent_channels (`int`): Channels of the fused latent.
        use_semantic_stream, use_pixel_stream (`bool`): Ablation switches; at least one must be on.
        semantic_channels (`int`): Channels the semantic stream keeps per latent cell.
        pixel_hidden_size, pixel_num_layers, pixel_num_heads (`int`): Pixel stream transformer.
        decoder_config (`dict`): DC-AE decoder; see `DEFAULT_DECODER_CONFIG`.
        rec_l2_weight, rec_l1_weight, rec_feature_weight (`float`): Terms of `L_r`.
        pixel_loss_weight (`float`): Weight of `L_p`.
        semantic_loss_weight (`float`): Weight of `L_s`; needs `train_vision_encoder=True`.
        scaling_factor, shift_factor (`float`): Map latents to unit scale for diffusion:
            `(latents - shift_factor) * scaling_factor`, as in diffusers autoencoders.
    """

    model_type = "spar_tokenizer"
    sub_configs = {"vision_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        vision_image_size: int = 32,
        vision_image_mean: list[float] | None = None,
        vision_image_std: list[float] | None = None,
        train_vision_encoder: bool = False,
        pixel_teacher_config: dict | None = None,
        image_size: int = 32,
        downsample_ratio: int = 4,
        latent_channels: int = 8,
        use_semantic_stream: bool = True,
        use_pixel_stream: bool = True,
        semantic_channels: int = 8,
        pixel_hidden_size: int = 64,
        pixel_num_layers: int = 2,
        pixel_num_heads: int = 4,
        decoder_config: dict | None = None,
        rec_l2_weight: float = 1.0,
        rec_l1_weight: float = 1.0,
        rec_feature_weight: float = 0.1,
        pixel_loss_weight: float = 0.5,
        semantic_loss_weight: float = 0.0,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        **kwargs,
    ) -> None:
        if isinstance(vision_config, dict):
            vision_config = AutoConfig.for_model(**vision_config)
        elif vision_config is None:
            vision_config = AutoConfig.for_model(
                "siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=4,
            )
        self.vision_config = vision_config
        self.vision_image_size = vision_image_size
        self.vision_image_mean = list(vision_image_mean or [0.5, 0.5, 0.5])
        self.vision_image_std = list(vision_image_std or [0.5, 0.5, 0.5])
        self.train_vision_encoder = train_vision_encoder
        self.pixel_teacher_config = dict(pixel_teacher_config) if pixel_teacher_config is not None else None
        self.image_size = image_size
        self.downsample_ratio = downsample_ratio
        self.latent_channels = latent_channels
        self.use_semantic_stream = use_semantic_stream
        self.use_pixel_stream = use_pixel_stream
        self.semantic_channels = semantic_channels
        self.pixel_hidden_size = pixel_hidden_size
        self.pixel_num_layers = pixel_num_layers
        self.pixel_num_heads = pixel_num_heads
        self.decoder_config = {**DEFAULT_DECODER_CONFIG, **(decoder_config or {})}
        self.rec_l2_weight = rec_l2_weight
        self.rec_l1_weight = rec_l1_weight
        self.rec_feature_weight = rec_feature_weight
        self.pixel_loss_weight = pixel_loss_weight
        self.semantic_loss_weight = semantic_loss_weight
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` for inconsistent settings, naming the field and the accepted values."""
        if not (self.use_semantic_stream or self.use_pixel_stream):
            raise ValueError("At least one of `use_semantic_stream` and `use_pixel_stream` must be True.")
        decoder_blocks = len(self.decoder_config["block_out_channels"])
        if self.downsample_ratio != 2 ** (decoder_blocks - 1):
            raise ValueError(
                f"`downsample_ratio` must equal 2**(len(decoder_config['block_out_channels']) - 1) = "
                f"{2 ** (decoder_blocks - 1)}. Got {self.downsample_ratio}."
            )
        if self.image_size % self.downsample_ratio != 0:
            raise ValueError(
                f"`image_size` must be divisible by `downsample_ratio` ({self.downsample_ratio}). Got {self.image_size}."
            )
        if self.pixel_hidden_size % (4 * self.pixel_num_heads) != 0 and self.use_pixel_stream:
            raise ValueError(
                f"`pixel_hidden_size` must be divisible by 4 * `pixel_num_heads` ({4 * self.pixel_num_heads}). "
                f"Got {self.pixel_hidden_size}."
            )
        if self.semantic_loss_weight > 0 and not self.train_vision_encoder:
            raise ValueError(
                f"`semantic_loss_weight` > 0 ({self.semantic_loss_weight}) needs `train_vision_encoder=True`: "
                "`L_s` anchors a trainable encoder and is identically zero for a frozen one."
            )
        if self.pixel_teacher_config is not None:
            teacher_blocks = len(self.pixel_teacher_config.get("encoder_block_out_channels", ()))
            if 2 ** (teacher_blocks - 1) != self.downsample_ratio:
                raise ValueError(
                    f"The pixel teacher compresses by 2**{teacher_blocks - 1}, but `downsample_ratio` is "
                    f"{self.downsample_ratio}; pass a teacher with {int(math.log2(self.downsample_ratio)) + 1} "
                    "encoder blocks or `pixel_teacher_config=None`."
                )
        for name in ("rec_l2_weight", "rec_l1_weight", "rec_feature_weight", "pixel_loss_weight", "semantic_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0. Got {getattr(self, name)}.")

    @property
    def latent_grid(self) -> int:
        """Latent cells along each side at `image_size`."""
        return self.image_size // self.downsample_ratio


@dataclass
class SparTokenizerEncoderOutput(ModelOutput):
    """Output of [`SparTokenizerModel.encode`].

    Args:
        latents (`torch.Tensor` of shape `(batch_size, latent_channels, height, width)`): Unscaled latents.
        latent (`torch.Tensor`): The same tensor under the name diffusers' `AutoencoderDC` uses.
    """

    latents: torch.Tensor | None = None
    latent: torch.Tensor | None = None


@dataclass
class SparTokenizerDecoderOutput(ModelOutput):
    """Output of [`SparTokenizerModel.decode`]: `sample` of shape `(batch_size, 3, H, W)` in [-1, 1]."""

    sample: torch.Tensor | None = None


@dataclass
class SparTokenizerOutput(ModelOutput):
    """Output of [`SparTokenizerModel.forward`]: the total loss, each named term, latents and reconstruction."""

    loss: torch.Tensor | None = None
    loss_rec: torch.Tensor | None = None
    loss_pixel: torch.Tensor | None = None
    loss_sem: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    # Set by `spar_hf.adversarial.SparTokenizerWithDiscriminator` once its GAN terms are on.
    loss_gan: torch.Tensor | None = None
    loss_disc: torch.Tensor | None = None


def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Reshape patch tokens `(B, N, D)` to a square grid `(B, D, h, w)`, dropping a leading class token."""
    B, N, D = tokens.shape
    side = math.isqrt(N)
    if side * side != N:
        side = math.isqrt(N - 1)
        if side * side != N - 1:
            raise ValueError(f"Vision encoder returned {N} tokens, which is neither a square grid nor one plus a square.")
        tokens = tokens[:, 1:]
    return tokens.transpose(1, 2).reshape(B, D, side, side)  # (B, D, h, w)


class SparTokenizerPreTrainedModel(PreTrainedModel):
    config_class = SparTokenizerConfig
    base_model_prefix = "spar_tokenizer"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True


class SparTokenizerModel(SparTokenizerPreTrainedModel):
    """SPAR's dual-stream tokenizer; see the module docstring.

    Images are `pixel_values` of shape `(batch_size, 3, H, W)` in [-1, 1], as in diffusers.
    """

    def __init__(self, config: SparTokenizerConfig) -> None:
        super().__init__(config)
        r = config.downsample_ratio

        # Semantic stream: vision encoder features pooled to the latent grid, then a 1x1 head.
        self.vision_encoder = AutoModel.from_config(config.vision_config)
        self.vision_anchor = copy.deepcopy(self.vision_encoder) if config.train_vision_encoder else None
        vision_width = config.vision_config.hidden_size
        self.semantic_head = nn.Conv2d(vision_width, config.semantic_channels, 1) if config.use_semantic_stream else None

        # Pixel stream: non-overlapping patches of the latent cell size, then transformer blocks.
        if config.use_pixel_stream:
            self.pixel_embed = nn.Conv2d(3, config.pixel_hidden_size, kernel_size=r, stride=r)
            self.pixel_blocks = nn.ModuleList(
                TransformerBlock(config.pixel_hidden_size, config.pixel_num_heads) for _ in range(config.pixel_num_layers)
            )
            self.pixel_norm = nn.LayerNorm(config.pixel_hidden_size)
        else:
            self.pixel_embed = self.pixel_blocks = self.pixel_norm = None

        # L_p: the pixel stream is projected onto the teacher's latent channels.
        self.pixel_teacher = None
        self.pixel_projector = None
        if config.pixel_teacher_config is not None and config.use_pixel_stream:
            self.pixel_teacher = AutoencoderDC.from_config(config.pixel_teacher_config)
            teacher_channels = config.pixel_teacher_config["latent_channels"]
            self.pixel_projector = nn.Conv2d(config.pixel_hidden_size, teacher_channels, 1)

        fused_in = (config.semantic_channels if config.use_semantic_stream else 0) + (
            config.pixel_hidden_size if config.use_pixel_stream else 0
        )
        self.fusion = nn.Conv2d(fused_in, config.latent_channels, 1)

        decoder = config.decoder_config
        self.decoder = Decoder(
            in_channels=3,
            latent_channels=config.latent_channels,
            attention_head_dim=decoder["attention_head_dim"],
            block_type=tuple(decoder["block_types"]) if isinstance(decoder["block_types"], list) else decoder["block_types"],
            block_out_channels=tuple(decoder["block_out_channels"]),
            layers_per_block=tuple(decoder["layers_per_block"]),
            qkv_multiscales=tuple(tuple(s) for s in decoder["qkv_multiscales"]),
            norm_type=decoder["norm_types"],
            act_fn=decoder["act_fns"],
            upsample_block_type=decoder["upsample_block_type"],
            in_shortcut=decoder["in_shortcut"],
            conv_act_fn=decoder["conv_act_fn"],
        )
        self.post_init()
        self.freeze_frozen_parts()

    def freeze_frozen_parts(self) -> None:
        """Set `requires_grad=False` on the anchor, the teacher and (unless trained) the vision encoder.

        `from_pretrained` creates parameters anew, so it calls this again after loading.
        """
        self.vision_encoder.requires_grad_(self.config.train_vision_encoder)
        for frozen in (self.vision_anchor, self.pixel_teacher):
            if frozen is not None:
                frozen.requires_grad_(False)

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models built by `from_config` initialise themselves; only our own layers need it.
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not getattr(module, "_is_hf_initialized", False):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> None:
        """Return None: the tokenizer reads pixels and has no token embeddings. accelerate's FSDP2 preparation calls this."""
        return None

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load as usual; when the anchor is missing (stage 2 started from a stage 1 checkpoint), copy it from the encoder."""
        if args:
            check_model_type(cls, args[0], **kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if model.vision_anchor is not None and any(k.startswith("vision_anchor.") for k in info["missing_keys"]):
            # transformers has just reported these keys as "newly initialized", which is not what happens here.
            logger.warning("The `vision_anchor.*` weights above are copied from the loaded vision encoder, not left random.")
            model.vision_anchor.load_state_dict(model.vision_encoder.state_dict())
            info["missing_keys"] = {k for k in info["missing_keys"] if not k.startswith("vision_anchor.")}
        model.freeze_frozen_parts()
        return (model, info) if output_loading_info else model

    # ----------------------------------------------------------------------------- features

    def _vision_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map [-1, 1] images to the vision encoder's size and normalisation."""
        size = self.config.vision_image_size
        images = (pixel_values + 1) / 2  # (B, 3, H, W) in [0, 1]
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = images.new_tensor(self.config.vision_image_mean)[:, None, None]
        std = images.new_tensor(self.config.vision_image_std)[:, None, None]
        return (images - mean) / std

    def vision_features(self, pixel_values: torch.Tensor, use_anchor: bool = False) -> torch.Tensor:
        """Return vision encoder features as a grid of shape `(batch_size, hidden_size, h, w)`."""
        encoder = self.vision_anchor if use_anchor and self.vision_anchor is not None else self.vision_encoder
        dtype = next(encoder.parameters()).dtype
        tokens = encoder(pixel_values=self._vision_inputs(pixel_values).to(dtype)).last_hidden_state  # (B, N, Dv)
        return _tokens_to_grid(tokens)  # (B, Dv, h, w)

    def get_semantic_features(self, pixel_values: torch.Tensor, grid_size: int) -> torch.Tensor:
        """Return the tokenizer's semantic features pooled to a `grid_size` grid: the self-alignment target.

        Shape `(batch_size, grid_size * grid_size, hidden_size)`, row-major like a DiT's patch tokens.
        """
        features = self.vision_features(pixel_values)  # (B, Dv, h, w)
        features = F.adaptive_avg_pool2d(features, grid_size)  # (B, Dv, g, g)
        return features.flatten(2).transpose(1, 2)  # (B, g*g, Dv)

    def _pixel_stream(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.pixel_embed(pixel_values)  # (B, Dp, h, w)
        B, D, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, Dp)
        tokens = tokens + sincos_position_embedding(h, w, D, device=x.device, dtype=x.dtype)
        for block in self.pixel_blocks:
            tokens = block(tokens)
        tokens = self.pixel_norm(tokens)
        return tokens.transpose(1, 2).reshape(B, D, h, w)  # (B, Dp, h, w)

    def _encode_streams(self, pixel_values: torch.Tensor):
        """Return the fused latent and the intermediate features the losses need."""
        grid = (pixel_values.shape[-2] // self.config.downsample_ratio, pixel_values.shape[-1] // self.config.downsample_ratio)
        parts, vision_grid, pixel_features = [], None, None
        if self.config.use_semantic_stream:
            vision_grid = self.vision_features(pixel_values)  # (B, Dv, h', w')
            pooled = F.adaptive_avg_pool2d(vision_grid, grid)  # (B, Dv, h, w)
            parts.append(self.semantic_head(pooled))  # (B, Cs, h, w)
        if self.config.use_pixel_stream:
            pixel_features = self._pixel_stream(pixel_values)  # (B, Dp, h, w)
            parts.append(pixel_features)
        latents = self.fusion(torch.cat(parts, dim=1))  # (B, C, h, w)
        return latents, vision_grid, pixel_features

    # ----------------------------------------------------------------------------- codec

    def _check_pixel_values(self, pixel_values) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            got = f"shape {tuple(pixel_values.shape)}" if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"`pixel_values` must be a tensor of shape (batch_size, 3, H, W) in [-1, 1]. Got {got}.")
        r = self.config.downsample_ratio
        if pixel_values.shape[-1] % r or pixel_values.shape[-2] % r:
            raise ValueError(
                f"`pixel_values` height and width must be divisible by `downsample_ratio` ({r}). "
                f"Got {tuple(pixel_values.shape[-2:])}."
            )

    def encode(self, pixel_values: torch.Tensor, return_dict: bool = True):
        """Encode images in [-1, 1] to unscaled latents of shape `(B, latent_channels, H / r, W / r)`."""
        self._check_pixel_values(pixel_values)
        latents, _, _ = self._encode_streams(pixel_values)
        if not return_dict:
            return (latents,)
        return SparTokenizerEncoderOutput(latents=latents, latent=latents)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        """Decode unscaled latents to images in [-1, 1] of shape `(B, 3, H, W)`."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            got = f"shape {tuple(latents.shape)}" if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"`latents` must be a tensor of shape (batch_size, {self.config.latent_channels}, h, w). Got {got}."
            )
        sample = self.decoder(latents)  # (B, 3, H, W)
        if not return_dict:
            return (sample,)
        return SparTokenizerDecoderOutput(sample=sample)

    # ----------------------------------------------------------------------------- training

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs) -> SparTokenizerOutput:
        """Reconstruct `pixel_values` and return the training losses.

        `loss = loss_rec + pixel_loss_weight * loss_pixel + semantic_loss_weight * loss_sem`; each term is
        returned on its own for logging and is zero when switched off.
        """
        self._check_pixel_values(pixel_values)
        config = self.config
        latents, vision_grid, pixel_features = self._encode_streams(pixel_values)
        sample = self.decoder(latents)  # (B, 3, H, W)

        zero = sample.new_zeros(())
        frozen_features = None  # frozen vision features of the input, shared by the feature loss and L_s
        if config.rec_feature_weight > 0 or config.semantic_loss_weight > 0:
            frozen_features = self._frozen_input_features(pixel_values, vision_grid)  # (B, Dv, h', w')

        loss_rec = config.rec_l2_weight * F.mse_loss(sample, pixel_values) + config.rec_l1_weight * F.l1_loss(sample, pixel_values)
        if config.rec_feature_weight > 0:
            predicted = self.vision_features(sample, use_anchor=True)  # gradients reach `sample` only
            loss_rec = loss_rec + config.rec_feature_weight * (1 - F.cosine_similarity(predicted, frozen_features, dim=1).mean())

        loss_pixel = zero
        if self.pixel_teacher is not None and config.pixel_loss_weight > 0:
            with torch.no_grad():
                target = self.pixel_teacher.encode(pixel_values).latent  # (B, Ct, h, w)
            loss_pixel = F.mse_loss(self.pixel_projector(pixel_features), target)

        loss_sem = zero
        if config.semantic_loss_weight > 0 and vision_grid is not None:
            loss_sem = 1 - F.cosine_similarity(vision_grid, frozen_features, dim=1).mean()

        loss = loss_rec + config.pixel_loss_weight * loss_pixel + config.semantic_loss_weight * loss_sem
        output = SparTokenizerOutput(
            loss=loss, loss_rec=loss_rec, loss_pixel=loss_pixel, loss_sem=loss_sem, latents=latents, sample=sample
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def _frozen_input_features(self, pixel_values: torch.Tensor, vision_grid: torch.Tensor | None) -> torch.Tensor:
        """Return the frozen encoder's features of the input: the anchor's when the encoder trains.

        A frozen encoder already produced them in the semantic stream, so they are reused. The feature
        loss compares the reconstruction with them through the same frozen network, so it never moves
        encoder weights.
        """
        if self.vision_anchor is None and vision_grid is not None:
            return vision_grid.detach()
        return self.vision_features(pixel_values, use_anchor=True)
