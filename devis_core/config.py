"""Configuration: every official DeVIS key with its default, the project's own keys, loading and checking.

The tree is a yacs ``CfgNode`` with exactly the keys and defaults of the official ``src/config.py``
(spec §8), so a YAML written for the official repository loads unchanged. Keys this project adds are
declared in ``PROJECT_KEYS`` below with their documentation; nothing else may add keys.

Typical use::

    cfg = load_config("devis/YT-19/devis_R_50_YT-19.yaml", ["MODEL.NUM_QUERIES", "20"])

Unknown keys (in a file or an override) and values of the wrong type raise ``ConfigError`` naming the
key, the file and what was expected.
"""
from __future__ import annotations

import ast
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN

from devis_core.fileio import atomic_write_text

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override that does not fit the key tree."""


def _official_defaults() -> CN:
    """The official key tree and defaults (spec §8), nothing added."""
    c = CN()
    c.MODEL = CN()
    c.MODEL.WEIGHTS = ""
    c.MODEL.SHIFT_CLASS_NEURON = False
    c.MODEL.BACKBONE = "resnet50"
    c.MODEL.BACKBONE_DILATION = False
    c.MODEL.NUM_QUERIES = 300
    c.MODEL.HIDDEN_DIM = 256
    c.MODEL.DIM_FEEDFORWARD = 1024
    c.MODEL.DROPOUT = 0.1
    c.MODEL.NUM_FEATURE_LEVELS = 4
    c.MODEL.WITH_BBX_REFINE = True
    c.MODEL.BBX_GRADIENT_PROP = False
    c.MODEL.WITH_REF_POINT_REFINE = False
    c.MODEL.MASK_ON = False

    c.MODEL.TRANSFORMER = CN()
    c.MODEL.TRANSFORMER.ENCODER_LAYERS = 6
    c.MODEL.TRANSFORMER.DECODER_LAYERS = 6
    c.MODEL.TRANSFORMER.N_HEADS = 8
    c.MODEL.TRANSFORMER.ENC_N_POINTS = 4
    c.MODEL.TRANSFORMER.DEC_N_POINTS = 4

    c.MODEL.MASK_HEAD = CN()
    c.MODEL.MASK_HEAD.USE_MDC = True
    c.MODEL.MASK_HEAD.UPSAMPLING_RESOLUTIONS = ["/32", "/16", "/8"]
    c.MODEL.MASK_HEAD.USED_FEATURES = [["/32", "encoded"], ["/16", "encoded"], ["/8", "encoded"], ["/4", "backbone"]]
    c.MODEL.MASK_HEAD.DEVIS = CN()
    c.MODEL.MASK_HEAD.DEVIS.CONV_HEAD_3D = False

    c.MODEL.DEVIS = CN()
    c.MODEL.DEVIS.NUM_FRAMES = 6
    c.MODEL.DEVIS.TEMPORAL_EMBEDDING = "learned"
    c.MODEL.DEVIS.DEFORMABLE_ATTENTION = CN()
    c.MODEL.DEVIS.DEFORMABLE_ATTENTION.DISABLE_TEMPORAL_CONNECTIONS = False
    c.MODEL.DEVIS.DEFORMABLE_ATTENTION.ENC_CONNECT_ALL_FRAMES = True
    c.MODEL.DEVIS.DEFORMABLE_ATTENTION.ENC_TEMPORAL_WINDOW = 4
    c.MODEL.DEVIS.DEFORMABLE_ATTENTION.INSTANCE_AWARE_ATTENTION = True
    c.MODEL.DEVIS.DEFORMABLE_ATTENTION.ENC_N_POINTS_TEMPORAL_FRAME = 4
    c.MODEL.DEVIS.DEFORMABLE_ATTENTION.DEC_N_POINTS_TEMPORAL_FRAME = 4

    c.MODEL.LOSS = CN()
    c.MODEL.LOSS.AUX_LOSS = True
    c.MODEL.LOSS.AUX_LOSS_WEIGHTING = False
    c.MODEL.LOSS.FOCAL_LOSS = True
    c.MODEL.LOSS.MASK_AUX_LOSS = [2]
    c.MODEL.LOSS.SEGM_MASK_COEF = 1.0
    c.MODEL.LOSS.SEGM_DICE_COEF = 1.0
    c.MODEL.LOSS.BBX_L1_COEF = 5.0
    c.MODEL.LOSS.BBX_GIOU_COEF = 2.0
    c.MODEL.LOSS.CLASS_COEF = 2.0
    c.MODEL.LOSS.FOCAL_ALPHA = 0.25
    c.MODEL.LOSS.EOS = 0.1

    c.MODEL.MATCHER = CN()
    c.MODEL.MATCHER.CLASS_COST = 2.0
    c.MODEL.MATCHER.BBX_L1_COST = 5.0
    c.MODEL.MATCHER.BBX_GIOU_COST = 2.0
    c.MODEL.MATCHER.USE_SUM_L1_DISTANCE = False

    c.DATASETS = CN()
    c.DATASETS.TYPE = "coco"
    c.DATASETS.DATA_PATH = "data"
    c.DATASETS.TRAIN_DATASET = "train"
    c.DATASETS.VAL_DATASET = "val"
    c.DATASETS.DEVIS = CN()
    c.DATASETS.DEVIS.COCO_JOINT_TRAINING = False

    c.INPUT = CN()
    c.INPUT.SCALE_FACTOR_TRAIN = 1.0
    c.INPUT.MIN_SIZE_TEST = 800
    c.INPUT.MAX_SIZE_TEST = 1333
    c.INPUT.DEVIS = CN()
    c.INPUT.DEVIS.MULTI_SCALE_TRAIN = True
    c.INPUT.DEVIS.SAMPLE_EACH_FRAME = False
    c.INPUT.DEVIS.CREATE_BBX_FROM_MASK = True

    c.SOLVER = CN()
    c.SOLVER.BASE_LR = 0.0002
    c.SOLVER.FROZEN_PARAMS = []
    c.SOLVER.BACKBONE_NAMES = ["backbone.0"]
    c.SOLVER.LR_BACKBONE = 0.00002
    c.SOLVER.LR_LINEAR_PROJ_NAMES = ["self_attn.sampling_offsets", "cross_attn.sampling_offsets", "reference_points"]
    c.SOLVER.LR_LINEAR_PROJ_MULT = 0.1
    c.SOLVER.LR_MASK_HEAD_NAMES = ["bbox_attention", "mask_head"]
    c.SOLVER.LR_MASK_HEAD_MULT = 1
    c.SOLVER.DEVIS = CN()
    c.SOLVER.DEVIS.LR_TEMPORAL_LINEAR_PROJ_NAMES = ["temporal_sampling_offsets"]
    c.SOLVER.DEVIS.LR_TEMPORAL_LINEAR_PROJ_MULT = 0.1
    c.SOLVER.DEVIS.FINETUNE_QUERY_EMBEDDINGS = False
    c.SOLVER.DEVIS.FINETUNE_TEMPORAL_MODULES = True
    c.SOLVER.DEVIS.FINETUNE_CLASS_LOGITS = False
    c.START_EPOCH = 1
    c.SOLVER.EPOCHS = 50
    c.SOLVER.STEPS = [40]
    c.SOLVER.BATCH_SIZE = 2
    c.SOLVER.GAMMA = 0.1
    c.SOLVER.WEIGHT_DECAY = 0.0001
    c.SOLVER.RESUME_OPTIMIZER = False
    c.SOLVER.CHECKPOINT_INTERVAL = 1
    c.SOLVER.GRAD_CLIP_MAX_NORM = 0.1

    c.TEST = CN()
    c.TEST.EVAL_PERIOD = 1
    c.TEST.START_EVAL_EPOCH = 1
    c.TEST.SAVE_PATH = "eval_results"
    c.TEST.NUM_OUT = 100
    c.TEST.USE_TOP_K = True
    c.TEST.CLIP_TRACKING = CN()
    c.TEST.CLIP_TRACKING.STRIDE = 4
    c.TEST.CLIP_TRACKING.PER_CLASS_MATCHING = False
    c.TEST.CLIP_TRACKING.USE_BINARY_MASK_IOU = False
    c.TEST.CLIP_TRACKING.USE_FRAME_AVERAGE_IOU = False
    c.TEST.CLIP_TRACKING.FINAL_CLASS_POLICY = "most_common"
    c.TEST.CLIP_TRACKING.FINAL_SCORE_POLICY = "mean"
    c.TEST.CLIP_TRACKING.CLASS_COST = 1
    c.TEST.CLIP_TRACKING.MASK_COST = 1
    c.TEST.CLIP_TRACKING.SCORE_COST = 1
    c.TEST.CLIP_TRACKING.CENTER_COST = 0
    c.TEST.CLIP_TRACKING.MIN_FRAME_SCORE = 0.001
    c.TEST.CLIP_TRACKING.MIN_TRACK_SCORE = 0.002
    c.TEST.CLIP_TRACKING.MIN_DETECTIONS = 1
    c.TEST.INPUT_FOLDER = ""
    c.TEST.EPOCHS_TO_EVAL = [6, 7, 8, 9, 10]
    c.TEST.VIZ = CN()
    c.TEST.VIZ.OUT_VIZ_PATH = ""
    c.TEST.VIZ.SAVE_CLIP_VIZ = False
    c.TEST.VIZ.SAVE_MERGED_TRACKS = False
    c.TEST.VIZ.VIDEO_NAMES = ""

    c.NUM_WORKERS = 4
    c.OUTPUT_DIR = "./output"
    c.VISDOM_AND_LOG_INTERVAL = 100
    c.VISDOM_ON = True
    c.RESUME_VIS = False
    c.VISDOM_PORT = 8090
    c.VISDOM_SERVER = "http://localhost"
    c.SEED = 42
    c.DEVICE = "cuda"
    return c


# The keys this project adds beyond the official tree: (key, default, documentation). This table is the
# one place they are declared and documented; README.md points here.
PROJECT_KEYS: list[tuple[str, Any, str]] = [
    ("MODEL.BACKBONE_WEIGHTS", "",
     "Local file with torchvision ImageNet weights for the ResNet backbone (a state dict saved by "
     "torch.save). Empty: random initialisation. Nothing is ever downloaded."),
    ("MODEL.BACKBONE_NORM", "frozen_bn",
     "Normalisation layers of the ResNet: 'frozen_bn' (official: batch norm with frozen ImageNet statistics; "
     "the stem and layer1 never train) or 'group_norm' (GroupNorm with 32 groups, every layer trains: for "
     "training from random initialisation, e.g. the synthetic dataset; cannot load MODEL.BACKBONE_WEIGHTS)."),
    ("MODEL.TRANSFORMER.CHECKPOINT_ENCODER_LAYERS", 0,
     "Activation checkpointing in training: the first N encoder layers (-1: all) recompute their activations "
     "in the backward instead of keeping them. The encoder runs over every pixel of every frame, so its "
     "activations are most of a DeVIS step's memory; each checkpointed layer trades one more layer forward "
     "of time for its share. Same numbers. 0: off."),
    ("MODEL.ATTENTION_BACKEND", "auto",
     "Multi-scale deformable attention implementation: 'auto' (fused CUDA kernel on CUDA tensors, "
     "PyTorch reference elsewhere), 'cuda' (fail if the kernel cannot be built) or 'reference'."),
    ("DATASETS.SKIP_INVALID", False,
     "Drop invalid annotations and unreadable images with a warning instead of raising an error that "
     "names the file and id (COCO-format image datasets)."),
    ("INPUT.DEVIS.BGR_TRAINING", False,
     "Feed BGR-ordered frames during VIS training, as the official code did (cv2.imread without a "
     "conversion, spec §6.2). Off: RGB, like inference and the COCO stages. Inference is always RGB."),
    ("INPUT.TRAIN_PAD_MULTIPLE", 0,
     "Training: pad each batch of images or clip (bottom/right, masked like DETR's batch padding; target masks "
     "padded too) to height and width multiples of N. 0: no padding beyond the batch's largest size, as the "
     "official code. With multi-scale crops every batch has a new size, and each new convolution shape costs "
     "cuDNN a plan search on the GPU; a few padded sizes keep those plans cached. Changes the numbers a "
     "little (padded borders)."),
    ("SOLVER.AMP", False,
     "Train (and evaluate) under bfloat16 autocast; the criterion and matcher stay float32. Off: float32 "
     "everywhere, as the official training."),
    ("TF32", False,
     "Let float32 matrix products and cuDNN convolutions use TF32 tensor cores in training, inference and "
     "the benchmarks (devis_core.precision.configure_tf32). Faster on Ampere/Hopper GPUs but not float32 "
     "numerics; off (the default) also turns off torch's default TF32 for cuDNN convolutions."),
    ("SOLVER.SKIP_NONFINITE_STEPS", False,
     "When the loss is NaN or infinite on any rank, skip that optimiser step (logged) instead of stopping "
     "the run with an error (the last complete checkpoint is kept either way)."),
    ("SOLVER.FUSED_ADAMW", False,
     "Use torch's fused CUDA AdamW kernel (one kernel per parameter group instead of the foreach loop); "
     "it rounds differently, so it is off by default; needs the model on CUDA."),
    ("SOLVER.CHECKPOINT_ITERS", 0,
     "Also write OUTPUT_DIR/checkpoint.pth every N iterations inside an epoch (0: only after each epoch), so "
     "--resume continues mid-epoch."),
    ("SOLVER.MAX_ITERS_PER_EPOCH", 0,
     "Cap the iterations of each epoch (0: the whole dataset). For smoke runs and tests."),
    ("SOLVER.DETERMINISTIC", False,
     "Ask torch for deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic). With "
     "it, a resumed run reproduces an uninterrupted one."),
    ("TEST.VAL_LOSS_CLIPS", 16,
     "Video datasets: number of validation clips (evenly spaced, resized like the test input, no "
     "augmentation) on which the validation loss is computed at each evaluation; 0 turns it off. Image "
     "datasets compute it on every validation batch."),
]


def _set_key(node: CN, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        if p not in node:
            node[p] = CN()
        node = node[p]
    node[parts[-1]] = value


def get_cfg_defaults() -> CN:
    """Return a fresh, mutable ``CfgNode`` with the official defaults plus ``PROJECT_KEYS``."""
    c = _official_defaults()
    for key, default, _doc in PROJECT_KEYS:
        _set_key(c, key, default)
    return c


def official_keys() -> list[str]:
    """Dotted names of every leaf key of the official tree (spec §8), in definition order."""
    return list(_leaf_items(_official_defaults()).keys())


def all_keys(cfg: CN | None = None) -> list[str]:
    """Dotted names of every leaf key of ``cfg`` (default: the full default tree)."""
    return list(_leaf_items(cfg if cfg is not None else get_cfg_defaults()).keys())


def _leaf_items(node: CN, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in node.items():
        name = f"{prefix}{k}"
        if isinstance(v, CN):
            out.update(_leaf_items(v, name + "."))
        else:
            out[name] = v
    return out


def _closest_keys(key: str, known: Sequence[str], n: int = 3) -> list[str]:
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    fuzzy = difflib.get_close_matches(key, known, n=n, cutoff=0.5)
    leaf_fuzzy = [k for k in known
                  if difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio() >= 0.75]
    seen: list[str] = []
    for k in same_leaf + fuzzy + leaf_fuzzy:
        if k not in seen:
            seen.append(k)
    return seen[:n]


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Check ``value`` against the type of ``default``; return it in the default's type."""
    def fail() -> ConfigError:
        return ConfigError(
            f"{source}: key {key} has value {value!r} of type {_type_name(value)}, "
            f"expected {_type_name(default)} (default {default!r})")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise fail()
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and isinstance(default, int):
            # YAML authors write 1.0 for integer costs; the official code does arithmetic with both.
            return value
        raise fail()
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise fail()
    raise fail()


