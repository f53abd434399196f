#!/usr/bin/env python
"""Write the synthetic YouTube-VIS dataset (and optionally its COCO image variant) under a data path.

Example: python data_scripts/make_synthetic_vis.py --data-path data --videos 24 8 --frames 8 16 --coco
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from devis_core.data.synthetic import make_synthetic_coco, make_synthetic_vis  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default="data", help="DATASETS.DATA_PATH (default: data)")
    parser.add_argument("--name", default="synthetic_vis", help="folder of the VIS dataset (default: synthetic_vis)")
    parser.add_argument("--coco-name", default="synthetic_coco", help="folder of the COCO variant")
    parser.add_argument("--videos", type=int, nargs=2, metavar=("TRAIN", "VALID"), default=(24, 8))
    parser.add_argument("--frames", type=int, nargs=2, metavar=("MIN", "MAX"), default=(8, 16))
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(240, 320))
    parser.add_argument("--categories", type=int, default=6, help="number of categories (1..8)")
    parser.add_argument("--objects", type=int, nargs=2, metavar=("MIN", "MAX"), default=(2, 4))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coco", action="store_true", help="also write the COCO image variant")
    parser.add_argument("--images", type=int, nargs=2, metavar=("TRAIN", "VAL"), default=(64, 16),
                        help="number of COCO images per split (with --coco)")
    args = parser.parse_args(argv)
    paths = {"vis": make_synthetic_vis(args.data_path, args.name, num_videos=tuple(args.videos),
                                       frames=tuple(args.frames), size=tuple(args.size),
                                       num_categories=args.categories, objects=tuple(args.objects),
                                       seed=args.seed)}
    if args.coco:
        paths["coco"] = make_synthetic_coco(args.data_path, args.coco_name, num_images=tuple(args.images),
                                            size=tuple(args.size), num_categories=args.categories,
                                            objects=tuple(args.objects), seed=args.seed)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
