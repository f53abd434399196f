"""Configuration: official YAMLs, overrides and every error of devis_core.config."""

import pytest
import yaml

from devis_core.config import (CONFIGS_DIR, PROJECT_KEYS, ConfigError, all_keys, get_cfg_defaults,
                               load_config, official_keys, save_config)

OFFICIAL_FILES = [
    "deformable_detr/deformable_detr_R_50.yaml",
    "deformable_mask_head/deformable_mask_head_R_50.yaml",
    "devis/YT-19/devis_R_50_YT-19.yaml",
    "devis/YT-21/devis_R_50_YT-21.yaml",
    "devis/OVIS/devis_R_50_OVIS.yaml",
    "devis/devis_R_50_visualization_YT-21.yaml",
]


def test_defaults_match_spec_table():
    c = get_cfg_defaults()
    # A sample of spec §8 rows, one per section.
    assert c.MODEL.NUM_QUERIES == 300 and c.MODEL.HIDDEN_DIM == 256 and c.MODEL.DIM_FEEDFORWARD == 1024
    assert c.MODEL.MASK_HEAD.USED_FEATURES == [["/32", "encoded"], ["/16", "encoded"], ["/8", "encoded"],
                                               ["/4", "backbone"]]
    assert c.MODEL.DEVIS.DEFORMABLE_ATTENTION.ENC_TEMPORAL_WINDOW == 4
    assert c.MODEL.LOSS.MASK_AUX_LOSS == [2] and c.MODEL.LOSS.FOCAL_ALPHA == 0.25
    assert (c.MODEL.MATCHER.CLASS_COST, c.MODEL.MATCHER.BBX_L1_COST, c.MODEL.MATCHER.BBX_GIOU_COST) == (2.0, 5.0, 2.0)
    assert c.DATASETS.DATA_PATH == "data" and c.DATASETS.TYPE == "coco"
    assert c.SOLVER.LR_LINEAR_PROJ_NAMES == ["self_attn.sampling_offsets", "cross_attn.sampling_offsets",
                                             "reference_points"]
    assert c.SOLVER.STEPS == [40] and c.SOLVER.GRAD_CLIP_MAX_NORM == 0.1
    assert c.TEST.CLIP_TRACKING.MIN_TRACK_SCORE == 0.002 and c.TEST.EPOCHS_TO_EVAL == [6, 7, 8, 9, 10]
    assert c.VISDOM_PORT == 8090 and c.SEED == 42 and c.START_EPOCH == 1


def test_official_key_count_and_project_keys_documented():
    off = official_keys()
    assert len(off) == len(set(off))
    project = [k for k, _, _ in PROJECT_KEYS]
    # every key of the tree is official or documented in PROJECT_KEYS, and nothing else
    assert sorted(all_keys()) == sorted(off + project)
    for key, _, doc in PROJECT_KEYS:
        assert key not in off and len(doc) > 20


@pytest.mark.parametrize("rel", OFFICIAL_FILES)
def test_official_yaml_loads_unchanged(rel):
    assert (CONFIGS_DIR / rel).is_file()
    cfg = load_config(CONFIGS_DIR / rel)
    # the repository-relative path used by the official README resolves too
    assert load_config(f"configs/{rel}") == cfg


def test_official_yaml_values():
    yt19 = load_config("devis/YT-19/devis_R_50_YT-19.yaml")
    assert (yt19.MODEL.NUM_QUERIES, yt19.SOLVER.EPOCHS, yt19.SOLVER.STEPS, yt19.TEST.NUM_OUT) == (60, 9, [3, 7], 20)
    assert yt19.DATASETS.TYPE == "vis" and yt19.DATASETS.TRAIN_DATASET == "yt_vis_train_19"
    assert yt19.MODEL.BBX_GRADIENT_PROP and yt19.MODEL.LOSS.AUX_LOSS_WEIGHTING
    assert yt19.MODEL.MATCHER.CLASS_COST == 1.0 and yt19.INPUT.MIN_SIZE_TEST == 360
    assert yt19.SOLVER.BASE_LR == 1e-4 and yt19.SOLVER.LR_BACKBONE == 1e-5 and yt19.TEST.START_EVAL_EPOCH == 3
    yt21 = load_config("devis/YT-21/devis_R_50_YT-21.yaml")
    assert (yt21.MODEL.NUM_QUERIES, yt21.SOLVER.EPOCHS, yt21.SOLVER.STEPS, yt21.TEST.NUM_OUT) == (180, 10, [4, 8], 30)
    assert yt21.DATASETS.VAL_DATASET == "yt_vis_val_21" and yt21.TEST.START_EVAL_EPOCH == 5
    ovis = load_config("devis/OVIS/devis_R_50_OVIS.yaml")
    assert (ovis.MODEL.NUM_QUERIES, ovis.SOLVER.EPOCHS, ovis.SOLVER.STEPS) == (180, 12, [6, 10])
    assert ovis.TEST.CLIP_TRACKING.CENTER_COST == 1 and ovis.DATASETS.TRAIN_DATASET == "ovis_train"
    mh = load_config("deformable_mask_head/deformable_mask_head_R_50.yaml")
    assert mh.MODEL.SHIFT_CLASS_NEURON and mh.MODEL.MASK_ON and mh.SOLVER.FROZEN_PARAMS == ["class_embed"]
    assert (mh.MODEL.LOSS.SEGM_MASK_COEF, mh.MODEL.LOSS.SEGM_DICE_COEF) == (8.0, 8.0)
    assert mh.SOLVER.BACKBONE_NAMES == ["backbone.0", "input_proj"] and mh.SOLVER.LR_MASK_HEAD_MULT == 10
    assert (mh.SOLVER.BASE_LR, mh.SOLVER.EPOCHS, mh.SOLVER.STEPS, mh.TEST.NUM_OUT) == (2e-5, 25, [15], 50)
    dd = load_config("deformable_detr/deformable_detr_R_50.yaml")
    assert dd == load_config(None)
    viz = load_config("devis/devis_R_50_visualization_YT-21.yaml")
    assert viz.TEST.VIZ.VIDEO_NAMES == "4b1a561480,c34989e3" and viz.TEST.CLIP_TRACKING.MIN_DETECTIONS == 3
    assert viz.TEST.VIZ.SAVE_MERGED_TRACKS and viz.TEST.NUM_OUT == 5 and viz.MODEL.NUM_QUERIES == 180


