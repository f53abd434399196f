"""A batch of images padded to a common size, with the mask that says which pixels are padding."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class NestedTensor(NamedTuple):
    """Padded images and their padding mask.

    tensors: (B, C, H, W) images (or feature maps) zero-padded at the bottom/right.
    mask: (B, H, W) bool, True on padding pixels.
    """

    tensors: Tensor
    mask: Tensor

    def to(self, *args, **kwargs) -> "NestedTensor":
        """Move/cast the images; the mask keeps its bool dtype."""
        tensors = self.tensors.to(*args, **kwargs)
        return NestedTensor(tensors, self.mask.to(tensors.device))


def nested_tensor_from_tensor_list(images: Sequence[Tensor]) -> NestedTensor:
    """Pad a list of images to the largest height and width of the list (DETR's batching).

    images: list of (C, H_i, W_i) tensors of one dtype and device.
    Returns NestedTensor with tensors (B, C, max H, max W) (zero padding at bottom/right) and
    mask (B, max H, max W) True outside each image.
    """
    if len(images) == 0:
        raise ValueError("nested_tensor_from_tensor_list: got an empty list of images")
    for i, img in enumerate(images):
        if img.dim() != 3:
            raise ValueError(f"nested_tensor_from_tensor_list: image {i} has shape {tuple(img.shape)}, "
                             "expected (C, H, W)")
        if img.shape[0] != images[0].shape[0]:
            raise ValueError(f"nested_tensor_from_tensor_list: image {i} has {img.shape[0]} channels, "
                             f"image 0 has {images[0].shape[0]}")
    c = images[0].shape[0]
    h = max(int(img.shape[1]) for img in images)
    w = max(int(img.shape[2]) for img in images)
    first = images[0]
    tensors = first.new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
    for i, img in enumerate(images):
        tensors[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensors, mask)


def as_nested_tensor(samples) -> NestedTensor:
    """Accept a NestedTensor, a (tensors, mask) pair, a list of (C, H, W) images or a (B, C, H, W) batch
    without padding, and return a NestedTensor."""
    if isinstance(samples, NestedTensor):
        return samples
    if isinstance(samples, tuple) and len(samples) == 2 and all(isinstance(s, Tensor) for s in samples):
        tensors, mask = samples
        if tensors.dim() != 4 or mask.shape != (tensors.shape[0],) + tuple(tensors.shape[-2:]):
            raise ValueError(f"samples: expected images (B, C, H, W) and mask (B, H, W), got "
                             f"{tuple(tensors.shape)} and {tuple(mask.shape)}")
        return NestedTensor(tensors, mask.to(torch.bool))
    if isinstance(samples, Tensor):
        if samples.dim() != 4:
            raise ValueError(f"samples: expected a (B, C, H, W) batch, got shape {tuple(samples.shape)}")
        mask = torch.zeros((samples.shape[0],) + tuple(samples.shape[-2:]), dtype=torch.bool,
                           device=samples.device)
        return NestedTensor(samples, mask)
    if isinstance(samples, (list, tuple)):
        return nested_tensor_from_tensor_list(list(samples))
    raise TypeError(f"samples: expected NestedTensor, (tensors, mask), a tensor or a list of images, "
                    f"got {type(samples).__name__}")


def pad_batch_to_multiple(batch: NestedTensor, targets: Sequence[dict],
                          multiple: int) -> tuple[NestedTensor, list[dict]]:
    """Round a training batch's canvas up to multiples of ``multiple`` (INPUT.TRAIN_PAD_MULTIPLE).

    batch: images (N, C, H, W) with padding mask (N, H, W). targets: dicts whose optional ``masks``
    (K, h, w) (h ≤ H, w ≤ W, top-left aligned) are zero-padded to the new canvas too, so the mask loss
    compares predictions and targets on the same canvas; boxes stay normalised by each image's own size.
    Returns (NestedTensor (N, C, H', W') and mask (N, H', W') True on padding, targets); ``multiple`` ≤ 0
    returns the batch unchanged.
    """
    if multiple <= 0:
        return batch, list(targets)
    h, w = batch.tensors.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    padded = NestedTensor(torch.nn.functional.pad(batch.tensors, (0, pw, 0, ph)),
                          torch.nn.functional.pad(batch.mask, (0, pw, 0, ph), value=True))
    out = []
    for t in targets:
        t = dict(t)
        if "masks" in t:
            m = t["masks"]
            t["masks"] = torch.nn.functional.pad(m, (0, w + pw - m.shape[-1], 0, h + ph - m.shape[-2]))
        out.append(t)
    return padded, out
