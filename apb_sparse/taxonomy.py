"""The 26 adversarial pruning methods of the survey, as data.

Source: G. Piras, M. Pintor, A. Demontis, B. Biggio, G. Giacinto, F. Roli, "Adversarial Pruning:
A Survey and Benchmark of Pruning Methods for Adversarial Robustness", arXiv 2409.01249, and the
taxonomy file of its benchmark repository (pralab/AdversarialPruningBenchmark). Every entry has
the two taxonomy dimensions as a :class:`~apb_sparse.methods.TaxonomyTags`:

* pipeline A/B/D with the training type of each phase (A: pretraining, finetuning; B: pruning
  step, training step; D: training) and one-shot (1S) vs iterative (IT);
* structure (US / S and the granularity), locality (L / G) and criterion (LWM, SOLWM, RELWM,
  LIS, HGM, BCS).

Training codes: ``AT(PGD)`` / ``AT(TRADES)`` for adversarial training with that loss, ``NT``,
``KD``, ``FGSM``, ``FAST-AT``, ``KD+FGSM``, ``None`` (no such phase), ``n.s.`` (not specified).
The benchmark file labels RSR's and TwinRep's criterion "sparsity-based LWM"; the survey's
taxonomy (and ours) calls it RELWM (regularisation-based LWM).

Usage::

    from apb_sparse import taxonomy
    taxonomy.print_table()
    taxonomy.filter(pipeline="A", structure="S")
    taxonomy.get("HYDRA").method_class      # -> apb_sparse.methods.HYDRA
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type

from . import methods
from .methods.base import TaxonomyTags

__all__ = ["SurveyedMethod", "METHODS", "get", "filter", "implemented", "to_markdown",
           "print_table", "as_dicts"]


@dataclass(frozen=True)
class SurveyedMethod:
    """One surveyed method.

    Attributes:
        name: short name used by the survey (e.g. "HYDRA").
        citation: authors, title, venue and year.
        year: publication year.
        url: link to the paper.
        tags: the taxonomy (see :class:`~apb_sparse.methods.TaxonomyTags`).
        implemented: registry name in :mod:`apb_sparse.methods`, or None.
        note: remarks on the classification.
    """

    name: str
    citation: str
    year: int
    url: str
    tags: TaxonomyTags
    implemented: Optional[str] = None
    note: str = ""

    @property
    def method_class(self) -> Optional[Type]:
        """The implementing :class:`~apb_sparse.methods.PruningMethod` subclass, or None."""
        if self.implemented is None:
            return None

        return methods.get(self.implemented)

    @property
    def implementation_notes(self) -> str:
        """Where the implementation departs from the authors' code (``PruningMethod.notes``).

        Empty for entries without an implementation. Details per method: docs/methods.md.
        """
        cls = self.method_class
        return getattr(cls, "notes", "") if cls is not None else ""

    # Shortcuts to the tags.
    @property
    def pipeline(self) -> str:
        return self.tags.pipeline

    @property
    def structure(self) -> Tuple[str, ...]:
        return self.tags.structure

    @property
    def locality(self) -> Tuple[str, ...]:
        return self.tags.locality

    @property
    def criterion(self) -> str:
        return self.tags.criterion

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "citation": self.citation, "year": self.year, "url": self.url,
                **self.tags.as_dict(), "implemented": self.implemented, "note": self.note}


def _t(pipeline, training, schedule, structure, granularity, locality, criterion) -> TaxonomyTags:
    return TaxonomyTags(pipeline, tuple(training), schedule, tuple(structure), granularity,
                        tuple(locality), criterion)


_US, _USS = ("US",), ("US", "S")

METHODS: Tuple[SurveyedMethod, ...] = (
    # ---------------------------------------------------------------- A: prune after training
    SurveyedMethod("RADMM", "S. Ye et al., Adversarial Robustness vs. Model Compression, or Both?, ICCV 2019",
                   2019, "https://openaccess.thecvf.com/content_ICCV_2019/papers/Ye_Adversarial_Robustness_vs._Model_Compression_or_Both_ICCV_2019_paper.pdf",
                   _t("A", ("AT(PGD)", "AT(PGD)"), "1S", _USS, "filters", ("L",), "SOLWM"), "radmm"),
    SurveyedMethod("HYDRA", "V. Sehwag, S. Wang, P. Mittal, S. Jana, HYDRA: Pruning Adversarially Robust Neural Networks, NeurIPS 2020",
                   2020, "https://arxiv.org/abs/2002.10509",
                   _t("A", ("AT(TRADES)", "AT(TRADES)"), "1S", _US, None, ("L",), "LIS"), "hydra"),
    SurveyedMethod("Heracles", "Q. Zhao, C. Wressnegger, Non-Uniform Adversarially Robust Pruning, AutoML Conf 2022",
                   2022, "https://openreview.net/forum?id=rElOlZ6SUg5",
                   _t("A", ("AT(PGD)", "AT(PGD)"), "1S", _USS, "channels", ("G",), "LIS")),
    SurveyedMethod("HARP", "Q. Zhao, C. Wressnegger, Holistic Adversarially Robust Pruning, ICLR 2023",
                   2023, "https://openreview.net/forum?id=sAJDi9lD06L",
                   _t("A", ("AT(PGD)", "AT(PGD)"), "1S", _USS, "channels", ("G",), "LIS"), "harp",
                   "training type from the authors' code (intellisec/harp: default adv_loss 'pgd'); "
                   "APB lists AT(TRADES)"),
    SurveyedMethod("PwoA", "T. Jian, Z. Wang, Y. Wang, J. Dy, S. Ioannidis, Pruning Adversarially Robust Neural Networks without Adversarial Examples, ICDM 2022",
                   2022, "https://arxiv.org/abs/2210.04311",
                   _t("A", ("AT(TRADES)", "KD"), "1S", _US, None, ("L",), "SOLWM"), "pwoa",
                   "the implementation also offers a filter-structured variant"),
    SurveyedMethod("MAD", "B.-K. Lee, J. Kim, Y. M. Ro, Masking Adversarial Damage: Finding Adversarial Saliency for Robust and Sparse Network, CVPR 2022",
                   2022, "https://arxiv.org/abs/2204.02738",
                   _t("A", ("AT(PGD)", "AT(PGD)"), "1S", _US, None, ("G",), "LIS"), "mad"),
    SurveyedMethod("Sehwag19", "V. Sehwag, S. Wang, P. Mittal, S. Jana, Towards Compact and Robust Deep Neural Networks, arXiv 2019",
                   2019, "https://arxiv.org/abs/1906.06110",
                   _t("A", ("AT(PGD)", "AT(PGD)"), "IT", _USS, "filters", ("G",), "LWM"), None,
                   "lwm_global is its one-shot unstructured variant"),
    SurveyedMethod("RSR", "A. S. Rakin, Z. He, L. Yang, Y. Wang, L. Wang, D. Fan, Robust Sparse Regularization: Simultaneously Optimizing Neural Network Robustness and Compactness, arXiv 2019",
                   2019, "https://arxiv.org/abs/1905.13074",
                   _t("A", ("AT(PGD)", "n.s."), "1S", _US, None, ("G",), "RELWM"), None,
                   "benchmark file: sparsity-based LWM"),
    SurveyedMethod("BNAP", "Wei et al., batch-normalisation-based adversarial pruning, IEEE 2021",
                   2021, "https://ieeexplore.ieee.org/document/9534077",
                   _t("A", ("AT(PGD)", "AT(PGD)"), "1S", _USS, "filters", ("G",), "LIS")),
    SurveyedMethod("RFP", "Lim et al., Robustness-aware Filter Pruning for Robust Neural Networks Against Adversarial Attacks, IEEE MLSP 2021",
                   2021, "http://esoc.hanyang.ac.kr/publications/2021/Robustness_aware_Filter_Pruning_for_Robust_Neural_Networks_Against_Adversarial_Attacks.pdf",
                   _t("A", ("AT", "AT"), "1S", ("S",), "filters", ("L",), "HGM"), None,
                   "pre/finetuning follow the adversarial training of arXiv 1905.02175"),
    SurveyedMethod("Deadwooding", "S. Kaur et al., Deadwooding: Robust Global Pruning for Deep Neural Networks, arXiv 2022",
                   2022, "https://arxiv.org/abs/2202.05226",
                   _t("A", ("n.s.", "KD+FGSM"), "1S", _US, None, ("G",), "SOLWM")),
    SurveyedMethod("FRE", "Zhuang et al., adversarial filter pruning (FRE), IEEE ICASSP 2023",
                   2023, "https://ieeexplore.ieee.org/document/10095291",
                   _t("A", ("AT(TRADES)", "AT(TRADES)"), "IT", ("S",), "filters", ("G",), "LIS")),
    SurveyedMethod("Luo23", "Luo et al., robust filter pruning, IEEE 2023",
                   2023, "https://ieeexplore.ieee.org/document/10332249",
                   _t("A", ("AT(PGD)", "AT(PGD)"), "1S", ("S",), "filters", ("L",), "LIS")),
    SurveyedMethod("SR-GKP", "S. Zhong et al., One Less Reason for Filter Pruning: Gaining Free Adversarial Robustness with Structured Grouped Kernel Pruning, NeurIPS 2023",
                   2023, "https://openreview.net/forum?id=Pjky9XG8zP",
                   _t("A", ("NT", "NT"), "1S", ("S",), "kernels", ("L",), "LIS")),
    SurveyedMethod("FSRP", "Qian et al., robust filter pruning (FSRP), SSRN 2023",
                   2023, "https://papers.ssrn.com/sol3/papers.cfm?abstract_id=4551998",
                   _t("A", ("AT(PGD)", "AT(PGD)"), "1S", ("S",), "filters", ("L",), "LIS")),
    # ---------------------------------------------------------------- B: prune before training
    SurveyedMethod("Cosentino19", "J. Cosentino, F. Zaiter, D. Pei, J. Zhu, The Search for Sparse, Robust Neural Networks, arXiv 2019",
                   2019, "https://arxiv.org/abs/1912.02386",
                   _t("B", ("AT(PGD)", "AT(PGD)"), "IT", _US, None, ("G",), "LWM")),
    SurveyedMethod("Li20", "B. Li et al., Towards Practical Lottery Ticket Hypothesis for Adversarial Training, arXiv 2020",
                   2020, "https://arxiv.org/abs/2003.05733",
                   _t("B", ("FGSM", "AT(PGD)"), "1S", _US, None, ("G",), "LWM"), "li20"),
    SurveyedMethod("Wang20", "Wang et al., Achieving Adversarial Robustness via Sparsity, arXiv 2020",
                   2020, "https://arxiv.org/abs/2009.05423",
                   _t("B", ("AT(PGD)", "AT(PGD)"), "IT", _US, None, ("G",), "LWM")),
    SurveyedMethod("RST", "Y. Fu et al., Drawing Robust Scratch Tickets: Subnetworks with Inborn Robustness Are Found within Randomly Initialized Networks, NeurIPS 2021",
                   2021, "https://proceedings.neurips.cc/paper_files/paper/2021/file/6ce8d8f3b038f737cefcdafcf3752452-Paper.pdf",
                   _t("B", ("AT(PGD)", "None"), "1S", _US, None, ("L",), "LIS"), "rst"),
    SurveyedMethod("RobustBird", "T. Chen et al., Sparsity Winning Twice: Better Robust Generalization from More Efficient Training, ICLR 2022",
                   2022, "https://arxiv.org/abs/2202.09844",
                   _t("B", ("NT", "AT(PGD)"), "IT", _US, None, ("G",), "LWM"), "robustbird",
                   "pruning-step training type from the authors' code (the early-bird search runs "
                   "with natural SGD training); APB lists AT"),
    SurveyedMethod("AWT", "X. Shi et al., Finding Dynamics Preserving Adversarial Winning Tickets, AISTATS 2022",
                   2022, "https://proceedings.mlr.press/v151/shi22a/shi22a.pdf",
                   _t("B", ("AT(PGD)", "AT(PGD)"), "1S", _US, None, (), "LWM"), None,
                   "locality not specified"),
    # ---------------------------------------------------------------- D: prune during training
    SurveyedMethod("TwinRep", "C. Li, Q. Qiu, Z. Zhang, J. Guo, X. Cheng, Learning Adversarially Robust Sparse Networks via Weight Reparameterization, AAAI 2023",
                   2023, "https://ojs.aaai.org/index.php/AAAI/article/view/26027",
                   _t("D", ("AT(PGD)",), None, _USS, "channels", ("G",), "RELWM"), "twinrep",
                   "benchmark file: sparsity-based LWM"),
    SurveyedMethod("BCS-P", "O. Özdenizci, R. Legenstein, Training Adversarially Robust Sparse Networks via Bayesian Connectivity Sampling, ICML 2021",
                   2021, "https://proceedings.mlr.press/v139/ozdenizci21a/ozdenizci21a.pdf",
                   _t("D", ("AT(PGD)",), None, _US, None, ("G", "L"), "BCS")),
    SurveyedMethod("DNR", "S. Kundu, M. Nazemi, P. A. Beerel, M. Pedram, A Tunable Robust Pruning Framework Through Dynamic Network Rewiring of DNNs, ASP-DAC 2021",
                   2021, "https://arxiv.org/abs/2011.03083",
                   _t("D", ("AT(PGD)",), None, _USS, "channels", ("G",), "LIS")),
    SurveyedMethod("InTrain", "M. Vemparala et al., Adversarial Robust Model Compression using In-Train Pruning, CVPR Workshops 2021",
                   2021, "https://openaccess.thecvf.com/content/CVPR2021W/SAIAD/papers/Vemparala_Adversarial_Robust_Model_Compression_Using_In-Train_Pruning_CVPRW_2021_paper.pdf",
                   _t("D", ("FAST-AT",), None, _USS, "channels", ("G",), "LIS")),
    SurveyedMethod("FlyingBird", "T. Chen et al., Sparsity Winning Twice: Better Robust Generalization from More Efficient Training, ICLR 2022",
                   2022, "https://arxiv.org/abs/2202.09844",
                   _t("D", ("AT(PGD)",), None, _US, None, ("G",), "LWM"), "flyingbird"),
)

_BY_NAME = {m.name.lower(): m for m in METHODS}


def get(name: str) -> SurveyedMethod:
    """The entry named ``name`` (case-insensitive)."""
    if not isinstance(name, str) or name.lower() not in _BY_NAME:
        raise ValueError(f"unknown surveyed method {name!r}; expected one of {[m.name for m in METHODS]}")
    return _BY_NAME[name.lower()]


def implemented() -> List[SurveyedMethod]:
    """Entries with an implementation in :mod:`apb_sparse.methods`."""
    return [m for m in METHODS if m.implemented is not None]


_FILTER_KEYS = ("name", "pipeline", "structure", "granularity", "locality", "criterion", "schedule",
                "training", "implemented", "year")


def _as_set(v) -> set:
    if isinstance(v, (str, int)) or v is None:
        return {v}
    return set(v)


def filter(entries: Optional[Iterable[SurveyedMethod]] = None, **criteria) -> List[SurveyedMethod]:
    """Entries matching every criterion.

    Criteria (each a value or a collection of accepted values):
        name, pipeline ("A"/"B"/"D"), schedule ("1S"/"IT"), criterion, granularity, year: equality;
        structure ("US"/"S"), locality ("L"/"G"): the entry supports one of the values;
        training: some phase's type equals a value or starts with it followed by "(" (so "AT"
            matches "AT(PGD)" and "AT(TRADES)");
        implemented: True / False.

    Raises:
        ValueError: an unknown criterion.
    """
    unknown = set(criteria) - set(_FILTER_KEYS)
    if unknown:
        raise ValueError(f"unknown filter criteria {sorted(unknown)}; expected some of {list(_FILTER_KEYS)}")
    out = []
    for m in (METHODS if entries is None else entries):
        ok = True
        for key, value in criteria.items():
            want = _as_set(value)
            if key == "name":
                ok = m.name.lower() in {str(w).lower() for w in want}
            elif key in ("structure", "locality"):
                ok = bool(want & set(getattr(m.tags, key)))
            elif key == "training":
                ok = any(t == w or t.startswith(f"{w}(") for t in m.tags.training for w in want)
            elif key == "implemented":
                ok = (m.implemented is not None) == bool(value)
            elif key == "year":
                ok = m.year in want
            else:
                ok = getattr(m.tags, key) in want
            if not ok:
                break
        if ok:
            out.append(m)
    return out


_COLUMNS = ("method", "pipeline", "training", "1S/IT", "structure", "locality", "criterion",
            "implemented", "paper")


def _row(m: SurveyedMethod) -> List[str]:
    struct = ", ".join(m.tags.structure)
    if m.tags.granularity:
        struct += f" ({m.tags.granularity})"
    return [m.name, m.tags.pipeline, " / ".join(m.tags.training), m.tags.schedule or "-", struct,
            ", ".join(m.tags.locality) or "n.s.", m.tags.criterion, m.implemented or "",
            f"{m.citation.split(',')[0]} {m.year}"]


def as_dicts(entries: Optional[Iterable[SurveyedMethod]] = None) -> List[Dict[str, Any]]:
    """Entries as plain dicts (JSON-ready)."""
    return [m.as_dict() for m in (METHODS if entries is None else entries)]


def to_markdown(entries: Optional[Iterable[SurveyedMethod]] = None) -> str:
    """A Markdown table of the entries (all by default)."""
    rows = [_row(m) for m in (METHODS if entries is None else entries)]
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(entries: Optional[Iterable[SurveyedMethod]] = None, file=None) -> None:
    """Print an aligned plain-text table of the entries (all by default)."""
    rows = [list(_COLUMNS)] + [_row(m) for m in (METHODS if entries is None else entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    out = file if file is not None else sys.stdout
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)
