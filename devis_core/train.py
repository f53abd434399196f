"""Training entry point for torchrun, notebooks and tests: any of the three models on any registered dataset.

``torchrun --nproc_per_node=N -m devis_core.train --config-file F [--eval-only] [--resume] KEY VALUE ...``
(or ``python -m devis_core.train ...`` for one process; DEVICE cpu runs on the CPU with gloo). Writes to
OUTPUT_DIR: ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pth`` (last complete state, for --resume),
``checkpoint_epoch_{e}.pth`` every SOLVER.CHECKPOINT_INTERVAL epochs, ``checkpoint_best.pth`` (best AP)
and ``eval_epoch_{e}/`` (video results and metrics). From Python: ``train(cfg)`` returns the summary.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from devis_core import checkpoint as ckpt
from devis_core.config import add_config_arguments, load_config, save_config
from devis_core.distributed import (EpochSeededDataset, ShardedEpochSampler, barrier, cleanup_distributed,
                                    get_rank, get_world_size, init_distributed, is_distributed, is_main_process,
                                    seed_everything)
from devis_core.engine import evaluate_coco, prepare_for_amp, train_one_epoch, validation_loss
from devis_core.interrupt import StopRequest, TrainingInterrupted, ignore_sigterm_in_worker
from devis_core.logging_utils import build_training_log
from devis_core.precision import configure_tf32


def _seeded_generator(seed: int) -> torch.Generator:
    # Loaders draw their worker base seed from this instead of the global RNG, which the resume
    # checkpoint restores: the global stream must only see what the model draws (dropout).
    return torch.Generator().manual_seed(int(seed))


def build_train_data(cfg, rank: int, world: int):
    """Training dataset (augmentation seeded per (epoch, sample)), sampler and loader.

    Returns (loader, sampler, dataset wrapper, num_classes). ``loader`` yields (NestedTensor, targets).
    """
    if cfg.DATASETS.TYPE == "vis":
        from devis_core.data.vis import build_vis_loader, build_vis_train_dataset

        base, num_classes = build_vis_train_dataset(cfg)
    else:
        from devis_core.data.coco import build_coco_dataset

        base, num_classes = build_coco_dataset(cfg, "train")
    dataset = EpochSeededDataset(base, cfg.SEED)
    batch = int(cfg.SOLVER.BATCH_SIZE)
    sampler = ShardedEpochSampler(len(dataset), rank, world, shuffle=True, seed=cfg.SEED,
                                  max_samples=int(cfg.SOLVER.MAX_ITERS_PER_EPOCH) * batch)
    gen = _seeded_generator(cfg.SEED)
    if cfg.DATASETS.TYPE == "vis":
        loader = build_vis_loader(cfg, dataset, True, sampler=sampler, generator=gen)
    else:
        from devis_core.data.coco import collate_fn

        collate = functools.partial(collate_fn, pad_multiple=int(cfg.INPUT.TRAIN_PAD_MULTIPLE))
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=collate,
                            num_workers=int(cfg.NUM_WORKERS), generator=gen, drop_last=False,
                            worker_init_fn=ignore_sigterm_in_worker)
    return loader, sampler, dataset, num_classes


def _vis_val_loss_loader(cfg, rank: int, world: int):
    """Loader of TEST.VAL_LOSS_CLIPS validation clips (this rank's share) in training format, or None
    when it is off or the validation annotations hold no instance (public test splits)."""
    n = int(cfg.TEST.VAL_LOSS_CLIPS)
    if n <= 0:
        return None
    from torchvision.transforms import v2

    from devis_core.data.registry import resolve_dataset
    from devis_core.data.transforms import RandomShortSideResize
    from devis_core.data.vis import VISTrainDataset, collate_clips
    from devis_core.data.vis_transforms import ToClipTargets

    _, image_root, ann_file, num_classes = resolve_dataset(cfg.DATASETS.DATA_PATH, cfg.DATASETS.VAL_DATASET)
    t = cfg.MODEL.DEVIS.NUM_FRAMES
    tf = v2.Compose([RandomShortSideResize([cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST), ToClipTargets(t)])
    ds = VISTrainDataset(image_root, ann_file, t, tf, False, num_classes)
    if not any(ds.index.annotations(v["id"]) for v in ds.index.videos):
        return None
    picks = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique().tolist()
    mine = picks[rank::world]
    return DataLoader(Subset(EpochSeededDataset(ds, cfg.SEED), mine), batch_size=1, collate_fn=collate_clips,
                      num_workers=0, generator=_seeded_generator(cfg.SEED))


class Evaluator:
    """Evaluation during training for the configured dataset type: YouTube-VIS / OVIS AP through
    ``devis_core.inference`` (videos split over ranks) or COCO AP, plus the validation loss.

    ``__call__(model, criterion, epoch)`` returns {'AP', 'val_loss', ...} on every rank ('AP' is None
    when the validation split has no ground truth)."""

    def __init__(self, cfg, device: torch.device, rank: int, world: int):
        self.cfg, self.device = cfg, device
        if cfg.DATASETS.TYPE == "vis":
            from devis_core.data.vis import build_vis_test_dataset

            self.dataset, _ = build_vis_test_dataset(cfg)
            self.loss_loader = _vis_val_loss_loader(cfg, rank, world)
        else:
            from devis_core.coco_eval import build_coco_evaluator
            from devis_core.data.coco import build_coco_dataset, collate_fn
            from devis_core.models import build_postprocessors

            ds, _ = build_coco_dataset(cfg, "val")
            sampler = ShardedEpochSampler(len(ds), rank, world, shuffle=False)
            self.loader = DataLoader(ds, batch_size=int(cfg.SOLVER.BATCH_SIZE), sampler=sampler,
                                     collate_fn=collate_fn, num_workers=int(cfg.NUM_WORKERS),
                                     generator=_seeded_generator(cfg.SEED), worker_init_fn=ignore_sigterm_in_worker)
            self.coco = build_coco_evaluator(cfg, ds.ann_file)
            self.post = build_postprocessors(cfg)

    def __call__(self, model: nn.Module, criterion: nn.Module, epoch: int) -> dict:
        """model: the bare model (not the DDP wrapper)."""
        amp = bool(self.cfg.SOLVER.AMP)
        if self.cfg.DATASETS.TYPE != "vis":
            return evaluate_coco(model, criterion, self.post, self.loader, self.coco, self.device, amp)
        from devis_core.inference import run_inference_report

        out = validation_loss(model, criterion, self.loss_loader, self.device, amp) if self.loss_loader else {}
        out_dir = Path(self.cfg.OUTPUT_DIR) / f"eval_epoch_{epoch}"
        report = run_inference_report(self.cfg, model, self.dataset, out_dir, self.device, verbose=False)
        metrics = report.metrics if report is not None else None
        if is_distributed():
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        if metrics:
            out.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        out.setdefault("AP", None)
        return out


def eval_due(cfg, epoch: int) -> bool:
    """Evaluate after ``epoch`` when epoch ≥ TEST.START_EVAL_EPOCH and (epoch − start) is a multiple of
    TEST.EVAL_PERIOD, and always after the last epoch (0 or negative EVAL_PERIOD: never)."""
    period, start = int(cfg.TEST.EVAL_PERIOD), int(cfg.TEST.START_EVAL_EPOCH)
    if period <= 0:
        return False
    return (epoch >= start and (epoch - start) % period == 0) or epoch == int(cfg.SOLVER.EPOCHS)


def _gather_rng() -> list:
    states = ckpt.rng_states()
    if not is_distributed():
        return [states]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, states)
    return out


def train(cfg, resume: bool = False, eval_only: bool = False,
          callbacks: Sequence[Callable[[dict], None]] = ()) -> dict:
    """Train (or, with ``eval_only``, evaluate) the model ``cfg`` describes; see the module docstring.

    ``resume`` continues from OUTPUT_DIR/checkpoint.pth when it exists (model, optimiser, scheduler,
    epoch, iteration inside the epoch, RNG states). ``callbacks`` receive every log record on rank 0 (the
    notebook's live curves). Returns {'epochs_done', 'last_train', 'last_eval', 'best', 'output_dir'}.
    """
    rank, world, device = init_distributed(cfg.DEVICE)
    try:
        return _run(cfg, rank, world, device, resume, eval_only, callbacks)
    finally:
        cleanup_distributed()


def _stop(log, out_dir: Path, epoch: int, iteration: int) -> None:
    """Log the stop and raise ``TrainingInterrupted``; the caller has just saved (epoch, iteration)."""
    log.log({"kind": "interrupted", "epoch": epoch, "iteration": iteration})
    raise TrainingInterrupted(f"stopped by SIGTERM after epoch {epoch}, iteration {iteration}; the state is in "
                              f"{out_dir / ckpt.LAST_CHECKPOINT}: continue with --resume")


def _run(cfg, rank, world, device, resume, eval_only, callbacks) -> dict:
    from devis_core.criterion import build_criterion
    from devis_core.models import build_model
    from devis_core.optim import build_optimizer, build_scheduler

    seed_everything(int(cfg.SEED) + rank, bool(cfg.SOLVER.DETERMINISTIC))
    configure_tf32(bool(cfg.TF32))
    out_dir = Path(cfg.OUTPUT_DIR)
    main = is_main_process()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    log = build_training_log(cfg, main, callbacks)

    loader, sampler, train_set, num_classes = build_train_data(cfg, rank, world)
    model = build_model(cfg, num_classes, load_weights=True).to(device)
    criterion = build_criterion(cfg, num_classes).to(device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    evaluator = Evaluator(cfg, device, rank, world)
    if cfg.SOLVER.AMP:
        prepare_for_amp(model, criterion)

    start_epoch, start_iter, best = int(cfg.START_EPOCH), 0, {"AP": None, "epoch": None}
    last_path = out_dir / ckpt.LAST_CHECKPOINT
    if resume:
        if last_path.is_file():
            state = ckpt.load_training_state(last_path, model, optimizer, scheduler, rank=rank)
            best = state["best"] or best
            if state["epoch_complete"]:
                start_epoch, start_iter = state["epoch"] + 1, 0
            else:
                start_epoch, start_iter = state["epoch"], state["iteration"]
            if main:
                print(f"[train] resumed from {last_path}: epoch {state['epoch']}, iteration {state['iteration']}"
                      f"{' (epoch complete)' if state['epoch_complete'] else ''}", flush=True)
        elif main:
            print(f"[train] --resume: no checkpoint at {last_path} yet, starting from scratch", flush=True)

    if eval_only:
        metrics = evaluator(model, criterion, start_epoch - 1)
        log.log({"kind": "eval", "epoch": start_epoch - 1, **metrics})
        return {"epochs_done": 0, "last_train": {}, "last_eval": metrics, "best": best, "output_dir": str(out_dir)}

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # official: not every mask-head branch runs every step

    batch = int(cfg.SOLVER.BATCH_SIZE)
    every = int(cfg.SOLVER.CHECKPOINT_ITERS)
    log.log({"kind": "start", "epoch": start_epoch, "iteration": start_iter, "resumed": bool(resume)})
    last_train, last_eval = {}, {}
    with StopRequest(world) as stop:  # SIGTERM: checkpoint at the next iteration boundary, then stop
        for epoch in range(start_epoch, int(cfg.SOLVER.EPOCHS) + 1):
            skip = start_iter if epoch == start_epoch else 0
            sampler.set_position(epoch, 0)
            epoch_len = -(-len(sampler) // batch)
            sampler.set_position(epoch, skip * batch)
            train_set.set_epoch(epoch)
            loader.generator.manual_seed(int(cfg.SEED) * 1000 + epoch)

            def after_step(i: int, _epoch=epoch, _len=epoch_len) -> None:
                # the last iteration's stop check waits for the end-of-epoch checkpoint below
                stopping = i < _len and stop.requested()
                if stopping or (every > 0 and i % every == 0 and i < _len):
                    rng = _gather_rng()
                    if main:
                        ckpt.save_training_state(out_dir, model, optimizer, scheduler, _epoch, i, cfg, False, best,
                                                 rng=rng)
                        log.log({"kind": "checkpoint", "epoch": _epoch, "iteration": i})
                    barrier()
                if stopping:
                    _stop(log, out_dir, _epoch, i)

            t0 = time.time()
            last_train = train_one_epoch(train_model, criterion, loader, optimizer, device, epoch,
                                         cfg.SOLVER.GRAD_CLIP_MAX_NORM, amp=bool(cfg.SOLVER.AMP),
                                         skip_nonfinite=bool(cfg.SOLVER.SKIP_NONFINITE_STEPS), start_iteration=skip,
                                         num_iterations=epoch_len, log=log,
                                         log_interval=int(cfg.VISDOM_AND_LOG_INTERVAL), after_step=after_step)
            scheduler.step()
            record = {"kind": "train_epoch", "epoch": epoch, "train_loss": last_train.get("loss"),
                      "epoch_time_s": time.time() - t0, **{f"train_{k}": v for k, v in last_train.items()}}
            record["lr"] = last_train["lr"]
            log.log(record)
            if eval_due(cfg, epoch):
                last_eval = evaluator(model, criterion, epoch)
                log.log({"kind": "eval", "epoch": epoch, **last_eval})
                ap = last_eval.get("AP")
                if ap is not None and (best["AP"] is None or ap > best["AP"]):
                    best = {"AP": float(ap), "epoch": epoch}
                    if main:
                        ckpt.save_checkpoint(out_dir / "checkpoint_best.pth", model, epoch=epoch, cfg=cfg, best=best)
            rng = _gather_rng()
            if main:
                keep = epoch % max(1, int(cfg.SOLVER.CHECKPOINT_INTERVAL)) == 0
                extra = (f"checkpoint_epoch_{epoch}.pth",) if keep else ()
                ckpt.save_training_state(out_dir, model, optimizer, scheduler, epoch, epoch_len, cfg, True, best,
                                         extra_names=extra, rng=rng)
                log.log({"kind": "checkpoint", "epoch": epoch, "iteration": epoch_len, "epoch_complete": True})
            barrier()
            if epoch < int(cfg.SOLVER.EPOCHS) and stop.requested():
                _stop(log, out_dir, epoch, epoch_len)
    if main:
        log.log({"kind": "done", "epoch": int(cfg.SOLVER.EPOCHS), "best_AP": best["AP"], "best_epoch": best["epoch"]})
    return {"epochs_done": int(cfg.SOLVER.EPOCHS) - start_epoch + 1, "last_train": last_train,
            "last_eval": last_eval, "best": best, "output_dir": str(out_dir)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--config-file F [--eval-only] [--resume] KEY VALUE ...``."""
    parser = argparse.ArgumentParser(prog="devis_core.train", description=__doc__.splitlines()[0])
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS (or, with --resume, "
                        "OUTPUT_DIR/checkpoint.pth) and exit")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 with a one-line message on a NaN loss)."""
    from devis_core.engine import NonFiniteLossError

    args = parse_args(argv)
    cfg = load_config(args.config_file or None, args.opts)
    try:
        summary = train(cfg, resume=args.resume, eval_only=args.eval_only)
    except NonFiniteLossError as err:
        print(f"[train] rank {get_rank()}: stopped: {err}", file=sys.stderr, flush=True)
        return 1
    except TrainingInterrupted as err:
        print(f"[train] rank {get_rank()}: {err}", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now
        print(f"[train] done: {summary['epochs_done']} epoch(s); best AP {summary['best']['AP']} "
              f"(epoch {summary['best']['epoch']}); outputs in {summary['output_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
