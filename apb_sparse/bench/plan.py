"""The grid: the reference rows and the cells of a run (:func:`plan_cells`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from .. import methods as registry
from .presets import Preset
from .results import cell_id, cell_key

DENSE = "dense"
#: The dense base model of pipeline-A methods (the model they prune), evaluated as its own row: it
#: has the budget of the base phase only, so it sits below the equal-budget "dense" reference.
DENSE_BASE = "dense_base"
REFERENCES = (DENSE, DENSE_BASE)

# ----------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Cell:
    method: str
    arch: str
    dataset: str
    structure: str
    sparsity: float
    seed: int

    @property
    def key(self) -> Tuple:
        return cell_key(self.__dict__)

    @property
    def id(self) -> str:
        return cell_id(self.key)


def _unique(values: Sequence) -> List:
    out: List = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def plan_cells(preset: Preset, *, methods: Sequence[str], structures: Sequence[str],
               sparsities: Dict[str, Sequence[float]], seeds: Sequence[int], archs: Sequence[str],
               datasets: Sequence[str]) -> List[Cell]:
    """Every cell of the grid, dense rows first, sparsity-major (an interrupted run still has
    every method at the lower sparsities). Methods that do not support a structure are left out.
    Repeated values (``--sparsities 0.5 0.5``, ``--seeds 0 0``) name one cell: the grid is
    deduplicated, keeping the first occurrence's order."""
    cells: List[Cell] = []
    seen = set()

    def add(cell: Cell) -> None:
        if cell.key not in seen:
            seen.add(cell.key)
            cells.append(cell)

    for dataset in _unique(datasets):
        for arch in _unique(archs):
            for seed in _unique([int(s) for s in seeds]):
                add(Cell(DENSE, arch, dataset, "none", 0.0, seed))
                if any(registry.get(m).tags.pipeline == "A" for m in methods):
                    add(Cell(DENSE_BASE, arch, dataset, "none", 0.0, seed))
                for structure in _unique(structures):
                    for s in sparsities.get(structure, ()):
                        for m in methods:
                            if structure in registry.get(m).structures:
                                add(Cell(m.lower(), arch, dataset, structure, float(s), seed))
    return cells
