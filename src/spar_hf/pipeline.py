"""`SparPipeline`: text-to-image and instruction editing with a SPAR model, the diffusers way."""

import inspect
import os
from typing import Any, Callable

import PIL.Image
import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .generator import SparForConditionalGeneration
from .tokenizer import SparTokenizerModel

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Files a SPAR pipeline folder may contain; used when fetching it from the Hub ourselves.
HUB_ALLOW_PATTERNS = ["model_index.json", "README.md", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model", "*/*.jinja"]


class SparPipeline(DiffusionPipeline):
    r"""Generate images from text, or edit an image from an instruction, with SPAR.

    Args:
        model ([`SparForConditionalGeneration`]): MLLM, learnable queries, DTR, connector and DiT.
        vae ([`SparTokenizerModel`]): The SPAR tokenizer, the latent codec.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): Sampler; its `shift` should equal `model.config.flow_shift`.
        processor: The MLLM's tokenizer or processor (a processor with an image processor enables editing).
    """

    model_cpu_offload_seq = "model->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        model: SparForConditionalGeneration,
        vae: SparTokenizerModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        processor: Any,
    ) -> None:
        super().__init__()
        dit_channels = model.transformer.config.in_channels
        if vae.config.latent_channels != dit_channels:
            raise ValueError(
                f"The tokenizer's `latent_channels` ({vae.config.latent_channels}) must equal the DiT's `in_channels` "
                f"({dit_channels}); pair a SPAR model with the tokenizer it was trained on."
            )
        self.register_modules(model=model, vae=vae, scheduler=scheduler, processor=processor)
        self.vae_scale_factor = vae.config.downsample_ratio
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load from a local folder or a Hub repo id.

        Stock diffusers refuses to download a repo whose `model_index.json` names a library other
        than its known ones (here `spar_hf`), so a repo id is first fetched into the local cache with
        `huggingface_hub.snapshot_download` (which honours `HF_HUB_OFFLINE`), then loaded as a folder.
        """
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path) and (os.path.exists(path) or path.startswith(("/", "./", "../", "~")) or path.count("/") > 1):
            raise ValueError(
                f"`pretrained_model_name_or_path` {path!r} is not an existing folder; pass a folder written by "
                "`SparPipeline.save_pretrained` or a Hub repo id such as 'org/name'."
            )
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "revision", "token", "local_files_only", "force_download") if k in kwargs}
            path = snapshot_download(path, allow_patterns=HUB_ALLOW_PATTERNS, **hub_kwargs)
        elif not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(
                f"`pretrained_model_name_or_path` {path!r} is a folder without model_index.json; pass a folder written "
                "by `SparPipeline.save_pretrained` (for a single model use `SparForConditionalGeneration.from_pretrained`)."
            )
        return super().from_pretrained(path, **kwargs)

    # ----------------------------------------------------------------------------- guidance state

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ----------------------------------------------------------------------------- 1. inputs

    def check_inputs(
        self,
        prompt,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt=None,
        image=None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        generator=None,
        latents: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """Raise `ValueError`/`TypeError` naming the first invalid argument, its value and what is accepted."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"`prompt` must be a non-empty string or a non-empty list of strings. Got {type(prompt).__name__}.")
        if any(not p.strip() for p in prompts):
            raise ValueError("`prompt` must not be empty or whitespace; describe the image to generate.")
        multiple = self.vae_scale_factor * self.model.transformer.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple != 0:
                raise ValueError(f"`{name}` must be a positive multiple of {multiple} (the latent grid). Got {value!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1. Got {num_inference_steps!r}.")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0 (values <= 1 disable guidance). Got {guidance_scale!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1. Got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}. Got {output_type!r}.")
        self._check_negative_prompt(negative_prompt, len(prompts))
        self._check_image(image, len(prompts))

        batch_size = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the batch has {batch_size} images "
                f"({len(prompts)} prompt(s) x {num_images_per_prompt} per prompt); pass one generator per image or a single one."
            )
        if latents is not None:
            expected = (batch_size, self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"`latents` must have shape {expected} for these arguments. Got {got}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {sorted(unknown)}; accepted: {self._callback_tensor_inputs}."
            )

    @staticmethod
    def _check_negative_prompt(negative_prompt, num_prompts: int) -> None:
        if negative_prompt is None or isinstance(negative_prompt, str):
            return
        if not isinstance(negative_prompt, list) or not all(isinstance(p, str) for p in negative_prompt):
            raise TypeError(f"`negative_prompt` must be a string or a list of strings. Got {type(negative_prompt).__name__}.")
        if len(negative_prompt) != num_prompts:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {num_prompts}; pass one per prompt or a single string."
            )

    def _check_image(self, image, num_prompts: int) -> None:
        if image is None:
            return
        images = image if isinstance(image, list) else [image]
        if not all(isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor)) for i in images):
            raise TypeError(
                f"`image` must be a PIL image, numpy array or torch tensor, or a list of them. Got {type(image).__name__}."
            )
        if len(images) not in (1, num_prompts):
            raise ValueError(f"`image` has {len(images)} entries but `prompt` has {num_prompts}; pass one image per prompt.")
        if getattr(self.processor, "image_processor", None) is None or not hasattr(self.model.config.mllm_config, "vision_config"):
            raise ValueError(
                f"`image` (editing) needs an MLLM with a vision tower and an image processor; this model's MLLM is "
                f"{self.model.config.mllm_config.model_type!r} with processor {type(self.processor).__name__}, which reads text only."
            )

    # ----------------------------------------------------------------------------- 2. conditioning

    def _mllm_inputs(self, prompts: list[str], images: list | None, device) -> dict:
        if images is None:
            batch = self.processor(text=prompts, padding=True, return_tensors="pt")
        else:
            image_token = getattr(self.processor, "image_token", "<image>")
            texts = [f"{image_token}\n{p}" for p in prompts]
            batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        if "pixel_values" in batch:
            inputs["pixel_values"] = batch["pixel_values"].to(device=device, dtype=self.model.dtype)
        return inputs

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        image=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts (and negative prompts) with one MLLM call for the whole batch.

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`, each of shape
            `(batch_size * num_images_per_prompt, num_queries, caption_channels)`; the negatives are the
            learned null condition when `negative_prompt` is None, and None without guidance.
        """
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        B = len(prompts)
        images = None
        if image is not None:
            images = image if isinstance(image, list) else [image]
            if len(images) == 1:
                images = images * B

        negatives = None
        if do_classifier_free_guidance and negative_prompt is not None:
            negatives = [negative_prompt] * B if isinstance(negative_prompt, str) else list(negative_prompt)
        texts = prompts + (negatives or [])
        all_images = images
        if images is not None and negatives is not None:
            all_images = images + images
        embeds, _ = self.model.encode_condition(**self._mllm_inputs(texts, all_images, device))  # (B or 2B, Q, Dc)

        prompt_embeds = embeds[:B].repeat_interleave(num_images_per_prompt, dim=0)  # (B*n, Q, Dc)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negatives is not None:
            negative_prompt_embeds = embeds[B:].repeat_interleave(num_images_per_prompt, dim=0)  # (B*n, Q, Dc)
        else:
            negative_prompt_embeds = self.model.null_encoder_hidden_states(B * num_images_per_prompt).to(prompt_embeds.dtype)
        return prompt_embeds, negative_prompt_embeds

    # ----------------------------------------------------------------------------- 3. latents

    def prepare_latents(self, batch_size: int, height: int, width: int, dtype, device, generator, latents=None) -> torch.Tensor:
        """Draw initial noise of shape `(batch_size, C, height / r, width / r)`, or move given `latents`."""
        shape = (batch_size, self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent scaling and decode to images in [-1, 1]."""
        config = self.vae.config
        latents = latents / config.scaling_factor + config.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]  # (B, 3, H, W)

    # ----------------------------------------------------------------------------- 4. sampling

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Generate images.

        Args:
            prompt: Text prompt(s); for editing, the instruction(s).
            image (*optional*): Image(s) to edit; needs an MLLM with a vision tower.
            negative_prompt (*optional*): What to steer away from; None uses the learned null condition.
            height, width: Output size in pixels, multiples of the latent grid; default the tokenizer's `image_size`.
            num_inference_steps: Euler steps of the flow-matching ODE.
            guidance_scale: Classifier-free guidance scale; <= 1 disables guidance.
            num_images_per_prompt, generator, latents: As in diffusers; a list of generators gives one per image.
            output_type: "pil", "np", "pt" or "latent".
            callback_on_step_end: Called as `callback(pipe, step, timestep, callback_kwargs)` after each step;
                may return updated `latents`.

        Returns:
            [`ImagePipelineOutput`] with `images`, or a tuple `(images,)` when `return_dict=False`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        height = self.vae.config.image_size if height is None else height
        width = self.vae.config.image_size if width is None else width

        # 1. Check inputs
        self.check_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, negative_prompt, image,
            num_images_per_prompt, output_type, generator, latents, callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt

        # 2. Encode the prompts: the MLLM, DTR and connector run once here, never inside the loop
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt, image
        )

        # 3. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 4. Prepare latents
        dtype = self.model.transformer.dtype
        latents = self.prepare_latents(batch_size, height, width, dtype, device, generator, latents)  # (B, C, h, w)

        # 5. Denoising loop
        latents = self._denoise(latents, timesteps, prompt_embeds, negative_prompt_embeds,
                                callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 6. Decode
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _denoise(self, latents, timesteps, prompt_embeds, negative_prompt_embeds, callback_on_step_end, callback_tensor_inputs):
        """Integrate the ODE; guidance runs the conditional and unconditional branches as one batch."""
        transformer = self.model.transformer
        condition = prompt_embeds
        if self.do_classifier_free_guidance:
            condition = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, Q, Dc)
        condition = condition.to(transformer.dtype)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents  # (2B or B, C, h, w)
                timestep = t.expand(model_input.shape[0]).to(latents.dtype)
                velocity = transformer(model_input, encoder_hidden_states=condition, timestep=timestep, return_dict=False)[0]
                if self.do_classifier_free_guidance:
                    uncond, cond = velocity.chunk(2)
                    velocity = uncond + self.guidance_scale * (cond - uncond)  # (B, C, h, w)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local_values = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {name: local_values[name] for name in callback_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
        return latents
