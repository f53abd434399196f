"""devis_core.benchmarks.model on the CPU with the tiny synthetic config: synthetic clip format, the
training step, stage ranges, the CLI's rows / JSON / table, and the notebook under papermill."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from devis_core.benchmarks import model as bench
from devis_core.config import load_config
from devis_core.engine import compute_losses
from notebook_checks import assert_stored_clean

TINY = "synthetic/devis_tiny.yaml"
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "benchmark_model.ipynb"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(TINY)


@pytest.fixture(scope="module")
def clip():
    return bench.synthetic_clip(3, (64, 96), num_instances=3, num_classes=8, seed=0)


def test_parse_size():
    assert bench.parse_size("360x640") == (360, 640)
    assert bench.parse_size("512X768") == (512, 768)
    for bad in ("360", "360x", "axb", "0x640", "1x2x3"):
        with pytest.raises(ValueError, match="expected HxW"):
            bench.parse_size(bad)


def test_synthetic_clip_has_the_training_loader_format(clip):
    samples, targets = clip
    assert samples.tensors.shape == (3, 3, 64, 96) and samples.tensors.dtype == torch.float32
    assert samples.mask.shape == (3, 64, 96) and not samples.mask.any()
    assert len(targets) == 1
    t = targets[0]
    n = int(t["num_trajectories"])
    assert n == 3
    assert t["boxes"].shape == (n * 3, 4) and t["labels"].shape == (n * 3,) and t["valid"].shape == (n * 3,)
    assert t["masks"].shape == (n * 3, 64, 96) and t["masks"].dtype == torch.bool
    assert t["size"].tolist() == [64, 96]
    # instance-major: one label per instance repeated over its T frames; shapes 1..3 -> classes 0..2
    assert t["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # valid entries: normalised cx, cy, w, h of the mask's extent (x1 = last pixel index, official rule)
    for i in torch.nonzero(t["valid"]).flatten().tolist():
        ys, xs = torch.nonzero(t["masks"][i], as_tuple=True)
        x0, x1, y0, y1 = xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()
        expected = torch.tensor([(x0 + x1) / 2 / 96, (y0 + y1) / 2 / 64, (x1 - x0) / 96, (y1 - y0) / 64])
        assert torch.allclose(t["boxes"][i], expected, atol=1e-6)
    # the same seed gives the same clip
    again = bench.synthetic_clip(3, (64, 96), num_instances=3, num_classes=8, seed=0)
    assert torch.equal(again[0].tensors, samples.tensors) and torch.equal(again[1][0]["boxes"], t["boxes"])


def test_synthetic_video_is_normalised_frames():
    video = bench.synthetic_video(4, (32, 48), seed=3)
    assert video.shape == (4, 3, 32, 48) and video.dtype == torch.float32
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (video * std + mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)        # uint8 values came in
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


def test_synthetic_targets_pass_the_criterion_and_the_step_changes_weights(tiny_cfg, clip):
    samples, targets = clip
    setup = bench.build_setup(tiny_cfg, 8, CPU, seed=0)
    setup.model.train()
    loss, terms = compute_losses(setup.model, setup.criterion, samples, targets)
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"} <= set(terms)
    assert all(math.isfinite(float(v.detach())) for v in terms.values())

    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    step_loss = bench.train_step(setup, samples, targets)
    assert math.isfinite(float(step_loss))
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    changed = {n for n, p in setup.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= trainable                                         # frozen weights stay
    for part in ("def_detr.backbone.", "def_detr.transformer.encoder.", "def_detr.transformer.decoder.",
                 "mask_head.", "def_detr.class_embed."):
        assert any(n.startswith(part) for n in changed), part


class _FakeClockTimer(bench.StageTimer):
    """Marks come from a fixed list of seconds, so exclusive times are exact."""

    def __init__(self, marks):
        super().__init__(CPU)
        self._marks = iter(marks)

    def _mark(self):
        return next(self._marks)


def test_stage_timer_exclusive_times_on_a_hand_case():
    timer = _FakeClockTimer([0.0, 1.0, 4.0, 5.0, 5.5, 10.0])
    with timer.range("outer"):
        with timer.range("inner"):
            pass
        with timer.range("inner"):
            pass
    # outer 10 s minus its children 3 s + 0.5 s; inner 3 s + 0.5 s
    assert timer.exclusive_ms() == pytest.approx({"outer": 6500.0, "inner": 3500.0})


def test_stage_timer_hooks_and_wrappers_come_off():
    lin = nn.Linear(2, 2)

    class Matcher:
        threshold = 0.5

        def __call__(self, x):
            return x + 1

        def match_layers(self, xs):
            return [x + 1 for x in xs]

    class Owner:
        matcher = Matcher()

    owner = Owner()
    original = owner.matcher
    timer = bench.StageTimer(CPU)
    timer.hook(lin, "linear")
    timer.wrap(owner, "matcher", "matcher")
    with timer.range("root"):
        lin(torch.zeros(1, 2))
        lin(torch.zeros(1, 2))
        assert owner.matcher(1) == 2
        # a batched method stays visible (and is timed); plain attributes and missing ones pass through
        assert getattr(owner.matcher, "match_layers")([1, 2]) == [2, 3]
        assert owner.matcher.threshold == 0.5 and getattr(owner.matcher, "absent", None) is None
    assert [r[0] for r in timer.records] == ["root", "linear", "linear", "matcher", "matcher"]
    assert [r[1] for r in timer.records] == [None, 0, 0, 0, 0]
    times = timer.exclusive_ms()
    assert set(times) == {"root", "linear", "matcher"} and all(v >= 0 for v in times.values())
    timer.remove()
    assert owner.matcher is original
    assert not lin._forward_hooks and not lin._forward_pre_hooks


def test_config_checks(tiny_cfg):
    with pytest.raises(ValueError, match="SOLVER.AMP is set by the dtype"):
        bench.run_benchmark(TINY, ["SOLVER.AMP", "True"], ["64x96"], ["float32"], num_classes=8, verbose=False)
    with pytest.raises(ValueError, match="--num-classes"):
        bench.resolve_num_classes(tiny_cfg)
    assert bench.resolve_num_classes(load_config(bench.DEFAULT_CONFIG)) == 40
    with pytest.raises(ValueError, match="unknown"):
        bench.run_benchmark(TINY, [], ["64x96"], ["float16"], num_classes=8, verbose=False)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        bench.run_benchmark(TINY, [], ["64x96"], ["float32"], iters=0, num_classes=8, verbose=False)


def _reference_row(**kw):
    row = {"case": "T=6 K=3", "dtype": "float32", "size": "360x640", "frames": 6, "train_ms": 205.0,
           "train_peak_gib": 4.45, "infer_ms": 52.0, "model_fps": 115.2, "pipeline_fps": 59.0}
    row.update(kw)
    return row


def test_table_ratios_and_targets_on_a_hand_case():
    res = {"rows": [_reference_row(), _reference_row(size="512x768", train_ms=300.0)]}
    lines = bench.format_table(res).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(bench.TABLE_COLUMNS)
    ref = [c.strip() for c in lines[2].strip("|").split("|")]
    # 410 / 205 = 2.00, 4.45 / 8.9 = 0.50, 115.2 / 57.6 = 2.00
    assert ref[3:] == ["205.0", "4.45", "52.0", "115.2", "59.0", "2.00", "0.50", "2.00"]
    other = [c.strip() for c in lines[3].strip("|").split("|")]
    assert other[-3:] == ["–", "–", "–"]
    targets = bench.format_targets(res)
    assert "train 205.00 ms (<= 200: NOT met)" in targets and "peak 4.45 GiB (<= 4.5: met)" in targets
    assert "model 115.20 fps (>= 115: met)" in targets and "pipeline 59.00 fps (>= 60: NOT met)" in targets
    assert "512x768" not in targets


def test_cli_rows_json_and_table_printed_last(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--out", str(out), "--config", TINY, "--sizes", "64x96", "--dtypes", "float32,bfloat16",
                     "--iters", "1", "--warmup", "1", "--pipeline-frames", "5", "--pipeline-videos", "1",
                     "--num-classes", "8", "--breakdown-iters", "1", "--profile", "--profile-iters", "1",
                     "TEST.NUM_OUT", "6"])
    assert rc == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    res = json.loads(out.read_text())
    assert printed[-1].startswith("| T=3 K=3 | float32 | 64x96 |")
    assert printed[-3].startswith("| case | dtype | size | train ms |")
    assert res["env"]["overrides"] == ["TEST.NUM_OUT", "6"] and res["env"]["num_classes"] == 8
    assert res["env"]["skipped"] and "bfloat16" in res["env"]["skipped"][0]      # no bfloat16 CPU kernel
    assert len(res["rows"]) == 1
    row = res["rows"][0]
    for key in ("train_ms", "infer_ms", "model_fps", "pipeline_ms", "pipeline_fps", "pipeline_forward_s"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert math.isfinite(row["train_loss"])
    assert row["train_peak_gib"] is None                                          # CPU: no CUDA allocator
    assert row["model_fps"] == pytest.approx(3 / (row["infer_ms"] * 1e-3))
    assert row["pipeline_fps"] == pytest.approx(5 / (row["pipeline_ms"] * 1e-3))
    assert row["pipeline_frames"] == 5 and row["pipeline_orig_size"] == "64x96"
    assert set(row["breakdown"]["train"]) == set(bench.STAGES_TRAIN)
    assert set(row["breakdown"]["inference"]) == set(bench.STAGES_INFER)
    for stage in ("backbone", "encoder", "decoder", "mask head", "matcher", "criterion", "backward", "optimiser step"):
        assert row["breakdown"]["train"][stage] > 0, stage
    assert set(row["profile"]) == {"train_cpu", "inference_cpu"}
    assert "train_gpu_busy_ms" not in row and bench.format_gpu_busy(res) == ""     # no GPU, no busy time
    assert "aten::" in row["profile"]["train_cpu"] and "convolution_backward" in row["profile"]["train_cpu"]
    # JSON round trip: what was saved is what the table is made of
    assert bench.format_table(res) == "\n".join(printed[-3:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rows_have_peak_memory_and_bfloat16():
    res = bench.run_benchmark(TINY, [], ["64x96"], ["float32", "bfloat16"], iters=2, warmup=1, pipeline_frames=5,
                              pipeline_videos=1, breakdown_iters=1, profile=True, profile_iters=1, device="cuda",
                              num_classes=8, verbose=False)
    assert [r["dtype"] for r in res["rows"]] == ["float32", "bfloat16"]
    for r in res["rows"]:
        assert r["train_peak_gib"] > 0 and r["infer_peak_gib"] > 0 and r["train_ms"] > 0
        assert set(r["profile"]) == {"train_device", "train_cpu", "inference_device", "inference_cpu"}
        # the GPU works for part of an iteration, never for much more than all of it (the profiled
        # iterations are not the timed ones)
        assert 0 < r["train_gpu_busy_ms"] < 3 * r["train_ms"]
        assert 0 < r["inference_gpu_busy_ms"] < 3 * r["infer_ms"]
    assert "| float32 | 64x96 |" in bench.format_gpu_busy(res)


def test_notebook_runs_with_tiny_parameters(tmp_path):
    import papermill as pm          # here, so the GPU test above runs where papermill is not installed

    assert_stored_clean(NOTEBOOK, ())
    out_json = tmp_path / "bench.json"
    executed = tmp_path / "executed.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(executed), kernel_name="python3", cwd=str(tmp_path),
                        parameters=dict(config_file=TINY, sizes="64x96", dtypes="float32", iters=1, warmup=1,
                                        pipeline_frames=4, pipeline_videos=1, breakdown_iters=1, profile=True,
                                        profile_iters=1, num_classes=8,
                                        device="cpu", out_json=str(out_json)), progress_bar=False)
    results = json.loads(out_json.read_text())
    assert [(r["dtype"], r["size"]) for r in results["rows"]] == [("float32", "64x96")]
    nb = json.loads(executed.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    text = "".join(o["text"] if isinstance(o.get("text"), str) else "".join(o.get("text", [])) for o in outputs)
    assert "CPU run" in text or "GPU:" in text
    assert "train_cpu" in text and "Self CPU" in text                             # the profiler tables
    assert any("image/png" in o.get("data", {}) for o in outputs)                 # the breakdown chart
    last = nb["cells"][-1]["outputs"]
    assert "".join(last[-1]["text"]).rstrip().splitlines()[-1].startswith("| T=3 K=3 | float32 | 64x96 |")


def test_gpu_busy_is_the_union_of_activity_intervals():
    from types import SimpleNamespace as NS

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(start, end, device=cuda, annotation=False):
        return NS(time_range=NS(start=start, end=end), device_type=device, is_user_annotation=annotation)

    events = [ev(0, 10), ev(5, 12),                      # overlapping kernels on two streams: 0..12
              ev(20, 25),                                # after an idle gap: 5 more
              ev(0, 30, annotation=True),                # an annotation spanning both: not work
              ev(40, 100, device=cpu)]                   # host op: not GPU work
    assert bench._busy_us(events) == 17
    assert bench._busy_us([]) == 0
