"""Time and peak memory of the YouTube-VIS evaluator on a synthetic validation-sized case.

    python -m devis_core.benchmarks.evaluation [--videos 300 --frames 36 --size 720 1280 --preds 100]

The case is written to a folder, then evaluated in a fresh child process so that its peak resident
memory (``resource.getrusage``) is the evaluator's alone, not the generator's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

__all__ = ["measure_files", "run_benchmark", "format_report", "main"]


def _peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB."""
    # Linux carries ru_maxrss over fork + exec, so a child started from a big parent would report the
    # parent's peak; VmHWM belongs to the current address space only.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1.0 / 1024 / 1024 if sys.platform == "darwin" else 1.0 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_files(gt_json: str, results_json: str) -> dict:
    """Evaluate two files in this process, timing each stage; returns seconds, peak RSS (MiB) and AP."""
    from devis_core.evaluation import VideoInstanceEvaluator, _load_json, load_ground_truth

    baseline = _peak_rss_mib()
    t0 = time.perf_counter()
    gt = load_ground_truth(gt_json)
    t1 = time.perf_counter()
    results = _load_json(results_json, "results")
    t2 = time.perf_counter()
    evaluator = VideoInstanceEvaluator(gt)
    evaluator.process(results, source=results_json)
    t3 = time.perf_counter()
    metrics = evaluator.evaluate()
    t4 = time.perf_counter()
    return {"load_gt_s": t1 - t0, "parse_results_s": t2 - t1, "check_results_s": t3 - t2,
            "evaluate_s": t4 - t3, "total_s": t4 - t0, "baseline_rss_mib": baseline,
            "peak_rss_mib": _peak_rss_mib(), "AP": metrics["AP"], "AR100": metrics["AR100"],
            "num_predictions": metrics["num_predictions"]}


def run_benchmark(videos: int = 300, frames: int = 36, size: tuple[int, int] = (720, 1280), preds: int = 100,
                  categories: int = 40, seed: int = 0, workdir: str | None = None,
                  instances: tuple[int, int] = (1, 4)) -> dict:
    """Generate the case, evaluate it in a child process, return sizes, timings and peak memory."""
    from devis_core.benchmarks.eval_case import write_eval_case

    with tempfile.TemporaryDirectory(prefix="devis_eval_bench_") as tmp:
        folder = workdir or tmp
        t0 = time.perf_counter()
        gt_path, res_path = write_eval_case(folder, num_videos=videos, num_frames=frames, size=tuple(size),
                                            preds_per_video=preds, num_categories=categories, seed=seed,
                                            gt_per_video=tuple(instances))
        generate_s = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "devis_core.benchmarks.evaluation", "--child", gt_path, res_path]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"evaluation child failed ({proc.returncode}):\n{proc.stderr}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        report.update({"videos": videos, "frames": frames, "instances": list(instances), "size": list(size), "preds_per_video": preds,
                       "generate_s": generate_s, "gt_mib": os.path.getsize(gt_path) / 2 ** 20,
                       "results_mib": os.path.getsize(res_path) / 2 ** 20})
    return report


def format_report(r: dict) -> str:
    """A small table of the benchmark numbers."""
    rows = [("case", f"{r['videos']} videos, <= {r['frames']} frames, {r['size'][0]}x{r['size'][1]}, "
                     f"{r['instances'][0]}-{r['instances'][1]} objects and {r['preds_per_video']} preds per video "
                     f"({r['num_predictions']} predictions)"),
            ("files", f"gt {r['gt_mib']:.1f} MiB, results {r['results_mib']:.1f} MiB "
                      f"(generated in {r['generate_s']:.1f} s)"),
            ("load ground truth", f"{r['load_gt_s']:.2f} s"),
            ("parse results JSON", f"{r['parse_results_s']:.2f} s"),
            ("check results", f"{r['check_results_s']:.2f} s"),
            ("evaluate (IoU + COCOeval)", f"{r['evaluate_s']:.2f} s"),
            ("total (evaluate_files)", f"{r['total_s']:.2f} s"),
            ("peak RSS", f"{r['peak_rss_mib']:.0f} MiB (after imports: {r['baseline_rss_mib']:.0f} MiB)"),
            ("AP / AR100", f"{r['AP']:.4f} / {r['AR100']:.4f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """Command line: generate, evaluate in a child process, print the table (or JSON)."""
    parser = argparse.ArgumentParser(prog="python -m devis_core.benchmarks.evaluation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--frames", type=int, default=36, help="longest video; lengths are in [frames//2, frames]")
    parser.add_argument("--size", type=int, nargs=2, default=(720, 1280), metavar=("H", "W"))
    parser.add_argument("--preds", type=int, default=100, help="predictions per video")
    parser.add_argument("--categories", type=int, default=40)
    parser.add_argument("--instances", type=int, nargs=2, default=(1, 4), metavar=("LO", "HI"),
                        help="ground-truth objects per video (inclusive range)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the generated gt.json / results.json here")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    parser.add_argument("--child", nargs=2, metavar=("GT", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_files(*args.child)))
        return 0
    report = run_benchmark(args.videos, args.frames, tuple(args.size), args.preds, args.categories, args.seed,
                           args.workdir, tuple(args.instances))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
