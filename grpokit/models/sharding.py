"""Full fine-tuning with FSDP2 (``torch.distributed.fsdp.fully_shard``): each of W ranks keeps 1/W of every
weight, of its gradient and of AdamW's two moments, instead of all of them.

What is sharded (``training.fsdp: true``, ``model.lora: null``, several processes): each transformer block (the
classes the model names in ``_no_split_modules``, as accelerate's transformer-based wrapping picks them) is one
FSDP unit; everything else (the embeddings, the final norm, the output head, tied to the embeddings in SmolLM2)
is the root unit. The frozen reference of ``algorithm.beta > 0`` is sharded the same way.

Why a root wrapper (``ShardedModel``): FSDP gathers a unit's weights in that unit's forward hooks, and grpokit
never calls the model's own forward: the log-prob passes and the samplers run the body and the head apart
(``rollout/logprobs.py`` says why). So the root is a small module whose forward runs whatever grpokit does with
the model, ``root(fn, *args)`` being ``fn(model, *args)``: FSDP gathers the root's weights before it and, after
the backward, reduce-scatters their gradients, as it does for each block inside.

The gradient is a sum. Each rank's loss is its share of the whole batch's loss, so the batch's gradient is the
sum of the ranks' gradients (what ``World.sum_gradients`` computes without FSDP). FSDP averages by default; every
unit here divides by 1 and reduces with plain SUM collectives (gloo has no PREMUL_SUM, and NCCL's zero-copy
transfers take SUM only). Clipping and AdamW then run on each rank's shards (``clip_grad_norm_`` takes the norm over all shards).

Sampling gathers every unit's full weights once per ``generate`` (``full_weights``) and frees them after it, not
once per block per decoded token: ranks decode different numbers of tokens, and a collective per token would pair
one rank's calls with another's. While sampling, each rank holds the whole model in fp32 (4 bytes a weight), its
1/W share of AdamW's moments (8/W bytes) and no gradients (freed after each step). A separate unsharded sampling
copy in bf16 would hold 2 bytes a weight at every moment, the update's activation peak included, and would still
need the same all-gather after every step to refresh it; the transient gather costs less at the peak.

Checkpoints hold the full weights and optimiser state, gathered from every rank (each must take part) and written
by rank 0 in the unsharded format, so ``grpokit eval``, transformers and a resume with any number of processes,
sharded or not, read them; a sharded resume puts each rank's shard back (``load_model_state``,
``load_optimizer_state``).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from grpokit.errors import ModelError
from grpokit.models.vision import is_multimodal

log = logging.getLogger(__name__)


class ShardedModel(torch.nn.Module):
    """The FSDP root around a Hugging Face model: its forward runs ``fn(model, *args, **kwargs)``, so FSDP's root
    hooks gather the root's weights first and reduce-scatter their gradients after the backward."""

    def __init__(self, model: torch.nn.Module, reshard_root: bool):
        super().__init__()
        self.module = model
        self.reshard_root = reshard_root  # the root's own weights freed after each forward (the reference's)
        self.gathered = False  # inside ``full_weights``: every unit's weights are whole on this rank

    def forward(self, fn, *args, **kwargs):
        return fn(self.module, *args, **kwargs)


def is_sharded(model) -> bool:
    return isinstance(model, ShardedModel)


def launcher_asks_fsdp() -> bool:
    """``accelerate launch --use_fsdp`` (or an accelerate config with ``distributed_type: FSDP``) on GPUs; with
    ``--cpu`` accelerate's launcher passes no FSDP setting on, so the recipe key is the one that always works."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in {"1", "true", "yes"}


def loading_config(model_cfg, device: torch.device):
    """``model`` to load with before sharding: on the CPU (each GPU then receives only its shards, as accelerate's
    FSDP2 loading does without rank-0-only loading), with the attention the target device would get."""
    from grpokit.models.loading import choose_attention

    return model_cfg.model_copy(update={"device": "cpu",
                                        "attn_implementation": choose_attention(model_cfg.attn_implementation, device)})


def _fsdp_units(model) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def shard_model(model, mesh, reshard_root: bool) -> ShardedModel:
    """One FSDP unit per transformer block, the rest in the root; gradients reduced as sums."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ModelError(f"training.fsdp: {type(model).__name__} names no transformer block class "
                         "(_no_split_modules), so there is nothing to shard it by; set training.fsdp: false")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)  # gathered again in the backward
    root = ShardedModel(model, reshard_root)
    # the policy's root is gathered again at once by the backward; the reference's has no backward
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_root)
    for unit in _fsdp_units(root):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return root


