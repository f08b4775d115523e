"""apb_sparse.taxonomy: the 26 surveyed methods as data."""
from __future__ import annotations

import io

import pytest

from apb_sparse import methods, taxonomy

SURVEY_NAMES = {
    "A": ["RADMM", "HYDRA", "Heracles", "HARP", "PwoA", "MAD", "Sehwag19", "RSR", "BNAP", "RFP",
          "Deadwooding", "FRE", "Luo23", "SR-GKP", "FSRP"],
    "B": ["Cosentino19", "Li20", "Wang20", "RST", "RobustBird", "AWT"],
    "D": ["TwinRep", "BCS-P", "DNR", "InTrain", "FlyingBird"],
}
APB_TEN = ["RADMM", "HYDRA", "HARP", "PwoA", "MAD", "Li20", "RST", "RobustBird", "TwinRep", "FlyingBird"]


def test_26_entries_with_the_survey_pipelines():
    assert len(taxonomy.METHODS) == 26
    assert len({m.name for m in taxonomy.METHODS}) == 26
    for pipeline, names in SURVEY_NAMES.items():
        assert [m.name for m in taxonomy.filter(pipeline=pipeline)] == names


def test_entries_are_complete():
    for m in taxonomy.METHODS:
        assert m.citation and m.url.startswith("http") and 2019 <= m.year <= 2023
        assert m.tags.criterion in ("LWM", "SOLWM", "RELWM", "LIS", "HGM", "BCS")
        if "S" in m.tags.structure:
            assert m.tags.granularity in ("filters", "channels", "kernels")


def test_implemented_entries_resolve_to_classes_with_matching_tags():
    impl = taxonomy.implemented()
    assert sorted(m.name for m in impl) == sorted(APB_TEN)
    for m in impl:
        cls = m.method_class
        assert issubclass(cls, methods.PruningMethod) and cls is methods.get(m.implemented)
        assert cls.tags == m.tags, m.name
    assert taxonomy.get("Heracles").method_class is None


def test_filters():
    us_global_lwm = taxonomy.filter(structure="US", locality="G", criterion="LWM")
    assert {m.name for m in us_global_lwm} == {"Sehwag19", "Cosentino19", "Li20", "Wang20",
                                               "RobustBird", "FlyingBird"}
    structured_only = [m.name for m in taxonomy.filter(structure="S") if m.tags.structure == ("S",)]
    assert set(structured_only) == {"RFP", "FRE", "Luo23", "SR-GKP", "FSRP"}
    assert [m.name for m in taxonomy.filter(training="FGSM")] == ["Li20"]
    assert {m.name for m in taxonomy.filter(training="KD")} == {"PwoA"}
    assert len(taxonomy.filter(training="AT")) > 15
    assert [m.name for m in taxonomy.filter(criterion="BCS")] == ["BCS-P"]
    assert [m.name for m in taxonomy.filter(pipeline="B", schedule="IT")] == ["Cosentino19", "Wang20", "RobustBird"]
    assert len(taxonomy.filter(implemented=False)) == 16
    assert taxonomy.filter(pipeline=["B", "D"], implemented=True, criterion="LIS")[0].name == "RST"
    sub = taxonomy.filter(pipeline="A")
    assert [m.name for m in taxonomy.filter(sub, locality="L", structure="S")] == ["RADMM", "RFP", "Luo23", "SR-GKP", "FSRP"]
    with pytest.raises(ValueError, match="unknown filter"):
        taxonomy.filter(color="red")
    with pytest.raises(ValueError, match="unknown surveyed method"):
        taxonomy.get("nope")


def test_tables():
    md = taxonomy.to_markdown()
    lines = md.splitlines()
    assert len(lines) == 2 + 26 and lines[0].startswith("| method |")
    assert "| HYDRA | A | AT(TRADES) / AT(TRADES) | 1S | US | L | LIS | hydra |" in md
    buf = io.StringIO()
    taxonomy.print_table(taxonomy.filter(pipeline="D"), file=buf)
    out = buf.getvalue().splitlines()
    assert len(out) == 2 + 5 and out[2].startswith("TwinRep")
    d = taxonomy.as_dicts()[0]
    assert d["name"] == "RADMM" and d["pipeline"] == "A" and d["implemented"] == "radmm"
