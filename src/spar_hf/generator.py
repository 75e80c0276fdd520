"""`SparForConditionalGeneration`: a frozen MLLM, learnable queries, DTR, a connector and a SANA DiT.

Conditioning path (once per prompt): prompt tokens + `num_queries` learnable query embeddings go
through the MLLM; the states of the query tokens at the routed layers are mixed by
[`DynamicTokenRouter`]; a bidirectional connector maps them to the DiT's caption width.
Training adds flow matching in the tokenizer's latent space and self-alignment: an MLP projector
on the output of DiT block `align_layer` regresses, by negative cosine, the tokenizer's own
semantic features of the clean image (REPA's loss with the SPAR tokenizer as teacher).
"""

import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import SanaTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import ModelOutput, logging

from . import flow_matching
from .checkpoints import check_model_type
from .layers import TransformerBlock, build_mlp
from .routing import ROUTING_MODES, DynamicTokenRouter, routing_entropy

logger = logging.get_logger(__name__)

DIT_SELF_ATTENTION = ("linear", "softmax")
MLLM_HEADS = {"image_text_to_text": AutoModelForImageTextToText, "causal_lm": AutoModelForCausalLM, "base": AutoModel}
PACKAGE_PATH_PREFIX = "python-package:"

DEFAULT_TRANSFORMER_CONFIG = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "num_layers": 2,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 32,
    "cross_attention_dim": 64,
    "caption_channels": 64,
    "mlp_ratio": 2.5,
    "sample_size": 8,
    "patch_size": 1,
}