def shard_policy(policy, world_size: int, device: torch.device):
    """Shard a full fine-tuning policy (and its frozen reference) over the ``world_size`` ranks; the shards
    live on ``device``."""
    from torch.distributed.device_mesh import init_device_mesh

    if policy.is_lora:
        raise ModelError("training.fsdp shards full fine-tuning only (model.lora: null); with LoRA every process "
                         "keeps the frozen base and only the adapters' gradients cross; set training.fsdp: false")
    if is_multimodal(policy.model):
        raise ModelError("training.fsdp is for text models for now: a vision-language model's log-prob passes "
                         "always reuse each prompt's KV cache with its images, untested under FSDP; set "
                         "training.fsdp: false")
    mesh = init_device_mesh(device.type, (world_size,))
    policy.model = shard_model(policy.model, mesh, reshard_root=False)
    if policy.reference is not None:
        policy.reference = shard_model(policy.reference, mesh, reshard_root=True)
    policy.device = device
    log.info("FSDP: %d transformer blocks and the root sharded over %d processes%s", len(_fsdp_units(policy.model)) - 1,
             world_size, ", the frozen reference too" if policy.reference is not None else "")
    return policy


@contextlib.contextmanager
def full_weights(model):
    """For sampling: every unit's full weights on this rank until the block ends, gathered once (every rank
    enters together), then sharded again. A no-op for an unsharded model, and inside another ``full_weights``
    (an evaluation gathers once for all its batches, however many each rank has)."""
    if not is_sharded(model) or model.gathered:
        yield
        return
    units = _fsdp_units(model)
    with torch.no_grad():
        model(lambda module: None)  # through the root first: FSDP's set-up learns which unit is the root
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)  # kept whole across the decode loop's calls
            unit.unshard()
    model.gathered = True
    try:
        yield
    finally:
        model.gathered = False
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model or model.reshard_root, recurse=False)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model) -> dict[str, torch.Tensor] | None:
    """The full weights, named as the unsharded model names them, on rank 0 (in CPU memory; the other ranks get
    an empty dict). Every rank must call it. None for an unsharded model (it saves its own weights)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    # a tied weight (lm_head = embeddings) comes back as its own copy: one tensor again, so save_pretrained
    # leaves it out of the file as it does for the unsharded model
    tied = getattr(model.module, "all_tied_weights_keys", None)
    for name, source in (tied.items() if isinstance(tied, dict) else ()):
        if name in state and source in state:
            state[name] = state[source]
    return state


def load_model_state(model, weights: dict[str, torch.Tensor]):
    """Full weights into a model, ``strict=False`` (missing and unexpected names returned): a sharded model's
    ranks each keep their shard of them."""
    if not is_sharded(model):
        return model.load_state_dict(weights, strict=False)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(model, {f"module.{name}": tensor for name, tensor in weights.items()},
                                  options=_options(strict=False))
    return type(result)([n.removeprefix("module.") for n in result.missing_keys],
                        [n.removeprefix("module.") for n in result.unexpected_keys])


def _trainable_names(model) -> list[str]:
    """The optimiser's parameters by name, in its order (``Policy.trainable_parameters``)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def optimizer_state(model, optimizer) -> dict:
    """``optimizer.state_dict()`` as an unsharded run has it (parameters by index, full tensors), for a sharded
    model gathered on rank 0 (the other ranks get an empty dict). Every rank must call it."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    return {"state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in full["param_groups"]]}


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """An unsharded run's optimiser state (``optimizer_state``) into the optimiser; each rank keeps its shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _trainable_names(model)
    full = {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=_options())
