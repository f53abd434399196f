"""Read and write model checkpoints; convert official ones (Deformable DETR, mask head, torchvision ResNet).

Our parameter names are the official ones, so DeVIS-repository checkpoints load as they are. The foreign
layouts are converted by the rules of ``KEY_MAP`` (the one mapping table). Every load is strict: a
mismatch raises ``CheckpointMismatchError`` listing missing, unexpected and wrong-shape keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn
from devis_core.fileio import atomic_write

# source layout -> list of (prefix in the file, prefix in our model); keys matching a drop prefix vanish.
KEY_MAP: dict[str, dict[str, tuple]] = {
    # torchvision ImageNet ResNet (resnet50-*.pth): the classifier is not part of the detector.
    "torchvision_resnet": {"rename": (("", "backbone.0.body."),), "drop": ("fc.",)},
    # A detector checkpoint (official Deformable DETR or ours) loaded into the mask-head model: the
    # detector lives under ``def_detr.``; the mask head keeps its fresh initialisation (official
    # ``adapt_weights_mask_head``).
    "detector_into_segm": {"rename": (("", "def_detr."),), "drop": ()},
}
# Deformable Mask Head -> DeVIS (spec §3.6, §6.1), see ``devis_transfer_state_dict``: every key is copied
# as it is except these, which are re-initialised (kept from the freshly built model) or, when the
# named SOLVER.DEVIS flag is True, derived from the image weights.
DEVIS_TRANSFER_RULES: tuple[tuple[str, str | None], ...] = (
    # (key substring, SOLVER.DEVIS flag that turns re-initialisation into a transfer)
    ("backbone.1.temporal_embed", None),
    ("query_embed.", "FINETUNE_QUERY_EMBEDDINGS"),
    ("class_embed.", "FINETUNE_CLASS_LOGITS"),
    ("temporal_sampling_offsets.", "FINETUNE_TEMPORAL_MODULES"),
    ("temporal_attention_weights.", "FINETUNE_TEMPORAL_MODULES"),
)
log = logging.getLogger(__name__)
MASK_HEAD_PREFIXES = ("bbox_attention.", "mask_head.")
# BatchNorm counters: meaningless for frozen batch norm (the official FrozenBatchNorm2d deletes them too).
IGNORED_SUFFIXES = ("num_batches_tracked",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointMismatchError(CheckpointError):
    """State-dict keys that do not fit the model: missing, unexpected, or with the wrong shape."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 wrong_shape: list[tuple[str, tuple, tuple]]):
        self.source, self.missing, self.unexpected, self.wrong_shape = source, missing, unexpected, wrong_shape

        def show(items, n=20):
            items = list(items)
            more = f" ... and {len(items) - n} more" if len(items) > n else ""
            return ", ".join(str(i) for i in items[:n]) + more

        parts = [f"{source}: the state dict does not fit the model"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} key(s) with the wrong shape (key: file shape vs model shape): "
                         + show(f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in wrong_shape))
        super().__init__("\n  ".join(parts))


