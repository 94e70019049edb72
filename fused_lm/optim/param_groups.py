"""param_groups: the usual decay / no-decay split of a model's parameters."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, *,
                 exclude_embeddings: bool = False) -> list[dict]:
    """Two param groups for ``model``'s trainable parameters:
    ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]``.

    Tensors with fewer than 2 dimensions (biases, norm weights, scalars) go to the no-decay group,
    and so do the weights of ``nn.Embedding`` modules when ``exclude_embeddings``. Shared (tied)
    parameters appear once. Either group may be empty, which optimizers accept.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    if weight_decay < 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    embeddings = set()
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                embeddings.add(id(module.weight))
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in embeddings:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
