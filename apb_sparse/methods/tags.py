"""The taxonomy tags every pruning method carries as class data (``PruningMethod.tags``).

The surveyed methods' tags, as data, are in :mod:`apb_sparse.taxonomy`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ["TaxonomyTags", "TRAINING_TYPES", "CRITERIA"]

TRAINING_TYPES = ("AT", "AT(PGD)", "AT(TRADES)", "NT", "KD", "KD+FGSM", "CNI", "FGSM", "FAST-AT",
                  "None", "n.s.")
CRITERIA = ("LWM", "SOLWM", "RELWM", "LIS", "HGM", "BCS", "random")


@dataclass(frozen=True)
class TaxonomyTags:
    """Where a method sits in the survey's taxonomy (Piras et al., arXiv 2409.01249).

    Attributes:
        pipeline: "A" (prune after training), "B" (before training) or "D" (during training).
        training: training type of each phase. A: ``(pretraining, finetuning)``; B:
            ``(pruning step, training step)``; D: ``(training,)``. Codes: AT (with the loss in
            brackets when the paper fixes it, e.g. "AT(TRADES)"), NT, KD, CNI, FGSM, FAST-AT,
            "None" (no such phase), "n.s." (not specified).
        schedule: "1S" (one-shot) or "IT" (iterative); None for pipeline D.
        structure: "US" and/or "S".
        granularity: for S: "filters", "channels" or "kernels"; else None.
        locality: "L" and/or "G"; empty when not specified.
        criterion: LWM, SOLWM, RELWM, LIS, HGM or BCS ("random" for the random baseline).
    """

    pipeline: str
    training: Tuple[str, ...]
    schedule: Optional[str]
    structure: Tuple[str, ...]
    granularity: Optional[str]
    locality: Tuple[str, ...]
    criterion: str

    def __post_init__(self):
        if self.pipeline not in ("A", "B", "D"):
            raise ValueError(f"pipeline must be 'A', 'B' or 'D', got {self.pipeline!r}")
        expected = 1 if self.pipeline == "D" else 2
        if len(self.training) != expected:
            raise ValueError(f"pipeline {self.pipeline} needs {expected} training types, got {self.training}")
        if self.schedule not in (("1S", "IT") if self.pipeline != "D" else (None,)):
            raise ValueError(f"schedule {self.schedule!r} does not fit pipeline {self.pipeline}")
        if not set(self.structure) <= {"US", "S"} or not self.structure:
            raise ValueError(f"structure must be a non-empty subset of ('US', 'S'), got {self.structure}")
        if not set(self.locality) <= {"L", "G"}:
            raise ValueError(f"locality must be a subset of ('L', 'G'), got {self.locality}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")

    @property
    def phases(self) -> Tuple[str, ...]:
        """Names of the phases ``training`` refers to."""
        return {"A": ("pretraining", "finetuning"), "B": ("pruning step", "training step"),
                "D": ("training",)}[self.pipeline]

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)
