"""The known-answer inputs of ../shared/METHODS.md section 0.6 (cases A-E), shared by the loss, metric and
heat-map tests. Logits are written out exactly as the document gives them; probabilities = softmax over C."""
from __future__ import annotations

import numpy as np
import torch

_A = (
    [[1.5, 2.9, 2.7, 1.0], [1.2, -0.5, 0.6, 1.4], [2.2, -1.8, 1.6, -0.1], [2.2, 1.4, -0.4, 0.5]],
    [[0.8, -0.2, -0.2, 0.7], [-0.9, 0.0, 1.9, -0.7], [-1.9, 0.7, 1.0, 0.3], [-1.5, 0.0, 2.4, 1.3]],
)
_A_LABELS = [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]

_B = (
    [[1.5, 2.5, 2.2, 2.2, 3.1, 0.3], [0.9, -1.3, -0.1, 1.0, 0.0, 2.0], [-0.4, 0.1, -0.9, 1.8, 0.9, 2.4],
     [1.4, 0.6, 0.7, -0.3, -0.5, 1.4], [0.9, -0.6, -0.3, -0.7, 2.3, -0.1], [2.3, 0.9, 1.0, 0.1, 1.4, 1.3]],
    [[0.2, -0.5, 0.1, 1.8, 0.4, -0.6], [1.0, 1.4, 2.1, 2.1, 1.1, -1.9], [-0.3, 2.1, -0.4, 0.4, 2.5, -0.5],
     [1.2, 3.1, 1.1, 1.2, 2.6, 2.3], [0.2, 1.5, 2.1, 0.6, -1.6, -0.9], [0.4, 0.5, -1.5, -1.9, -0.3, -0.2]],
    [[0.0, 0.7, 1.2, 0.2, 0.6, -1.1], [-1.2, 0.2, 0.7, 0.7, 0.6, 0.8], [0.8, -1.8, 0.8, 2.0, 0.6, -1.5],
     [1.2, -0.4, 1.3, 1.8, 0.7, -1.4], [1.0, 0.1, -0.8, -0.3, -2.2, -0.6], [0.2, -0.7, -0.3, -0.1, 0.0, 1.0]],
)
_B_LABELS = [[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 2, 2, 1, 0], [0, 1, 2, 2, 1, 0],
             [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]

_C = (
    [[[3.3, -1.6, 2.5, 1.6], [2.8, 0.4, 1.8, 1.5], [1.0, 0.6, 0.4, 1.1], [1.3, 2.2, 2.2, 1.0]],
     [[1.1, -0.3, 3.2, 1.3], [2.8, 0.4, 1.9, 1.5], [1.8, 1.5, -1.0, 1.3], [0.0, 1.8, 1.1, 1.7]],
     [[1.1, 0.7, 1.2, 2.6], [2.4, 1.2, -1.2, 2.2], [0.1, 1.0, 0.8, 2.2], [1.7, 2.0, 1.8, 0.8]]],
    [[[0.5, 1.4, 0.0, 0.6], [-0.1, 2.5, 2.2, 0.9], [0.3, 3.1, 1.1, -0.3], [-0.6, 0.6, -0.6, -0.6]],
     [[0.7, 1.2, 0.6, -2.7], [-1.0, 0.4, 0.3, 1.1], [1.8, 1.2, 0.8, 2.2], [0.1, 0.1, 0.8, 0.0]],
     [[0.4, -1.9, -1.6, 1.1], [0.8, -0.5, 0.5, -0.2], [-1.2, -0.3, 1.7, 0.1], [1.2, -0.2, 0.4, 1.4]]],
)
_C_LABELS = [[[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
             [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 0]],
             [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]


def _case_e() -> tuple[np.ndarray, np.ndarray]:
    """12x12 disk of 32 voxels; ch0 = 0, ch1 from the integer rule (weaker on the interface); no RNG."""
    i, j = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    labels = ((i - 5.5) ** 2 + (j - 5.5) ** 2 <= 12.25).astype(np.int64)
    iface = np.zeros(labels.shape, dtype=bool)  # a 4-neighbour (inside the image) has the other label
    vertical, horizontal = labels[1:] != labels[:-1], labels[:, 1:] != labels[:, :-1]
    iface[1:] |= vertical
    iface[:-1] |= vertical
    iface[:, 1:] |= horizontal
    iface[:, :-1] |= horizontal
    ch1 = (2 * labels - 1) * np.where(iface, 0.5, 2.0) + 0.25 * (((3 * i + 5 * j) % 7) - 3) + 0.1
    return np.stack([np.zeros_like(ch1), ch1]).astype(np.float32), labels


def case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (1, C, *S) float32, labels (1, *S) int64)`` of METHODS.md case A, B, C or E."""
    if name == "E":
        logits, labels = _case_e()
        return torch.from_numpy(logits)[None], torch.from_numpy(labels)[None]
    table = {"A": (_A, _A_LABELS), "B": (_B, _B_LABELS), "C": (_C, _C_LABELS)}
    if name not in table:
        raise ValueError(f"unknown METHODS.md case {name!r}; use A, B, C or E (D: case_d)")
    logits, labels = table[name]
    return torch.tensor([logits], dtype=torch.float32), torch.tensor([labels], dtype=torch.int64)


def case_d() -> tuple[np.ndarray, np.ndarray]:
    """Case D: ``(pred, ref)`` label maps ``(1, 10, 10)``."""
    ref = np.zeros((1, 10, 10), dtype=np.int64)
    ref[0, 2:6, 2:6] = 1
    pred = np.zeros((1, 10, 10), dtype=np.int64)
    pred[0, 3:7, 4:9] = 1
    return pred, ref