@pytest.mark.parametrize("rel", ["synthetic/devis_tiny.yaml", "synthetic/deformable_mask_head_tiny.yaml",
                                 "synthetic/deformable_detr_tiny.yaml"])
def test_tiny_configs_load(rel):
    cfg = load_config(rel)
    assert cfg.DATASETS.TRAIN_DATASET.startswith("synthetic_")


def test_overrides_parse_types():
    cfg = load_config("devis/YT-19/devis_R_50_YT-19.yaml",
                      ["MODEL.DEVIS.NUM_FRAMES", "4", "MODEL.NUM_QUERIES", "20", "MODEL.LOSS.MASK_AUX_LOSS", "[1]",
                       "MODEL.DROPOUT", "0.0", "DATASETS.DATA_PATH", "/tmp/x", "VISDOM_ON", "False",
                       "SOLVER.BASE_LR", "1", "TEST.VIZ.VIDEO_NAMES", "123"])
    assert cfg.MODEL.DEVIS.NUM_FRAMES == 4 and cfg.MODEL.NUM_QUERIES == 20
    assert cfg.MODEL.LOSS.MASK_AUX_LOSS == [1] and cfg.MODEL.DROPOUT == 0.0
    assert cfg.DATASETS.DATA_PATH == "/tmp/x" and cfg.VISDOM_ON is False
    assert isinstance(cfg.SOLVER.BASE_LR, float) and cfg.SOLVER.BASE_LR == 1.0
    assert cfg.TEST.VIZ.VIDEO_NAMES == "123"   # strings stay strings even when they look like numbers
    assert cfg.is_frozen()


def test_unknown_override_names_key_and_closest():
    with pytest.raises(ConfigError) as e:
        load_config("devis/YT-19/devis_R_50_YT-19.yaml", ["MODEL.NUM_FRAMES", "4"])
    msg = str(e.value)
    assert "MODEL.NUM_FRAMES" in msg and "MODEL.DEVIS.NUM_FRAMES" in msg and "devis_R_50_YT-19.yaml" in msg


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("MODEL:\n  TRANSFORMER:\n    ENCODER_LAYER: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "MODEL.TRANSFORMER.ENCODER_LAYER" in msg
    assert "MODEL.TRANSFORMER.ENCODER_LAYERS" in msg


@pytest.mark.parametrize("key,value,expected", [
    ("MODEL.NUM_QUERIES", "abc", "int"),
    ("MODEL.DROPOUT", "True", "float"),
    ("SOLVER.STEPS", "3", "list"),
    ("MODEL.MASK_ON", "1", "bool"),
])
def test_wrong_type_override(key, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [key, value])
    msg = str(e.value)
    assert key in msg and f"expected {expected}" in msg and repr(value)[1:-1] in msg


def test_wrong_type_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("SOLVER:\n  EPOCHS: 'ten'\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "SOLVER.EPOCHS" in str(e.value) and "'ten'" in str(e.value) and "expected int" in str(e.value)


def test_odd_override_count_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="pairs"):
        load_config(None, ["MODEL.NUM_QUERIES"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_section_given_a_value(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("MODEL:\n  LOSS: 3\n")
    with pytest.raises(ConfigError, match="MODEL.LOSS"):
        load_config(f)


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="divisible"):
        load_config("devis/YT-19/devis_R_50_YT-19.yaml", ["MODEL.NUM_QUERIES", "61"])
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_config(None, ["MODEL.WITH_REF_POINT_REFINE", "True"])


def test_save_round_trip(tmp_path):
    cfg = load_config("devis/OVIS/devis_R_50_OVIS.yaml", ["MODEL.NUM_QUERIES", "60"])
    out = tmp_path / "sub" / "cfg.yaml"
    save_config(cfg, out)
    assert not list(out.parent.glob("*.tmp"))
    assert load_config(out) == cfg
    assert yaml.safe_load(out.read_text())["MODEL"]["NUM_QUERIES"] == 60
