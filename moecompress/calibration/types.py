"""The calibration data every source returns, alone in its module.

``sources.py`` (text, built-in sets, and the model-generated sources), ``ebss.py`` and ``sampling.py``
all build a :class:`CalibrationSet`; keeping it here lets ``sources`` import the generators and the
generators import the type, without any of them importing each other in a cycle.

Shape legend: n samples, Lq seqlen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CalibrationSet"]


@dataclass
class CalibrationSet:
    """Calibration token windows.

    input_ids: [n, Lq] int64. domains: one label per row (the domain of the document the window starts in),
    or None when the source has no domains. source: human-readable description of where the rows came from.
    """

    input_ids: torch.LongTensor
    domains: list[str] | None
    source: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])
