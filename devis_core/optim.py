"""Optimiser and learning-rate schedule of spec §6.5: AdamW over five parameter groups, MultiStepLR."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

# Order of the official groups; the index is the group's position in the optimiser (spec §6.5 table).
GROUP_NAMES = ("base", "backbone", "linear_proj", "mask_head", "temporal_linear_proj")


def match_any(name: str, keywords: Iterable[str]) -> bool:
    """True when any keyword is a substring of ``name`` (the official ``match_name_keywords``)."""
    return any(k in name for k in keywords)


def freeze_parameters(model: nn.Module, frozen: Sequence[str]) -> list[str]:
    """Turn off ``requires_grad`` for every parameter whose name contains one of ``frozen``
    (SOLVER.FROZEN_PARAMS). Returns the frozen names; a keyword that matches nothing is an error."""
    names = []
    for key in frozen:
        hit = [n for n, _ in model.named_parameters() if key in n]
        if not hit:
            raise ValueError(f"SOLVER.FROZEN_PARAMS: {key!r} matches no parameter name of the model")
        names.extend(hit)
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    return sorted(set(names))


def param_groups(model: nn.Module, base_lr: float, lr_backbone: float, backbone_names: Sequence[str],
                 linear_proj_names: Sequence[str], linear_proj_mult: float, mask_head_names: Sequence[str],
                 mask_head_mult: float, temporal_proj_names: Sequence[str],
                 temporal_proj_mult: float) -> list[dict]:
    """The five official groups over the trainable parameters (``named_parameters`` order).

    A parameter goes to the first group whose keywords match in the order backbone, linear projection,
    mask head, temporal projection; everything else is the base group. Empty groups are kept (with no
    parameters) so that group ``i`` always means the same thing in a checkpoint. Each dict has ``params``,
    ``lr``, ``name`` and ``param_names``.
    """
    rules = [("backbone", backbone_names, lr_backbone),
             ("linear_proj", linear_proj_names, base_lr * linear_proj_mult),
             ("mask_head", mask_head_names, base_lr * mask_head_mult),
             ("temporal_linear_proj", temporal_proj_names, base_lr * temporal_proj_mult)]
    groups = {"base": {"params": [], "lr": base_lr, "name": "base", "param_names": []}}
    for name, _, lr in rules:
        groups[name] = {"params": [], "lr": lr, "name": name, "param_names": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = next((g for g, keys, _ in rules if match_any(n, keys)), "base")
        groups[target]["params"].append(p)
        groups[target]["param_names"].append(n)
    return [groups[g] for g in GROUP_NAMES]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.AdamW:
    """AdamW (β 0.9/0.999, eps 1e-8, SOLVER.WEIGHT_DECAY on every group) over :func:`param_groups` with the
    SOLVER.* learning rates; applies SOLVER.FROZEN_PARAMS first. ``model`` is the bare (unwrapped) model,
    already on its device. SOLVER.FUSED_ADAMW (project key, default False) picks the fused CUDA kernel."""
    s = cfg.SOLVER
    freeze_parameters(model, s.FROZEN_PARAMS)
    groups = param_groups(model, s.BASE_LR, s.LR_BACKBONE, s.BACKBONE_NAMES, s.LR_LINEAR_PROJ_NAMES,
                          s.LR_LINEAR_PROJ_MULT, s.LR_MASK_HEAD_NAMES, s.LR_MASK_HEAD_MULT,
                          s.DEVIS.LR_TEMPORAL_LINEAR_PROJ_NAMES, s.DEVIS.LR_TEMPORAL_LINEAR_PROJ_MULT)
    return torch.optim.AdamW(groups, lr=s.BASE_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=s.WEIGHT_DECAY,
                             **adamw_kernel(bool(s.FUSED_ADAMW), model))


def adamw_kernel(fused: bool, model: nn.Module) -> dict:
    """AdamW implementation keywords. ``fused`` (SOLVER.FUSED_ADAMW): one fused kernel per parameter group
    instead of the multi-tensor (foreach) loop; it rounds differently, so it is opt-in, and it needs
    every parameter on CUDA (elsewhere it raises, naming the key)."""
    if not fused:
        return {}
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cuda"}:
        raise ValueError(f"SOLVER.FUSED_ADAMW=True needs every parameter on a CUDA device, got {sorted(devices)}; "
                         "move the model to the GPU before building the optimiser or set it to False")
    return {"fused": True}


def build_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR over epochs with milestones SOLVER.STEPS and γ=SOLVER.GAMMA (0.1 by default, the value
    the official code used implicitly), stepped once after each epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.SOLVER.STEPS), gamma=cfg.SOLVER.GAMMA)


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter the optimiser updates (what gradient clipping runs over)."""
    return [p for g in optimizer.param_groups for p in g["params"]]