def _parse_override_value(raw: Any, default: Any) -> Any:
    if not isinstance(raw, str) or isinstance(default, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() in ("true", "false") and isinstance(default, bool):
            return raw.lower() == "true"
        return raw


def _merge_mapping(cfg: CN, mapping: dict, source: str, prefix: str = "") -> None:
    known = all_keys(cfg)
    for k, v in mapping.items():
        dotted = f"{prefix}{k}"
        node = cfg
        parts = dotted.split(".")
        try:
            for p in parts[:-1]:
                node = node[p]
            exists = isinstance(node, CN) and parts[-1] in node
        except (KeyError, TypeError):
            exists = False
        if not exists:
            close = _closest_keys(dotted, known)
            hint = f"; closest valid keys: {', '.join(close)}" if close else ""
            raise ConfigError(f"{source}: unknown key {dotted}{hint}")
        current = node[parts[-1]]
        if isinstance(current, CN):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: key {dotted} is a section, expected a mapping, got {v!r}")
            _merge_mapping(cfg, v, source, dotted + ".")
            continue
        if isinstance(v, dict):
            raise ConfigError(f"{source}: key {dotted} is a value of type {_type_name(current)}, "
                              f"got a mapping {v!r}")
        node[parts[-1]] = _coerce(dotted, v, current, source)


def resolve_config_path(config_file: str | os.PathLike) -> Path:
    """Find a config file: as given, else relative to ``devis_core/configs`` (an official-repository path
    such as ``configs/devis/YT-19/devis_R_50_YT-19.yaml`` resolves to our copy)."""
    p = Path(config_file)
    if p.is_file():
        return p
    candidates = [CONFIGS_DIR / p]
    if p.parts and p.parts[0] == "configs":
        candidates.append(CONFIGS_DIR / Path(*p.parts[1:]))
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file {config_file} not found (also looked in {CONFIGS_DIR})")


def merge_file(cfg: CN, config_file: str | os.PathLike) -> CN:
    """Merge a YAML file into ``cfg`` in place, checking every key and type. Returns ``cfg``."""
    path = resolve_config_path(config_file)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:  # the official deformable_detr_R_50.yaml is empty: the defaults
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {_type_name(data)}")
    _merge_mapping(cfg, data, str(path))
    return cfg


def merge_overrides(cfg: CN, overrides: Sequence[str], source: str = "command line") -> CN:
    """Merge ``KEY VALUE`` pairs (as after ``--config-file F`` on the official command line)."""
    overrides = list(overrides)
    if len(overrides) % 2:
        raise ConfigError(f"{source}: overrides must be KEY VALUE pairs, got an odd count: {overrides}")
    known = all_keys(cfg)
    leaves = _leaf_items(cfg)
    for key, raw in zip(overrides[0::2], overrides[1::2]):
        if key not in leaves:
            close = _closest_keys(key, known)
            hint = f"; closest valid keys: {', '.join(close)}" if close else ""
            raise ConfigError(f"{source}: unknown key {key}{hint}")
        value = _parse_override_value(raw, leaves[key])
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = _coerce(key, value, leaves[key], source)
    return cfg


def check_config(cfg: CN, source: str = "config") -> None:
    """Cross-key constraints the official ``main.py::sanity_check`` and builders enforce."""
    problems = []
    if cfg.MODEL.WITH_BBX_REFINE and cfg.MODEL.WITH_REF_POINT_REFINE:
        problems.append("MODEL.WITH_BBX_REFINE and MODEL.WITH_REF_POINT_REFINE are mutually exclusive")
    if not cfg.MODEL.LOSS.FOCAL_LOSS:
        problems.append("MODEL.LOSS.FOCAL_LOSS must be True (the softmax path is not implemented officially)")
    if cfg.DATASETS.TYPE not in ("coco", "vis"):
        problems.append(f"DATASETS.TYPE is {cfg.DATASETS.TYPE!r}, expected 'coco' or 'vis'")
    if cfg.DATASETS.TYPE == "vis":
        t = cfg.MODEL.DEVIS.NUM_FRAMES
        if cfg.MODEL.NUM_QUERIES % t:
            problems.append(f"MODEL.NUM_QUERIES ({cfg.MODEL.NUM_QUERIES}) must be divisible by "
                            f"MODEL.DEVIS.NUM_FRAMES ({t})")
        # STRIDE < NUM_FRAMES is checked where clips are partitioned: the official parity settings
        # (T=4 with the default stride 4) are valid for everything but near-online inference.
        if cfg.SOLVER.BATCH_SIZE != 1:
            problems.append(f"SOLVER.BATCH_SIZE is {cfg.SOLVER.BATCH_SIZE}; DeVIS trains one clip per GPU (1)")
    if cfg.MODEL.NUM_FEATURE_LEVELS not in (1, 3, 4):
        problems.append(f"MODEL.NUM_FEATURE_LEVELS is {cfg.MODEL.NUM_FEATURE_LEVELS}, expected 1, 3 or 4")
    if cfg.MODEL.HIDDEN_DIM % cfg.MODEL.TRANSFORMER.N_HEADS:
        problems.append("MODEL.HIDDEN_DIM must be divisible by MODEL.TRANSFORMER.N_HEADS")
    if cfg.MODEL.BACKBONE_NORM not in ("frozen_bn", "group_norm"):
        problems.append(f"MODEL.BACKBONE_NORM is {cfg.MODEL.BACKBONE_NORM!r}, expected 'frozen_bn' or 'group_norm'")
    elif cfg.MODEL.BACKBONE_NORM == "group_norm" and cfg.MODEL.BACKBONE_WEIGHTS:
        problems.append("MODEL.BACKBONE_NORM 'group_norm' trains the ResNet from random initialisation; ImageNet "
                        f"weights (MODEL.BACKBONE_WEIGHTS={cfg.MODEL.BACKBONE_WEIGHTS!r}) carry batch-norm "
                        "statistics it has no place for")
    if cfg.MODEL.ATTENTION_BACKEND not in ("auto", "cuda", "reference"):
        problems.append(f"MODEL.ATTENTION_BACKEND is {cfg.MODEL.ATTENTION_BACKEND!r}, "
                        "expected 'auto', 'cuda' or 'reference'")
    if cfg.TEST.CLIP_TRACKING.FINAL_CLASS_POLICY not in ("most_common", "score_weighting"):
        problems.append("TEST.CLIP_TRACKING.FINAL_CLASS_POLICY must be 'most_common' or 'score_weighting'")
    if cfg.TEST.CLIP_TRACKING.FINAL_SCORE_POLICY not in ("mean", "median"):
        problems.append("TEST.CLIP_TRACKING.FINAL_SCORE_POLICY must be 'mean' or 'median'")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def load_config(config_file: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                *, freeze: bool = True) -> CN:
    """Defaults, then ``config_file`` (if any), then ``KEY VALUE`` ``overrides``; checked and frozen.

    ``config_file`` may be a path, or a path relative to ``devis_core/configs`` (official-repository
    paths like ``configs/devis/YT-19/devis_R_50_YT-19.yaml`` work as they are).
    """
    cfg = get_cfg_defaults()
    source = "defaults"
    if config_file:
        merge_file(cfg, config_file)
        source = str(resolve_config_path(config_file))
    merge_overrides(cfg, list(overrides), source=f"overrides of {source}")
    check_config(cfg, source)
    if freeze:
        cfg.freeze()
    return cfg


def save_config(cfg: CN, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically (temporary file in the same folder, then rename)."""
    atomic_write_text(path, cfg.dump())


def add_config_arguments(parser) -> None:
    """Add the official ``--config-file F`` and trailing ``KEY VALUE`` overrides to an argparse parser."""
    import argparse

    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a YAML config")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE pairs overriding the config, e.g. MODEL.NUM_QUERIES 60")
