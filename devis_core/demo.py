"""Run DeVIS on one's own video: a folder of frames or a video file in, results JSON + zip and overlays out.

    python -m devis_core.demo --config-file devis/YT-21/devis_R_50_YT-21.yaml --weights w.pth \\
        --input my_video.mp4 --out demo_out [--score-threshold 0.5] [KEY VALUE ...]

Frames are pre-processed as the official test pipeline does (spec §7.2) and go through the same
near-online inference as the benchmark runs (``devis_core.inference.infer_video``). Video files are
decoded with PyAV. The whole video is kept in memory as uint8 frames for the overlays; the model and the
tracker still see it clip by clip.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, detr_resize_size
from .results import write_results

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
OVERLAY_DIR = "overlays"


class DemoInputError(ValueError):
    """The --input path cannot be read as a video: names the file and what was expected."""


def read_frame_folder(folder: str) -> tuple[list[np.ndarray], list[str]]:
    """Frames of a folder of images (.jpg/.jpeg/.png, sorted by name) as (H, W, 3) uint8 RGB, and their
    file names. Every frame must have the size of the first."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DemoInputError(f"{folder}: no frames found (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    frames = []
    for name in names:
        frames.append(_read_image(os.path.join(folder, name)))
        if frames[-1].shape != frames[0].shape:
            raise DemoInputError(f"{os.path.join(folder, name)}: frame is {frames[-1].shape[0]}x{frames[-1].shape[1]} "
                                 f"(HxW), the first frame {names[0]} is {frames[0].shape[0]}x{frames[0].shape[1]}; "
                                 "all frames of a video must have one size")
    return frames, names


def _read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DemoInputError(f"{path}: cannot be decoded as an image ({err})") from err


def read_video_file(path: str) -> list[np.ndarray]:
    """All frames of a video file (first video stream, decoded with PyAV) as (H, W, 3) uint8 RGB."""
    try:
        import av
    except ModuleNotFoundError as err:
        raise DemoInputError(f"{path}: reading video files needs PyAV (pip install av), which is not "
                             "installed; pass a folder of frames instead") from err
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DemoInputError(f"{path}: the file holds no video stream")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.FFmpegError as err:
        raise DemoInputError(f"{path}: cannot be decoded as a video ({err})") from err
    if not frames:
        raise DemoInputError(f"{path}: the video stream has no decodable frame")
    return frames


def read_input(path: str) -> tuple[list[np.ndarray], list[str]]:
    """A folder of frames, a single image or a video file -> (frames (H, W, 3) uint8 RGB, frame names)."""
    if os.path.isdir(path):
        return read_frame_folder(path)
    if not os.path.isfile(path):
        raise DemoInputError(f"{path}: no such file or folder (expected a folder of frames or a video file)")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return [_read_image(path)], [os.path.basename(path)]
    frames = read_video_file(path)
    return frames, [f"{t:06d}" for t in range(len(frames))]


def preprocess_frames(frames: Sequence[np.ndarray], min_size: int, max_size: float) -> Tensor:
    """Test pre-processing of spec §7.2: PIL bilinear (antialiased) resize to short side ``min_size``
    with long side <= ``max_size``, then ToTensor and ImageNet normalisation.

    frames: n (H, W, 3) uint8 RGB. Returns (n, 3, h, w) float32.
    """
    height, width = frames[0].shape[:2]
    size = list(detr_resize_size((height, width), int(min_size), max_size))
    out = [F.pil_to_tensor(F.resize(Image.fromarray(np.ascontiguousarray(f)), size)) for f in frames]
    return F.normalize(torch.stack(out).to(torch.float32) / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))


def num_classes_from_checkpoint(path: str) -> int:
    """Number of class logits of a (DeVIS or image) checkpoint: rows of its first class head."""
    from .checkpoint import extract_state_dict, read_checkpoint

    sd = extract_state_dict(read_checkpoint(path, trusted=True), path)
    for key in ("def_detr.class_embed.0.weight", "class_embed.0.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    raise DemoInputError(f"{path}: no 'def_detr.class_embed.0.weight' in the checkpoint to read the number of "
                         "classes from; pass --num-classes")


