"""Token sequences of different lengths as one padded tensor and its attention mask.

Prompts are padded on the left (decoding appends on the right, so every row's next token
sits in the last column); whole sequences scored in one pass (SFT, the reward head) on
the right (with causal attention a row's real tokens never see its padding).
"""

from __future__ import annotations

from typing import Any

import torch


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], mask [B, P])``, left-padded to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids_BP = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids_BP[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask_BP[row, width - len(seq):] = 1
    return ids_BP, mask_BP


def pad_right(sequences: list[list], pad: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, L], attention mask [N, L])``, right-padded to the longest sequence."""
    width = max(len(s) for s in sequences)
    values = torch.tensor([list(s) + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return values, mask