def resolve_pretrained_path(path: str) -> str:
    """Resolve `python-package:NAME/SUBDIR` to a folder inside an installed package; return other paths as they are."""
    if not path.startswith(PACKAGE_PATH_PREFIX):
        return path
    package, _, subdir = path[len(PACKAGE_PATH_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"`mllm_pretrained_path` names package {package!r}, which is not installed; `pip install` it.")
    return os.path.join(list(spec.submodule_search_locations)[0], subdir)


class SparConfig(PretrainedConfig):
    r"""Configuration of [`SparForConditionalGeneration`].

    Args:
        mllm_config (`dict` or `PretrainedConfig`): Config of the frozen MLLM (any transformers model
            that returns hidden states; InternVL3 in the paper).
        mllm_head (`str`): Auto class the MLLM is built with: `"image_text_to_text"`, `"causal_lm"`,
            `"base"` (no text generation), or `"auto"` (image-text-to-text where transformers has
            one for `mllm_config`, else base).
        mllm_pretrained_path (`str`, *optional*): Where the frozen MLLM weights come from. When set,
            they are not written by `save_pretrained` and are read from this path on load. Accepts a
            folder or `python-package:NAME/SUBDIR`.
        num_queries (`int`): Learnable query tokens `Q` appended after the prompt.
        routing_mode (`str`): `"dtr"`, `"last"` or `"mean"`.
        routing_layers (`list[int]`, *optional*): Indices into the MLLM's `hidden_states` tuple
            (0 is the embedding output), ascending; default all transformer layers.
        connector_num_layers, connector_num_heads (`int`): Bidirectional connector transformer.
        transformer_config (`dict`): `SanaTransformer2DModel` config.
        align_layer (`int`): 1-based DiT block whose output is aligned.
        align_projector_dim (`int`): Hidden width of the 3-layer alignment projector.
        align_feature_dim (`int`): Width of the tokenizer's semantic features (the target).
        align_loss_weight (`float`): Weight of `loss_align`; 0 disables self-alignment.
        cond_dropout_prob (`float`): Probability of replacing a sample's condition by the learned
            null condition during training, for classifier-free guidance.
        flow_shift (`float`): Sigma shift shared by training and the scheduler.
        train_mllm (`bool`): Leave the MLLM trainable (for LoRA or full fine-tuning).
        dit_self_attention (`str`): `"linear"` keeps SANA's ReLU linear self-attention, built for
            thousands of tokens; `"softmax"` swaps in scaled dot-product attention, which costs little
            and models small token grids better (the demo uses it on 8x8 tokens).
    """

    model_type = "spar"
    sub_configs = {"mllm_config": AutoConfig}

    def __init__(
        self,
        mllm_config: dict | PretrainedConfig | None = None,
        mllm_head: str = "auto",
        mllm_pretrained_path: str | None = None,
        num_queries: int = 4,
        routing_mode: str = "dtr",
        routing_layers: list[int] | None = None,
        connector_num_layers: int = 1,
        connector_num_heads: int = 4,
        transformer_config: dict | None = None,
        align_layer: int = 1,
        align_projector_dim: int = 64,
        align_feature_dim: int = 64,
        align_loss_weight: float = 0.5,
        cond_dropout_prob: float = 0.1,
        flow_shift: float = 1.0,
        train_mllm: bool = False,
        dit_self_attention: str = "linear",
        **kwargs,
    ) -> None:
        if isinstance(mllm_config, dict):
            mllm_config = AutoConfig.for_model(**mllm_config)
        elif mllm_config is None:
            mllm_config = AutoConfig.for_model(
                "bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=128
            )
        self.mllm_config = mllm_config
        self.mllm_head = mllm_head
        self.mllm_pretrained_path = mllm_pretrained_path
        self.num_queries = num_queries
        self.routing_mode = routing_mode
        num_text_layers = mllm_config.get_text_config().num_hidden_layers
        self.routing_layers = list(routing_layers) if routing_layers is not None else list(range(1, num_text_layers + 1))
        self.connector_num_layers = connector_num_layers
        self.connector_num_heads = connector_num_heads
        self.transformer_config = {**DEFAULT_TRANSFORMER_CONFIG, **(transformer_config or {})}
        self.align_layer = align_layer
        self.align_projector_dim = align_projector_dim
        self.align_feature_dim = align_feature_dim
        self.align_loss_weight = align_loss_weight
        self.cond_dropout_prob = cond_dropout_prob
        self.flow_shift = flow_shift
        self.train_mllm = train_mllm
        self.dit_self_attention = dit_self_attention
        super().__init__(**kwargs)
        self.validate()

    @property
    def mllm_hidden_size(self) -> int:
        return self.mllm_config.get_text_config().hidden_size

    def validate(self) -> None:
        """Raise `ValueError` for inconsistent settings, naming the field and the accepted values."""
        if self.mllm_head not in (*MLLM_HEADS, "auto"):
            raise ValueError(f"`mllm_head` must be one of {[*MLLM_HEADS, 'auto']}. Got {self.mllm_head!r}.")
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"`routing_mode` must be one of {ROUTING_MODES}. Got {self.routing_mode!r}.")
        num_text_layers = self.mllm_config.get_text_config().num_hidden_layers
        layers = self.routing_layers
        if not layers or any(not 0 <= i <= num_text_layers for i in layers) or layers != sorted(set(layers)):
            raise ValueError(
                f"`routing_layers` must be a non-empty ascending list of distinct indices in [0, {num_text_layers}] "
                f"(the MLLM's hidden_states). Got {layers}."
            )
        if self.num_queries < 1:
            raise ValueError(f"`num_queries` must be >= 1. Got {self.num_queries}.")
        if self.mllm_hidden_size % self.connector_num_heads != 0:
            raise ValueError(
                f"The MLLM hidden size ({self.mllm_hidden_size}) must be divisible by `connector_num_heads`. "
                f"Got {self.connector_num_heads}."
            )
        num_blocks = self.transformer_config["num_layers"]
        if self.align_loss_weight > 0 and not 1 <= self.align_layer <= num_blocks:
            raise ValueError(f"`align_layer` must be in [1, {num_blocks}] (the DiT's blocks). Got {self.align_layer}.")
        if self.align_loss_weight < 0:
            raise ValueError(f"`align_loss_weight` must be >= 0. Got {self.align_loss_weight}.")
        if not 0 <= self.cond_dropout_prob < 1:
            raise ValueError(f"`cond_dropout_prob` must be in [0, 1). Got {self.cond_dropout_prob}.")
        if self.flow_shift <= 0:
            raise ValueError(f"`flow_shift` must be > 0. Got {self.flow_shift}.")
        if self.dit_self_attention not in DIT_SELF_ATTENTION:
            raise ValueError(f"`dit_self_attention` must be one of {DIT_SELF_ATTENTION}. Got {self.dit_self_attention!r}.")