def read_category_names(path: str) -> dict[int, str]:
    """Category id -> name from a YouTube-VIS / COCO annotation JSON ('categories') or a text file with
    one name per line (line i is id i, from 1)."""
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list):
            raise DemoInputError(f"{path}: expected a JSON object with a 'categories' list")
        try:
            return {int(c["id"]): str(c["name"]) for c in cats}
        except (KeyError, TypeError, ValueError) as err:
            raise DemoInputError(f"{path}: every category needs an integer 'id' and a 'name' ({err})") from err
    with open(path, encoding="utf-8") as fh:
        names = [line.strip() for line in fh if line.strip()]
    return {i + 1: name for i, name in enumerate(names)}


def run_demo(cfg, model, frames: Sequence[np.ndarray], out_dir: str, device: torch.device | str, video_id: int = 1,
             score_threshold: float = 0.5, animation: str | None = None,
             category_names: dict[int, str] | None = None) -> dict:
    """Near-online inference on ``frames`` ((H0, W0, 3) uint8 RGB) and the files of a demo run.

    Writes ``out_dir/results.json`` + ``results.zip`` (all tracks) and the overlays of the tracks scoring
    at least ``score_threshold`` under ``out_dir/overlays`` (merged and per track; ``animation`` 'gif' or
    'mp4' adds a moving picture). Returns {"results": entries, "results_json", "results_zip",
    "overlays": list of written paths}.
    """
    from .inference import infer_video, visualisation_function

    write_video_viz = visualisation_function("write_video_visualisations")
    height, width = frames[0].shape[:2]
    min_size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    model.to(device).eval()
    entries = infer_video(model, lambda ids: preprocess_frames([frames[i] for i in ids], min_size, max_size),
                          video_id, len(frames), (height, width), cfg, device)
    json_path, zip_path = write_results(entries, out_dir)
    overlays = write_video_viz(list(frames), entries, os.path.join(out_dir, OVERLAY_DIR), per_track=True, merged=True,
                               animation=animation, score_threshold=score_threshold, category_names=category_names)
    return {"results": entries, "results_json": json_path, "results_zip": zip_path, "overlays": list(overlays)}


def main(argv: list[str] | None = None) -> int:
    """Command line of the demo; see the module docstring."""
    from .config import add_config_arguments, load_config
    from .inference import resolve_device
    from .models import build_model

    parser = argparse.ArgumentParser(prog="python -m devis_core.demo", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--weights", required=True, help="DeVIS checkpoint (sets MODEL.WEIGHTS)")
    parser.add_argument("--input", required=True, help="a folder of frames (.jpg/.png, sorted by name) or a video file")
    parser.add_argument("--out", required=True, help="output folder for results.json, results.zip and overlays/")
    parser.add_argument("--video-id", type=int, default=1, help="video_id written into the results (default 1)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="tracks scoring below this are not drawn (they stay in results.json)")
    parser.add_argument("--num-classes", type=int, help="class logits of the model (default: read from the checkpoint)")
    parser.add_argument("--categories", help="category names: an annotation JSON with 'categories' or a text "
                                             "file with one name per line (id 1 first)")
    parser.add_argument("--animation", choices=("gif", "mp4"), help="also write the overlays as an animation")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the config's DEVICE)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file or None, list(args.opts) + ["MODEL.WEIGHTS", args.weights])
    if cfg.DATASETS.TYPE != "vis":
        raise DemoInputError(f"{args.config_file}: DATASETS.TYPE is {cfg.DATASETS.TYPE!r}; the demo needs a DeVIS "
                             "('vis') config")
    frames, _ = read_input(args.input)
    num_classes = args.num_classes or num_classes_from_checkpoint(args.weights)
    names = read_category_names(args.categories) if args.categories else None
    device = resolve_device(args.device or cfg.DEVICE)
    model = build_model(cfg, num_classes, load_weights=True)
    out = run_demo(cfg, model, frames, args.out, device, video_id=args.video_id,
                   score_threshold=args.score_threshold, animation=args.animation, category_names=names)
    shown = sum(e["score"] >= args.score_threshold for e in out["results"])
    print(f"{args.input}: {len(frames)} frames, {len(out['results'])} tracks ({shown} with score >= "
          f"{args.score_threshold}); results: {out['results_json']}, {out['results_zip']}; "
          f"{len(out['overlays'])} overlay files under {os.path.join(args.out, OVERLAY_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
