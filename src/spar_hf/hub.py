"""Model cards for SPAR pipeline folders, rendered with `huggingface_hub.ModelCard`."""

from huggingface_hub import ModelCard, ModelCardData

from .pipeline import SparPipeline


def count_parameters(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def render_model_card(pipe: SparPipeline, template_path: str, **fields) -> ModelCard:
    """Fill the template with the pipeline's facts plus `fields` (description, training_data, evaluation, ...)."""
    model, vae = pipe.model, pipe.vae
    mllm_params = count_parameters(model.mllm)
    card_data = ModelCardData(
        library_name="spar_hf", pipeline_tag="text-to-image", license=fields.pop("license", "apache-2.0"),
        tags=["spar", "text-to-image", "flow-matching"],
    )
    facts = {
        "model_summary": (
            f"{model.config.mllm_config.model_type} backbone ({mllm_params / 1e6:.1f}M, frozen), "
            f"{model.config.num_queries} queries, routing `{model.config.routing_mode}` over layers "
            f"{model.config.routing_layers}, SANA DiT {count_parameters(model.transformer) / 1e6:.1f}M"
        ),
        "tokenizer_summary": (
            f"{vae.config.image_size}px, ratio {vae.config.downsample_ratio}, {vae.config.latent_channels} latent channels, "
            f"{count_parameters(vae) / 1e6:.1f}M parameters"
        ),
        "flow_shift": model.config.flow_shift,
        "processor_class": type(pipe.processor).__name__,
    }
    return ModelCard.from_template(card_data, template_path=template_path, **facts, **fields)
