"""FSDP2 for students too big for one device: `fully_shard` on every decoder layer and on the
row-logits wrapper (embeddings, final norm, LM head), and full (unsharded) state dicts for
checkpoints and the saved student, so that a run resumes under any number of ranks, with or
without FSDP.

Checkpoints of FSDP runs key the optimizer state by parameter name ("param.<fqn>.<name>");
runs without FSDP key it by index as before. `load_optimizer` reads either into either.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # fall back to the usual container
        layers = list(getattr(model.get_decoder(), "layers", []))
    return layers


def shard(net: nn.Module, model) -> nn.Module:
    """Shard the student in place: each decoder layer is one FSDP unit, the rest (embeddings,
    norm, head, owned by `net`, whose forward is the one called) another."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(net)
    return net


def tied_names(model) -> set[str]:
    """Parameter names that alias an earlier parameter (e.g. a tied LM head)."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (collective: every rank calls it; rank 0 gets them),
    tied aliases left out."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    skip = tied_names(model)
    return {k: v.contiguous() for k, v in state.items() if k not in skip}


def full_optimizer_state(model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(tensors "param.<fqn>.<name>", param groups with names) of the unsharded optimizer
    state (collective; rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    tensors = {
        f"param.{fqn}.{name}": torch.as_tensor(value).detach().contiguous()
        for fqn, per_param in state.get("state", {}).items()
        for name, value in per_param.items()
    }
    return tensors, state.get("param_groups", [])


def load_model(model, tensors: dict[str, torch.Tensor]) -> None:
    """Load unsharded weights into a (possibly sharded) model; tied aliases follow."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, tensors, options=_options(strict=False))


def index_names(model, optimizer) -> list[str]:
    """Parameter names in the order optimizer.state_dict() numbers them."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer(model, optimizer, tensors: dict[str, torch.Tensor], groups: list[dict],
                   keys: str) -> None:
    """Load optimizer state saved by name (keys="fqn") or by index (keys="index") into a
    (possibly sharded) model's optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = index_names(model, optimizer)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if keys == "fqn":
            fqn, name = key.removeprefix("param.").rsplit(".", 1)
        else:
            _, index, name = key.split(".", 2)
            fqn = names[int(index)]
        state.setdefault(fqn, {})[name] = value
    named_groups = []
    for group in groups:
        group = dict(group)
        if keys != "fqn":
            group["params"] = [names[i] for i in group["params"]]
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        named_groups.append(group)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": named_groups},
                             options=_options())