def apply_key_map(state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Rename (and drop) keys of a ``layout`` listed in ``KEY_MAP``. Returns a new dict."""
    if layout not in KEY_MAP:
        raise KeyError(f"apply_key_map: unknown layout {layout!r}; known: {sorted(KEY_MAP)}")
    rule = KEY_MAP[layout]
    out = {}
    for k, v in state_dict.items():
        if rule["drop"] and k.startswith(rule["drop"]):
            continue
        for src, dst in rule["rename"]:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        out[k] = v
    return out


def shift_class_neurons(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Deformable DETR COCO heads index classes by category id (row 0 unused); ours by id - 1.

    Every ``class_embed`` tensor (K, ...) becomes new[k] = old[k + 1] for k < K - 1 and new[K - 1] = old[0].
    """
    return {k: (torch.cat([v[1:], v[:1]], 0) if "class_embed" in k else v) for k, v in state_dict.items()}


def read_checkpoint(path: str | os.PathLike, trusted: bool = False) -> dict:
    """Load a checkpoint file (zip or legacy serialisation) on the CPU.

    Safe loading (tensors, containers, argparse.Namespace) is tried first. Official DeVIS checkpoints also
    pickle a yacs CfgNode, which only a full unpickle can restore: that needs ``trusted=True`` (it can run
    code from the file). Returns the loaded object (a dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised below or retried as the caller allowed
        if not trusted:
            raise CheckpointError(
                f"{path}: cannot be loaded with weights_only=True ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}). Official checkpoints pickle their config; load them with "
                "trusted=True only if you trust the file's source") from err
        warnings.warn(f"{path}: loading with full unpickling (trusted source)", stacklevel=2)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a state dict or {{'model': ...}}), got {type(obj).__name__}")
    return obj


def extract_state_dict(obj: Mapping, source: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict inside a checkpoint: ``obj['model']`` (official and ours), ``obj['state_dict']``, or
    ``obj`` itself when it maps names to tensors. ``num_batches_tracked`` entries are dropped."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: expected a state dict (name -> tensor) under 'model', found non-tensor "
                              f"entries {bad[:5]}")
    return {k: v for k, v in obj.items() if not k.endswith(IGNORED_SUFFIXES)}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise ``CheckpointMismatchError`` unless ``state_dict`` has exactly the model's keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(source, missing, unexpected, wrong)


def _is_segmentation(model: nn.Module) -> bool:
    return hasattr(model, "def_detr") and hasattr(model, "mask_head")


def _is_video(model: nn.Module) -> bool:
    return _is_segmentation(model) and getattr(model.def_detr.transformer, "num_frames", 0) > 0


def convert_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], shift_class_neuron: bool = False,
                       source: str = "checkpoint") -> dict[str, Tensor]:
    """Bring an official or own state dict to the model's keys.

    A detector state dict (no ``def_detr.`` keys) given to the mask-head model is moved under ``def_detr.``
    and the mask head keeps the model's current weights; ``shift_class_neuron`` applies
    ``shift_class_neurons`` (MODEL.SHIFT_CLASS_NEURON, for the original Deformable DETR COCO weights).
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    if shift_class_neuron:
        sd = shift_class_neurons(sd)
    if _is_segmentation(model) and not any(k.startswith("def_detr.") for k in sd):
        if any(k.startswith(MASK_HEAD_PREFIXES) for k in sd):
            raise CheckpointError(f"{source}: has mask-head keys but no 'def_detr.' detector keys")
        sd = apply_key_map(sd, "detector_into_segm")
        own = model.state_dict()
        sd.update({k: v for k, v in own.items() if k.startswith(MASK_HEAD_PREFIXES)})
    return sd


def load_model_weights(model: nn.Module, path: str | os.PathLike, shift_class_neuron: bool = False,
                       trusted: bool = False) -> dict:
    """Load MODEL.WEIGHTS-style checkpoint ``path`` into ``model`` strictly (after ``convert_state_dict``).
    Returns the whole checkpoint dict (optimizer state etc. for resuming)."""
    obj = read_checkpoint(path, trusted=trusted)
    sd = convert_state_dict(model, extract_state_dict(obj, str(path)), shift_class_neuron, str(path))
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    return obj


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load torchvision ImageNet ResNet weights (a local state-dict file, MODEL.BACKBONE_WEIGHTS) into the
    model's backbone; ``fc.*`` is dropped and every ResNet key must fit."""
    detr = model.def_detr if _is_segmentation(model) else model
    body = detr.backbone[0]
    sd = apply_key_map(extract_state_dict(read_checkpoint(path), str(path)), "torchvision_resnet")
    sd = {k[len("backbone.0."):]: v for k, v in sd.items()}
    check_state_dict(body, sd, f"{path} (MODEL.BACKBONE_WEIGHTS)")
    body.load_state_dict(sd, strict=True)


def load_initial_weights(model: nn.Module, cfg) -> None:
    """MODEL.BACKBONE_WEIGHTS (ImageNet ResNet), then MODEL.WEIGHTS (with MODEL.SHIFT_CLASS_NEURON); a DeVIS
    model given an image (mask-head) checkpoint is initialised by ``load_devis_from_mask_head``.
    Files the config names are treated as trusted (official checkpoints pickle their config)."""
    named = (("MODEL.BACKBONE_WEIGHTS", str(cfg.MODEL.BACKBONE_WEIGHTS)), ("MODEL.WEIGHTS", str(cfg.MODEL.WEIGHTS)))
    for key, path in named:
        # name the config key: the path often comes from a recipe (e.g. the previous stage's output)
        if path and not path.startswith(("http://", "https://")) and not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: checkpoint {path} does not exist (expected a local weights file)")
    if cfg.MODEL.BACKBONE_WEIGHTS:
        load_backbone_weights(model, cfg.MODEL.BACKBONE_WEIGHTS)
    if cfg.MODEL.WEIGHTS:
        if str(cfg.MODEL.WEIGHTS).startswith(("http://", "https://")):
            raise CheckpointError(f"MODEL.WEIGHTS is a URL ({cfg.MODEL.WEIGHTS}); nothing is downloaded at run "
                                  "time: download the file and set MODEL.WEIGHTS to its local path")
        if _is_video(model):
            sd = extract_state_dict(read_checkpoint(cfg.MODEL.WEIGHTS, trusted=True), str(cfg.MODEL.WEIGHTS))
            if not any(k.endswith("backbone.1.temporal_embed") for k in sd):
                # An image (mask-head) checkpoint: the DeVIS initialisation of spec §6.1 stage 3.
                load_devis_from_mask_head(model, cfg.MODEL.WEIGHTS, cfg, trusted=True)
                return
        load_model_weights(model, cfg.MODEL.WEIGHTS, cfg.MODEL.SHIFT_CLASS_NEURON, trusted=True)


@dataclasses.dataclass
class TransferReport:
    """What ``devis_transfer_state_dict`` did with each key: ``copied`` (same name and shape),
    ``derived`` (built from other image weights: temporal Linears, reused queries / class rows),
    ``reinitialised`` (kept from the freshly built model) and ``ignored`` (image keys left unused)."""

    copied: list[str] = dataclasses.field(default_factory=list)
    derived: dict[str, str] = dataclasses.field(default_factory=dict)
    reinitialised: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """A multi-line human-readable account (the log message)."""
        lines = [f"DeVIS transfer: {len(self.copied)} copied, {len(self.derived)} derived, "
                 f"{len(self.reinitialised)} re-initialised, {len(self.ignored)} ignored"]
        lines += [f"  derived {k} <- {v}" for k, v in self.derived.items()]
        lines += [f"  re-initialised {k}" for k in self.reinitialised]
        lines += [f"  ignored {k}" for k in self.ignored]
        return "\n".join(lines)


def _replicate_current(src: Tensor, n_heads: int, n_levels: int, n_points: int, n_slots: int,
                       t_points: int, coords: int, key: str) -> Tensor:
    """Current-frame Linear rows (M*L_src*P_src*coords, ...) -> temporal rows (M*W*L*P_t*coords, ...),
    layout (m, w, l, p, coord): the first ``n_levels`` levels and ``t_points`` points, same for every slot."""
    rest = src.shape[1:]
    per_head = src.shape[0] // n_heads
    if src.shape[0] % n_heads or per_head % coords:
        raise CheckpointError(f"{key}: {src.shape[0]} rows cannot be read as {n_heads} heads x levels x points "
                              f"x {coords}")
    src_levels_points = per_head // coords
    src_points = n_points
    src_levels = src_levels_points // src_points
    if src_levels * src_points != src_levels_points or src_levels < n_levels or src_points < t_points:
        raise CheckpointError(f"{key}: the image layer has {src_levels_points} level-point pairs per head, which "
                              f"cannot supply {n_levels} levels x {t_points} temporal points "
                              f"(assuming {n_points} points per level)")
    v = src.reshape(n_heads, src_levels, src_points, coords, *rest)[:, :n_levels, :t_points]
    v = v[:, None].expand(n_heads, n_slots, *v.shape[1:])
    return v.reshape(-1, *rest).clone()


def devis_transfer_state_dict(model: nn.Module, image_sd: Mapping[str, Tensor], finetune_query_embeddings: bool = False,
                              finetune_temporal_modules: bool = True, finetune_class_logits: bool = False,
                              class_id_map: list[int] | None = None,
                              source: str = "mask-head checkpoint") -> tuple[dict[str, Tensor], TransferReport]:
    """A full DeVIS state dict built from a Deformable Mask Head state dict (spec §3.6, §6.1).

    model: the DeVIS model (its fresh weights fill the re-initialised keys); image_sd: official names
    (``def_detr.*``, ``bbox_attention.*``, ``mask_head.*``). Rules (``DEVIS_TRANSFER_RULES``):
    temporal_embed fresh; query_embed (T*N_q, 2C) fresh, or COCO rows 0, s, 2s, ... (s = Q_img / N_q)
    repeated for each of the T frames; class_embed fresh, or rows ``class_id_map[k]`` of the image heads;
    temporal Linears fresh, or the same layer's current-frame Linear (M, L_img, P, ...) cut to the first
    L levels and P_t points and replicated over the W slots. Every other model key must exist in
    ``image_sd`` with the same shape (else ``CheckpointMismatchError``). Returns (state dict, report).
    """
    own = model.state_dict()
    image_sd = {k: v for k, v in image_sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    flags = {"FINETUNE_QUERY_EMBEDDINGS": finetune_query_embeddings,
             "FINETUNE_TEMPORAL_MODULES": finetune_temporal_modules, "FINETUNE_CLASS_LOGITS": finetune_class_logits}
    report = TransferReport()
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing, wrong = [], []
    detr = model.def_detr
    t_len = detr.transformer.num_frames
    for key, fresh in own.items():
        rule = next((r for r in DEVIS_TRANSFER_RULES if r[0] in key), None)
        if rule is None:
            if key not in image_sd:
                missing.append(key)
            elif tuple(image_sd[key].shape) != tuple(fresh.shape):
                wrong.append((key, tuple(image_sd[key].shape), tuple(fresh.shape)))
            else:
                out[key] = image_sd[key]
                used.add(key)
                report.copied.append(key)
            continue
        substring, flag = rule
        if flag is None or not flags[flag]:
            out[key] = fresh
            report.reinitialised.append(key)
            continue
        if substring.startswith("temporal_"):
            src_key = key.replace("temporal_", "", 1)
            if src_key not in image_sd:
                missing.append(src_key)
                continue
            attn = model.get_submodule(key.rsplit(".", 2)[0])
            coords = 2 if "sampling_offsets" in key else 1
            out[key] = _replicate_current(image_sd[src_key], attn.n_heads, attn.n_levels, attn.n_points,
                                          attn.num_temporal_frames, attn.temporal_points, coords, src_key)
            if tuple(out[key].shape) != tuple(fresh.shape):
                wrong.append((key, tuple(out[key].shape), tuple(fresh.shape)))
            used.add(src_key)
            report.derived[key] = f"{src_key} (first {attn.n_levels} levels, {attn.temporal_points} points, " \
                                  f"x{attn.num_temporal_frames} slots)"
        elif substring == "query_embed.":
            src = image_sd.get(key)
            if src is None:
                missing.append(key)
                continue
            n_q = fresh.shape[0] // t_len
            if src.shape[0] % n_q or src.shape[1:] != fresh.shape[1:]:
                raise CheckpointError(f"{source}: {key} {tuple(src.shape)} cannot seed {n_q} slots per frame "
                                      f"(SOLVER.DEVIS.FINETUNE_QUERY_EMBEDDINGS needs rows % N_q == 0 and "
                                      f"{tuple(fresh.shape[1:])} columns)")
            out[key] = src[:: src.shape[0] // n_q].repeat(t_len, 1)
            used.add(key)
            report.derived[key] = f"{key} (every {src.shape[0] // n_q}-th row, repeated for {t_len} frames)"
        else:  # class heads
            src = image_sd.get(key)
            if src is None:
                missing.append(key)
                continue
            if class_id_map is None or len(class_id_map) != fresh.shape[0]:
                raise CheckpointError(f"{source}: SOLVER.DEVIS.FINETUNE_CLASS_LOGITS needs class_id_map with one "
                                      f"image-head row per video class ({fresh.shape[0]}), got "
                                      f"{None if class_id_map is None else len(class_id_map)}")
            out[key] = src[torch.as_tensor(class_id_map, dtype=torch.long)].clone()
            used.add(key)
            report.derived[key] = f"{key} (rows {list(class_id_map)})"
    if missing or wrong:
        raise CheckpointMismatchError(f"{source} -> DeVIS", missing, [], wrong)
    report.ignored = sorted(k for k in image_sd if k not in used)
    log.info(report.summary())
    return out, report


def load_devis_from_mask_head(model: nn.Module, path: str | os.PathLike, cfg, class_id_map: list[int] | None = None,
                              trusted: bool = False) -> TransferReport:
    """Initialise DeVIS from a Deformable Mask Head checkpoint file with the SOLVER.DEVIS.FINETUNE_* flags of
    ``cfg`` (``devis_transfer_state_dict``); loads strictly and returns the report (also logged)."""
    sd = extract_state_dict(read_checkpoint(path, trusted=trusted), str(path))
    d = cfg.SOLVER.DEVIS
    out, report = devis_transfer_state_dict(model, sd, d.FINETUNE_QUERY_EMBEDDINGS, d.FINETUNE_TEMPORAL_MODULES,
                                            d.FINETUNE_CLASS_LOGITS, class_id_map, str(path))
    model.load_state_dict(out, strict=True)
    return report


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer=None, lr_scheduler=None,
                    epoch: int | None = None, cfg=None, legacy_format: bool = False, **extra) -> Path:
    """Write {'model', 'optimizer', 'lr_scheduler', 'epoch', 'cfg' (YAML text), **extra} atomically
    (temporary file in the same folder, then rename). ``legacy_format`` uses the pre-1.6 serializer of the
    official checkpoints. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"model": model.state_dict(), "epoch": epoch}
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    if lr_scheduler is not None:
        obj["lr_scheduler"] = lr_scheduler.state_dict()
    if cfg is not None:
        obj["cfg"] = cfg.dump()  # text, so the file loads with weights_only=True
    obj.update(extra)
    atomic_write(path, lambda tmp: torch.save(obj, tmp, _use_new_zipfile_serialization=not legacy_format))
    return path


# --- training state (resume) -------------------------------------------------------------------------

LAST_CHECKPOINT = "checkpoint.pth"


def rng_states() -> dict:
    """Every RNG the training loop draws from (python, numpy, torch CPU, CUDA), in a form that loads with
    ``weights_only=True`` (tensors, ints, tuples)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos),
                                                   int(has_gauss), float(cached)),
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: Mapping) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only when both sides have CUDA)."""
    import random

    import numpy as np

    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(output_dir: str | os.PathLike, model: nn.Module, optimizer, lr_scheduler, epoch: int,
                        iteration: int, cfg, epoch_complete: bool, best: dict | None = None,
                        extra_names: tuple[str, ...] = (), rng: list | None = None) -> Path:
    """Write ``OUTPUT_DIR/checkpoint.pth`` (atomically) with everything an exact resume needs: model,
    optimiser, scheduler, epoch, ``iteration`` (batches of ``epoch`` done), ``epoch_complete``, RNG states,
    config text and ``best`` ({'AP': ..., 'epoch': ...}). ``rng``: one :func:`rng_states` per rank (default:
    this process's only). ``extra_names`` are further file names in ``output_dir`` that get the same
    content (e.g. ``checkpoint_epoch_3.pth``). Returns the main path."""
    out = Path(output_dir)
    path = save_checkpoint(out / LAST_CHECKPOINT, model, optimizer, lr_scheduler, epoch, cfg,
                           iteration=int(iteration), epoch_complete=bool(epoch_complete),
                           rng=list(rng) if rng is not None else [rng_states()],
                           best=dict(best or {}))
    for name in extra_names:
        save_checkpoint(out / name, model, optimizer, lr_scheduler, epoch, cfg, iteration=int(iteration),
                        epoch_complete=bool(epoch_complete), best=dict(best or {}))
    return path


def load_training_state(path: str | os.PathLike, model: nn.Module, optimizer=None, lr_scheduler=None,
                        restore_rng: bool = True, rank: int = 0) -> dict:
    """Load a :func:`save_training_state` file into ``model`` (strict), ``optimizer`` and ``lr_scheduler``
    and restore this ``rank``'s RNG states. Returns {'epoch', 'iteration', 'epoch_complete', 'best', 'cfg'}.

    Raises ``CheckpointError`` naming the file and the missing entry when it is not a training checkpoint.
    """
    obj = read_checkpoint(path)
    for key in ("model", "epoch", "iteration", "epoch_complete"):
        if key not in obj:
            raise CheckpointError(f"{path}: entry {key!r} is missing; expected a training checkpoint written "
                                  "by devis_core.train (model, optimizer, lr_scheduler, epoch, iteration, rng)")
    sd = extract_state_dict(obj, str(path))
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=False)  # strictness checked above, num_batches_tracked aside
    if optimizer is not None:
        if "optimizer" not in obj:
            raise CheckpointError(f"{path}: entry 'optimizer' is missing; cannot resume the optimiser")
        optimizer.load_state_dict(obj["optimizer"])
    if lr_scheduler is not None:
        if "lr_scheduler" not in obj:
            raise CheckpointError(f"{path}: entry 'lr_scheduler' is missing; cannot resume the schedule")
        lr_scheduler.load_state_dict(obj["lr_scheduler"])
    if restore_rng and obj.get("rng"):
        states = obj["rng"]
        if rank >= len(states):
            raise CheckpointError(f"{path}: holds RNG states of {len(states)} process(es), rank {rank} has none; "
                                  "resume with the same number of processes (or restore_rng=False)")
        set_rng_states(states[rank])
    return {"epoch": int(obj["epoch"]), "iteration": int(obj["iteration"]),
            "epoch_complete": bool(obj["epoch_complete"]), "best": dict(obj.get("best") or {}),
            "cfg": obj.get("cfg", "")}
