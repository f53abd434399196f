"""Counts that describe a video dataset at a glance: videos, frames, instances per category."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CategoryCount:
    """Per-category counts: instances (annotation tracks) and the frames on which they have a mask."""

    category_id: int
    name: str
    instances: int = 0
    masks: int = 0


@dataclass
class VideoDatasetSummary:
    """Summary of a VideoIndex, computed from its annotation records (no frame or mask is decoded)."""

    ann_file: str
    num_videos: int
    num_frames: int
    min_frames: int
    max_frames: int
    frame_sizes: list[tuple[int, int]]            # distinct (height, width), sorted
    num_instances: int
    num_masks: int
    categories: list[CategoryCount] = field(default_factory=list)   # every category, in id order

    def __str__(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.frame_sizes) or "-"
        lines = [
            f"{self.ann_file}",
            f"  videos: {self.num_videos}   frames: {self.num_frames} "
            f"({self.min_frames}-{self.max_frames} per video)   frame size (HxW): {sizes}",
            f"  instances: {self.num_instances}   annotated masks: {self.num_masks}",
        ]
        width = max([len(c.name) for c in self.categories] + [len("category")])
        lines.append(f"  {'id':>3}  {'category':<{width}}  {'instances':>9}  {'masks':>6}")
        for c in self.categories:
            lines.append(f"  {c.category_id:>3}  {c.name:<{width}}  {c.instances:>9}  {c.masks:>6}")
        return "\n".join(lines)


def summarize_videos(index) -> VideoDatasetSummary:
    """Count videos, frames and instances per category of a devis_core.data.ytvis_format.VideoIndex.

    An instance is one annotation record (a track over the video); its masks are the frames whose
    segmentation is not null. Categories without instances are listed with zeros.
    Raises KeyError naming the annotation id when a record uses a category the file does not define.
    """
    counts = {cid: CategoryCount(cid, name) for cid, name in sorted(index.categories.items())}
    lengths, sizes = [], set()
    num_instances = num_masks = 0
    for video in index.videos:
        video_id = video["id"]
        lengths.append(index.num_frames(video_id))
        sizes.add((int(video["height"]), int(video["width"])))
        for record in index.annotations(video_id):
            category = record["category_id"]
            if category not in counts:
                raise KeyError(f"{index.ann_file}: annotation {record.get('id')} of video {video_id} has "
                               f"category_id {category}, expected one of {sorted(counts)}")
            masks = sum(s is not None for s in record.get("segmentations") or [])
            counts[category].instances += 1
            counts[category].masks += masks
            num_instances += 1
            num_masks += masks
    return VideoDatasetSummary(
        ann_file=str(index.ann_file),
        num_videos=len(lengths),
        num_frames=sum(lengths),
        min_frames=min(lengths, default=0),
        max_frames=max(lengths, default=0),
        frame_sizes=sorted(sizes),
        num_instances=num_instances,
        num_masks=num_masks,
        categories=list(counts.values()),
    )