@dataclass
class SparOutput(ModelOutput):
    """Output of [`SparForConditionalGeneration.forward`].

    Args:
        loss: `loss_flow + align_loss_weight * loss_align`.
        loss_flow: Flow-matching MSE on the velocity.
        loss_align: Negative-cosine self-alignment loss, `1 - cos` averaged over tokens.
        routing_entropy: Mean entropy (nats) of the router's softmax over layers: log(K) for uniform
            weights, 0 for `last`.
        routing_gate: The DTR gate that blends the router's mixture with the last layer (0 at initialisation).
        routing_weights (`(batch_size, num_queries, num_routed_layers)`): Effective layer weights.
        model_output (`(batch_size, C, H, W)`): Predicted velocity.
    """

    loss: torch.Tensor | None = None
    loss_flow: torch.Tensor | None = None
    loss_align: torch.Tensor | None = None
    routing_entropy: torch.Tensor | None = None
    routing_gate: torch.Tensor | None = None
    routing_weights: torch.Tensor | None = None
    model_output: torch.Tensor | None = None


class SparPreTrainedModel(PreTrainedModel):
    config_class = SparConfig
    base_model_prefix = "spar"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock", "SanaTransformerBlock"]
    _supports_sdpa = True


class SparConnector(nn.Module):
    """Bidirectional transformer layers over the routed query states, then a projection to the DiT's caption width."""

    def __init__(self, hidden_size: int, num_layers: int, num_heads: int, out_features: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(hidden_size, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)  # (B, Q, D)
        return self.proj(self.norm(hidden_states))  # (B, Q, Dc)


class SparForConditionalGeneration(SparPreTrainedModel):
    """SPAR's generator; see the module docstring."""

    def __init__(self, config: SparConfig) -> None:
        super().__init__(config)
        self.mllm = self._build_mllm(config)

        D = config.mllm_hidden_size
        caption_channels = config.transformer_config["caption_channels"]
        self.queries = nn.Parameter(torch.randn(config.num_queries, D) * 0.02)  # (Q, D)
        self.router = DynamicTokenRouter(D, len(config.routing_layers), config.routing_mode)
        self.connector = SparConnector(D, config.connector_num_layers, config.connector_num_heads, caption_channels)
        # The condition used when a prompt is dropped in training and for the unconditional branch of guidance.
        self.null_condition = nn.Parameter(torch.randn(config.num_queries, caption_channels) * 0.02)  # (Q, Dc)

        self.transformer = SanaTransformer2DModel.from_config(config.transformer_config)
        if config.dit_self_attention == "softmax":
            for block in self.transformer.transformer_blocks:
                block.attn1.set_processor(SanaAttnProcessor2_0())
        inner_dim = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        self.align_projector = None
        self._aligned_states = None
        self._capture_alignment = False
        # Runtime switch, not saved: generator stage 1 trains without alignment (the DiT is frozen).
        self.alignment_enabled = config.align_loss_weight > 0
        if config.align_loss_weight > 0:
            self.align_projector = build_mlp(inner_dim, config.align_projector_dim, config.align_feature_dim)
            block = self.transformer.transformer_blocks[config.align_layer - 1]
            block.register_forward_hook(self._capture_aligned_states)
        self.post_init()
        self._unwrap_token_embeddings()
        self.freeze_frozen_parts()

    def _unwrap_token_embeddings(self) -> None:
        """Drop from `_no_split_modules` every block that contains the MLLM's token embeddings (BERT's `BertEmbeddings`).

        `_append_queries` calls the embeddings directly, so FSDP2 must shard them as a group of their own.
        accelerate does so after sharding the `_no_split_modules` blocks, and fails when one of those
        blocks already owns the embedding weight.
        """
        embeddings = self.get_input_embeddings()
        path = next(name for name, module in self.named_modules() if module is embeddings).split(".")
        enclosing = {type(self.get_submodule(".".join(path[:depth]))).__name__ for depth in range(1, len(path))}
        self._no_split_modules = set(self._no_split_modules) - enclosing

    def freeze_frozen_parts(self) -> None:
        """Set `requires_grad=False` on the MLLM unless `config.train_mllm`.

        `from_pretrained` creates parameters anew, so it calls this again after loading. LoRA adapters
        added later set their own flags.
        """
        self.mllm.requires_grad_(self.config.train_mllm)

    @staticmethod
    def _build_mllm(config: SparConfig) -> PreTrainedModel:
        head = config.mllm_head
        if head == "auto":
            supported = config.mllm_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            head = "image_text_to_text" if supported else "base"
        return MLLM_HEADS[head].from_config(config.mllm_config)

    def _init_weights(self, module: nn.Module) -> None:
        # The MLLM and the DiT initialise themselves in `from_config`; only our layers need it.
        if isinstance(module, nn.Linear) and not getattr(module, "_is_hf_initialized", False):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True):
        """Switch modes but keep a frozen MLLM in eval mode, so its dropout never perturbs the condition."""
        super().train(mode)
        if not self.config.train_mllm:
            self.mllm.eval()
        return self

    # ----------------------------------------------------------------------------- checkpoints

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """Save as usual, leaving out frozen MLLM weights that `mllm_pretrained_path` provides."""
        if self.config.mllm_pretrained_path and not self.config.train_mllm:
            state_dict = state_dict if state_dict is not None else self.state_dict()
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("mllm.")}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load as usual, then fill MLLM weights from `mllm_pretrained_path` when the checkpoint leaves them out."""
        if args:
            check_model_type(cls, args[0], **kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        # transformers reports every missing key as "newly initialized". The MLLM keys are missing on
        # purpose when `mllm_pretrained_path` provides them, so a narrower warning below replaces the report.
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        finally:
            logging.set_verbosity(verbosity)
        missing = {k for k in info["missing_keys"] if k.startswith("mllm.")}
        others = sorted(set(info["missing_keys"]) - missing)
        if others:
            logger.warning("%d weights were missing from the checkpoint and are newly initialised, e.g. %s", len(others), others[:3])
        if missing and model.config.mllm_pretrained_path:
            model.load_mllm_weights(model.config.mllm_pretrained_path)
            info["missing_keys"] = set(info["missing_keys"]) - missing
        elif missing:
            raise ValueError(
                f"The checkpoint has no weights for {len(missing)} MLLM parameters (e.g. {sorted(missing)[0]}) and "
                "`mllm_pretrained_path` is not set, so the MLLM would be random."
            )
        model.freeze_frozen_parts()
        model.restore_dit_position_embedding()
        return (model, info) if output_loading_info else model

    def restore_dit_position_embedding(self) -> None:
        """Recompute the DiT's sin-cos position table, a non-persistent buffer that checkpoints leave out.

        transformers 5.25's `from_pretrained` leaves that buffer at zeros. Without this call, a DiT
        trained with positions would sample without them.
        """
        embed = self.transformer.patch_embed
        if getattr(embed, "pos_embed", None) is None or embed.pos_embed_max_size:
            return
        grid = math.isqrt(embed.pos_embed.shape[1])
        table = get_2d_sincos_pos_embed(
            embed.pos_embed.shape[-1], grid, base_size=embed.base_size, interpolation_scale=embed.interpolation_scale,
            device=embed.pos_embed.device, output_type="pt",
        )
        with torch.no_grad():
            embed.pos_embed.copy_(table.float().unsqueeze(0))

    def load_mllm_weights(self, path: str) -> None:
        """Copy pretrained MLLM weights from a folder (or `python-package:` path) into `self.mllm`."""
        folder = resolve_pretrained_path(path)
        dtype = next(self.transformer.parameters()).dtype
        pretrained = type(self.mllm).from_pretrained(folder, dtype=dtype)
        result = self.mllm.load_state_dict(pretrained.state_dict(), strict=False)
        if result.missing_keys:
            logger.warning("MLLM weights from %s miss %d keys, e.g. %s", folder, len(result.missing_keys), result.missing_keys[:3])

    # ----------------------------------------------------------------------------- conditioning

    def get_input_embeddings(self) -> nn.Module:
        """Return the MLLM's token embeddings, which `_append_queries` calls directly.

        Without this override transformers raises here. accelerate's FSDP2 preparation and
        `spar_hf.distributed.shard_model` call it to give the embeddings an FSDP group of their own,
        which the direct call needs because it runs outside the forward of their parent module.
        """
        return self.mllm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """Return the MLLM's language-model head, or None when its backbone has none (BERT).

        accelerate's FSDP2 preparation puts this head in one group with the token embeddings when
        their weights are tied. Without it, the tied weight would sit in two groups, which FSDP2 rejects.
        """
        return self.mllm.get_output_embeddings()

    def _append_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Place the queries right after each prompt's last real token, then padding.

        Padding therefore never sits between a prompt and its queries, so a prompt gets the same
        positions, and the same condition, whatever the longest prompt of its batch.
        """
        B, L = input_ids.shape
        Q = self.config.num_queries
        embeds = self.mllm.get_input_embeddings()(input_ids)  # (B, L, D)
        queries = self.queries.to(embeds.dtype).expand(B, Q, -1)  # (B, Q, D)
        sequence = torch.cat([embeds, queries], dim=1)  # (B, L+Q, D)
        mask = torch.cat([attention_mask, attention_mask.new_ones(B, Q)], dim=1)  # (B, L+Q)

        # Sort key: real prompt tokens by position, then queries, then padding.
        position = torch.arange(L + Q, device=input_ids.device).expand(B, -1)  # (B, L+Q)
        key = torch.where(mask.bool(), position, position + 2 * (L + Q))  # (B, L+Q)
        order = key.argsort(dim=1)  # (B, L+Q)
        sequence = sequence.gather(1, order[..., None].expand_as(sequence))  # (B, L+Q, D)
        mask = mask.gather(1, order)  # (B, L+Q)

        lengths = attention_mask.sum(dim=1, keepdim=True)  # (B, 1)
        query_index = lengths + torch.arange(Q, device=input_ids.device)  # (B, Q)
        return sequence, mask, query_index

    def encode_condition(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn prompts into DiT conditions: run the MLLM once, route the query states, apply the connector.

        Args:
            input_ids (`(batch_size, sequence_length)`): Prompt tokens, as the MLLM's processor returns them.
            attention_mask (`(batch_size, sequence_length)`, *optional*): 1 for real tokens.
            pixel_values (*optional*): Images for an MLLM with a vision tower (editing); the prompt must
                contain the processor's image tokens.

        Returns:
            `(encoder_hidden_states, routing_weights)` of shapes `(batch_size, num_queries, caption_channels)`
            and `(batch_size, num_queries, num_routed_layers)`.
        """
        condition, weights, _ = self._condition_and_routing(input_ids, attention_mask, pixel_values)
        return condition, weights

    def _condition_and_routing(self, input_ids, attention_mask, pixel_values):
        """Return `encode_condition`'s outputs plus the router's own softmax, which training logs."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs_embeds, mask, query_index = self._append_queries(input_ids, attention_mask)
        extra = {} if pixel_values is None else {"pixel_values": pixel_values}
        outputs = self.mllm.base_model(
            inputs_embeds=inputs_embeds, attention_mask=mask, output_hidden_states=True, return_dict=True, **extra
        )
        gather_index = query_index[..., None].expand(-1, -1, inputs_embeds.shape[-1])  # (B, Q, D)
        layers = [outputs.hidden_states[i].gather(1, gather_index) for i in self.config.routing_layers]  # K x (B, Q, D)
        routed, weights, probabilities = self.router(layers)  # (B, Q, D), (B, Q, K), (B, Q, K)
        return self.connector(routed), weights, probabilities  # (B, Q, Dc), (B, Q, K), (B, Q, K)

    def null_encoder_hidden_states(self, batch_size: int) -> torch.Tensor:
        """Return the learned unconditional condition, of shape `(batch_size, num_queries, caption_channels)`."""
        return self.null_condition[None].expand(batch_size, -1, -1)

    # ----------------------------------------------------------------------------- training

    def _capture_aligned_states(self, module, args, output) -> None:
        # Only `forward` sets `_capture_alignment`, so sampling keeps no reference to block outputs.
        if self._capture_alignment:
            self._aligned_states = output if isinstance(output, torch.Tensor) else output[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        latents: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        semantic_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> SparOutput:
        """Compute the training losses for one batch.

        Args:
            input_ids, attention_mask: Prompt tokens.
            latents (`(batch_size, C, H, W)`): Clean latents, already scaled by the tokenizer's
                `scaling_factor`/`shift_factor`.
            semantic_features (`(batch_size, num_dit_tokens, align_feature_dim)`, *optional*): The
                tokenizer's semantic features of the clean image; required when `align_loss_weight > 0`.
            pixel_values (*optional*): MLLM image input for editing data.
            noise, sigmas (*optional*): Fixed noise `(B, C, H, W)` and sigmas `(B,)`; drawn when absent.
        """
        config = self.config
        B = latents.shape[0]
        use_alignment = self.align_projector is not None and self.alignment_enabled
        if use_alignment and semantic_features is None:
            raise ValueError("`semantic_features` are required when `align_loss_weight` > 0 (self-alignment is on).")

        condition, weights, probabilities = self._condition_and_routing(input_ids, attention_mask, pixel_values)
        if self.training and config.cond_dropout_prob > 0:
            drop = torch.rand(B, device=latents.device) < config.cond_dropout_prob  # (B,)
            condition = torch.where(drop[:, None, None], self.null_encoder_hidden_states(B).to(condition.dtype), condition)

        noise = torch.randn_like(latents) if noise is None else noise  # (B, C, H, W)
        sigmas = flow_matching.sample_sigmas(B, config.flow_shift, device=latents.device) if sigmas is None else sigmas
        model_input = flow_matching.noisy_latents(latents, noise, sigmas)  # (B, C, H, W)
        timestep = flow_matching.sigmas_to_timesteps(sigmas)  # (B,)

        self._aligned_states = None
        self._capture_alignment = use_alignment
        try:
            model_output = self.transformer(
                model_input, encoder_hidden_states=condition, timestep=timestep, return_dict=False
            )[0]  # (B, C, H, W)
        finally:
            self._capture_alignment = False
        loss_flow = F.mse_loss(model_output.float(), flow_matching.velocity_target(latents, noise).float())

        loss_align = model_output.new_zeros((), dtype=torch.float32)
        if use_alignment:
            loss_align = self._alignment_loss(semantic_features)

        entropy = routing_entropy(probabilities.detach().float())
        loss = loss_flow + config.align_loss_weight * loss_align
        output = SparOutput(
            loss=loss, loss_flow=loss_flow, loss_align=loss_align, routing_entropy=entropy,
            routing_gate=self.router.gate.detach().reshape(()) if config.routing_mode == "dtr" else None,
            routing_weights=weights, model_output=model_output,
        )
        return output if return_dict else output.to_tuple()

    def _alignment_loss(self, semantic_features: torch.Tensor) -> torch.Tensor:
        states = self._aligned_states  # (B, N, D_dit)
        self._aligned_states = None
        if states.shape[1] != semantic_features.shape[1]:
            raise ValueError(
                f"`semantic_features` has {semantic_features.shape[1]} tokens but the DiT has {states.shape[1]}; "
                "pool the tokenizer features to the DiT's patch grid (`get_semantic_features(grid_size=...)`)."
            )
        projected = self.align_projector(states)  # (B, N, Df)
        return 1 - F.cosine_similarity(projected.float(), semantic_features.float(), dim=-1).mean()

    # ----------------------------------------------------------------------------- understanding

    def generate(self, *args, **kwargs):
        """Generate text with the MLLM itself (image understanding), exactly as the MLLM's own `generate`."""
        if not getattr(self.mllm, "can_generate", lambda: False)():
            raise ValueError(
                f"This SPAR model's MLLM ({type(self.mllm).__name__}) has no language-model head, so it cannot generate "
                "text; build it with `mllm_head='image_text_to_text'` or `'causal_lm'`."
            )
        return self.mllm.generate(*args, **kwargs)
