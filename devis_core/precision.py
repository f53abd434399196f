"""Float32 matmul / convolution precision (the TF32 config key)."""
from __future__ import annotations

import torch


def configure_tf32(enabled: bool) -> None:
    """Let float32 matrix products and cuDNN convolutions run on TF32 tensor cores (``enabled``), or
    keep them in full float32 precision.

    TF32 rounds the operands of those products to a 10-bit mantissa: on an H100 it makes float32
    training and inference markedly faster but changes the numbers, so it is off by default and
    wherever parity with the official implementation is checked. Note that off also disables
    torch's default TF32 for cuDNN convolutions. Process-wide; no effect on CPU.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
