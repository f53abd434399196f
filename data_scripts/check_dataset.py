#!/usr/bin/env python
"""Check a YouTube-VIS / OVIS / COCO annotation file against its frames; print every problem.

Usage: python data_scripts/check_dataset.py ANN.json --images IMAGE_ROOT [--format ytvis|coco]
Exit code 0 when the dataset is consistent (one summary line), 1 otherwise (one line per problem).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from devis_core.data.checker import check_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ann_file", help="annotation JSON (YouTube-VIS/OVIS 'videos' or COCO 'images')")
    parser.add_argument("--images", required=True, help="folder the file_names / file_name entries are relative to")
    parser.add_argument("--format", choices=("ytvis", "coco"), default=None,
                        help="annotation format (default: 'ytvis' if the file has a 'videos' key, else 'coco')")
    args = parser.parse_args(argv)
    problems, summary = check_dataset(args.ann_file, args.images, args.format)
    for problem in problems:
        print(problem)
    print(summary, file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
