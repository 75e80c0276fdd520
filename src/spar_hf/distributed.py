"""FSDP2 (`torch.distributed.fsdp.fully_shard`) helpers for SPAR models.

`shard_model` follows accelerate 1.16's grouping for `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`
without an explicit class list: one FSDP group for the input token embeddings, one per module
whose class is named in the model's `_no_split_modules`, then one for the root. transformers adds
the lists of the sub-models to an instance's `_no_split_modules`, so the MLLM's layers
(`BertLayer`, `Qwen2DecoderLayer`, ...) and the SANA blocks get their own groups. A group may mix
frozen and trainable parameters, which FSDP2 supports. The root, for example, contains the frozen
MLLM parameters outside its blocks next to the learnable queries.

Unlike accelerate 1.16's own preparation, `shard_model` shards the token embeddings before their
parent block, which accelerate gets wrong for BERT, and keeps any 0-dim parameter out of FSDP.
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers.utils import logging

logger = logging.get_logger(__name__)


def no_split_module_classes(model: nn.Module) -> list[str]:
    """Return the class names in `model._no_split_modules` that `model` contains, sorted.

    A model can list a class that it never builds. For example, `SparTokenizerModel` inherits
    `SiglipTextEmbeddings` from SigLIP's list but contains only the vision tower. accelerate skips such names too.
    """
    built = {type(module).__name__ for module in model.modules()}
    return sorted(name for name in (getattr(model, "_no_split_modules", None) or ()) if name in built)


def shard_model(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """Apply FSDP2's `fully_shard` to every `_no_split_modules` block of `model`, then to `model`.

    Collective: every rank of the default process group must call it on an identical model. The
    model is sharded in place and returned. `fully_shard_kwargs` (`mesh`, `reshard_after_forward`,
    `mp_policy`, `offload_policy`) are passed to every `fully_shard` call.

    FSDP2 rejects 0-dim parameters (SPAR has none since the DTR gate became 1-D). Any such parameter stays whole on every
    rank, on the device they are on (so move the model to its device first), and a gradient hook
    averages their gradients across ranks as FSDP does for the sharded ones.
    """
    scalars = {param for param in model.parameters() if param.ndim == 0}

    # The generator calls the token embeddings directly, not through their parent block (BERT's
    # `BertEmbeddings`), so they need a group of their own to be gathered for that call. It is
    # sharded first because a parent block sharded earlier would already own its weight.
    embedding_group = _token_embedding_group(model)
    if embedding_group:
        fully_shard(embedding_group, ignored_params=scalars, **fully_shard_kwargs)

    classes = set(no_split_module_classes(model))
    blocks = [module for module in model.modules() if module is not model and type(module).__name__ in classes]
    # `modules()` lists a parent before its children, so the reverse shards nested blocks first.
    for block in reversed(blocks):
        fully_shard(block, ignored_params=scalars, **fully_shard_kwargs)
    fully_shard(model, ignored_params=scalars, **fully_shard_kwargs)

    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_gradient_across_ranks)
    logger.info(
        "Sharded %d blocks of classes %s, then the root. %d 0-dim parameters stay replicated.",
        len(blocks), sorted(classes), len(scalars),
    )
    return model


def _token_embedding_group(model: nn.Module) -> list[nn.Module]:
    """Return the input token embeddings and every module tied to their weight (an MLLM's `lm_head`).

    FSDP2 rejects a parameter shared by two groups, so tied modules must be sharded together.
    """
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        # transformers raises NotImplementedError for a model without token inputs, e.g. SparTokenizerModel.
        return []
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        return []
    group = [embeddings]
    for module in model.modules():
        if module is not embeddings and getattr(module, "weight", None) is weight:
            group.append(module)
    return group


def _average_gradient_across_ranks(param: nn.Parameter) -> None:
    # Every rank runs the same backward graph, so this all-reduce is issued in the same order on each
    # rank relative to FSDP's own reduce-scatters. Gloo has no AVG reduction, hence SUM then divide.
    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
    param.grad.div_(dist.get_world_size())


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full, unsharded state dict of an FSDP2 model on CPU.

    Collective: every rank must call it. Rank 0 gets every tensor. The other ranks get an empty
    dict, which keeps their host memory free of a full copy.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_full_checkpoint(model: nn.Module, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """Gather the full state dict and write it with `save_pretrained` on rank 0.

    Collective: every rank must call it. It returns on every rank once the files are written, so
    any rank may read them afterwards. The folder loads with the model class's `from_pretrained`.
    """
    state_dict = gather_full_state_dict(model)
    if dist.get_rank() == 0:
        model.save_pretrained(save_directory, state_dict=state_dict, **save_kwargs)
    dist.barrier()
