"""The benchmark's results store (resume, torn lines), leaderboard writer, checkpoints and runner.

Everything runs on CPU on tiny models; the one real run (``test_run_resumes_...``) uses a
4-channel small_cnn, 128 training digits and a handful of attacked images.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings

import pytest
import torch

import apb_sparse
from apb_sparse.bench.checkpoint import (load_checkpoint, load_dense_model, read_state_dict, save_checkpoint,
                                         state_dict_bytes)
from apb_sparse.bench.leaderboard import leaderboard_rows, to_csv, to_html, to_markdown, write_leaderboard
from apb_sparse.bench.presets import Preset, get_preset
from apb_sparse.bench.results import ResultsStore, cell_key, read_records
from apb_sparse.models import get_model


def _record(method, sparsity, *, aa=0.5, clean=0.9, structure="unstructured", seed=0, flags=(), speedup=2.0):
    return {"method": method, "arch": "small_cnn", "dataset": "digits", "structure": structure,
            "sparsity": sparsity, "seed": seed,
            "tags": None if method == "dense" else {"pipeline": "A", "training": ["AT", "AT"], "schedule": "1S",
                                                    "structure": ["US"], "granularity": None, "locality": ["L"],
                                                    "criterion": "LWM"},
            "measured_sparsity": sparsity, "clean_accuracy": clean, "robust_accuracy": aa,
            "min_norm": {"median_distance": 0.125, "security_curve": {"eps": [0.0, 0.1, 0.2],
                                                                      "robust_accuracy": [clean, aa, 0.0]}},
            "latency": {"cpu": {"dense_ms": 4.0, "sparse_ms": 4.0 / speedup, "speedup": speedup, "batch": 64,
                                "rounds": 7}},
            "size_bytes": {"dense": 250_000, "sparse": 30_000}, "flags": list(flags),
            "config": {"preset": {"name": "quick", "eps": 0.1, "norm": "Linf", "attack": "quick",
                                  "aa_samples": 200}},
            "environment": {"cpu": "test cpu", "threads": 2}}


# ----------------------------------------------------------------------------------- results store
def test_store_appends_whole_lines_and_ignores_a_torn_last_line(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(_record("hydra", 0.9))
    store.append(_record("rst", 0.9))
    # an interrupted write: half a JSON line, no newline
    with open(store.path, "ab") as f:
        f.write(b'{"method": "harp", "arch": "small_cnn", "datas')
    with pytest.warns(RuntimeWarning, match="unreadable"):
        keys = store.done()
    assert keys == {cell_key(_record("hydra", 0.9)), cell_key(_record("rst", 0.9))}
    # the next record must not be glued to the torn line
    store.append(_record("harp", 0.9, aa=0.42))
    with pytest.warns(RuntimeWarning):
        recs = store.records()
    assert [r["method"] for r in recs] == ["hydra", "rst", "harp"]
    assert recs[-1]["robust_accuracy"] == 0.42
    # repair drops the torn line (kept aside) and leaves a clean file
    assert store.repair() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["method"] for r in store.records()] == ["hydra", "rst", "harp"]
    assert b"datas" in (tmp_path / "results.jsonl.bad").read_bytes()


def test_store_latest_record_of_a_cell_wins_and_inf_is_valid_json(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl")
    store.append(_record("hydra", 0.9, aa=0.1))
    rec = _record("hydra", 0.9000000001, aa=0.3)  # same cell (sparsity normalised)
    rec["min_norm"]["median_distance"] = float("inf")
    store.append(rec)
    latest = store.latest()
    assert len(latest) == 1
    (only,) = latest.values()
    assert only["robust_accuracy"] == 0.3 and only["min_norm"]["median_distance"] == "inf"
    for line in store.path.read_text().splitlines():
        json.loads(line)  # strict JSON: no bare Infinity


def test_store_rejects_records_without_a_key(tmp_path):
    with pytest.raises(ValueError, match="sparsity"):
        ResultsStore(tmp_path / "r.jsonl").append({"method": "x", "arch": "a", "dataset": "d", "structure": "s",
                                                   "seed": 0})


# ----------------------------------------------------------------------------------- leaderboard
def _table_after(md: str, heading: str):
    """The Markdown table lines that follow the first line starting with ``heading``."""
    lines = md.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith(heading))
    j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("|"))
    out = []
    while j < len(lines) and lines[j].startswith("|"):
        out.append(lines[j])
        j += 1
    return out


def test_leaderboard_markdown_and_csv_content():
    recs = [_record("dense", 0.0, aa=0.6, clean=0.95, speedup=1.0),
            _record("hydra", 0.9, aa=0.40, clean=0.88, flags=["masking?:eps_monotone"]),
            _record("rst", 0.9, aa=0.45, clean=0.80, speedup=3.0),
            _record("hydra", 0.5, aa=0.55, clean=0.92)]
    md = to_markdown(recs)
    lines = _table_after(md, "### All columns")
    header = lines[0]
    for col in ("taxonomy", "sparsity %", "clean %", "AA %", "median min-norm", "CPU dense ms", "CPU sparse ms",
                "CPU speedup", "size dense", "size sparse", "flags"):
        assert col in header
    assert "GPU" not in header  # no GPU column without GPU measurements
    body = [l for l in lines if l.startswith("| ") and not l.startswith("| method")]
    methods = [l.split("|")[1].strip() for l in body]
    # dense first, then by sparsity, then by robust accuracy (rst 45 % before hydra 40 % at 90 %)
    assert methods == ["dense", "hydra", "rst", "hydra"]
    rst = body[2].split("|")
    assert rst[3].strip() == "90.0" and rst[5].strip() == "80.0" and rst[6].strip() == "45.0"
    assert rst[11].strip() == "3.00x"
    assert "A AT/AT 1S US L LWM" in body[1]
    assert "masking?:eps_monotone" in body[3]
    assert "custom AutoAttack subset" in md  # the quick preset says it is not AA standard

    rows = list(csv.DictReader(io.StringIO(to_csv(recs))))
    assert len(rows) == 4
    r = next(r for r in rows if r["method"] == "rst")
    assert float(r["aa_acc"]) == pytest.approx(0.45) and float(r["cpu_speedup"]) == pytest.approx(3.0)
    assert int(r["size_sparse_bytes"]) == 30_000 and r["gpu_speedup"] == ""


def test_leaderboard_repeats_dense_row_per_structure_and_shows_gpu():
    recs = [_record("dense", 0.0, structure="none"), _record("hydra", 0.9),
            _record("radmm", 0.5, structure="filter")]
    recs[1]["latency"]["cuda"] = {"dense_ms": 1.0, "sparse_ms": 0.5, "speedup": 2.0}
    rows = leaderboard_rows(recs)
    assert [(r["structure"], r["method"]) for r in rows] == [("filter", "dense"), ("filter", "radmm"),
                                                            ("unstructured", "dense"), ("unstructured", "hydra")]
    md = to_markdown(recs)
    assert "## digits / small_cnn / filter" in md and "## digits / small_cnn / unstructured" in md
    assert "GPU speedup" in md
    assert "<table class='sortable'" in to_html(recs)


def test_write_leaderboard_files_and_plots(tmp_path):
    recs = [_record("dense", 0.0), _record("hydra", 0.5), _record("hydra", 0.9)]
    write_leaderboard(recs, tmp_path)
    for kind in ("markdown", "csv", "html"):
        assert (tmp_path / f"leaderboard.{ {'markdown': 'md'}.get(kind, kind)}").is_file()
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert any(p.startswith("robust_vs_sparsity") for p in pngs)
    assert any(p.startswith("security_curves") for p in pngs)
    assert any(p.startswith("speedup_vs_sparsity") for p in pngs)
    assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


# ----------------------------------------------------------------------------------- checkpoints
def _tiny_pruned(sparsity=0.8):
    torch.manual_seed(0)
    m = get_model("small_cnn", num_classes=10, in_channels=1, width=8).eval()
    return apb_sparse.apply_masks(m, apb_sparse.magnitude_masks(m, sparsity))


def test_checkpoint_round_trip_stores_only_nonzeros(tmp_path):
    masked = _tiny_pruned(0.9)
    sparse = apb_sparse.sparsify(masked, layout="unstructured")
    path = save_checkpoint(sparse, tmp_path / "m.safetensors", arch="small_cnn", num_classes=10, in_channels=1,
                           model_kwargs={"width": 8}, extra={"dataset": "digits"})
    assert json.loads((tmp_path / "m.json").read_text())["paths"]["features.3"] == "unstructured"
    model, cfg = load_checkpoint(path)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-4, atol=1e-5)
    assert cfg["extra"]["dataset"] == "digits"
    assert path.stat().st_size < 0.35 * state_dict_bytes(masked.state_dict())


def test_plain_state_dict_loading_is_strict_and_never_unpickles(tmp_path):
    masked = _tiny_pruned()
    sd = masked.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pt")
    loaded = read_state_dict(tmp_path / "wrapped.pt")
    assert set(loaded) == set(sd)
    model = load_dense_model(tmp_path / "wrapped.pt", "small_cnn", model_kwargs={"width": 8})
    assert apb_sparse.sparsity_report(model).sparsity == pytest.approx(0.8, abs=0.01)

    broken = dict(sd)
    del broken["features.3.weight"]
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="features.3.weight"):
        load_dense_model(tmp_path / "missing.pt", "small_cnn", model_kwargs={"width": 8})

    torch.save(masked, tmp_path / "pickled_module.pt")  # a whole pickled nn.Module
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(tmp_path / "pickled_module.pt")


# ----------------------------------------------------------------------------------- presets
def test_presets_describe_their_attack_and_identity():
    assert "custom AutoAttack subset" in get_preset("quick").describe_attack()
    paper = get_preset("paper")
    assert paper.attack == "standard" and paper.eps == pytest.approx(8 / 255) and paper.aa_samples == 10000
    assert paper.sparsities == {"unstructured": (0.9, 0.95, 0.99), "filter": (0.5, 0.75, 0.9)}
    q = get_preset("quick")
    assert q.with_overrides(methods=("hydra",)).identity_hash() == q.identity_hash()
    assert q.with_overrides(eps=0.2).identity_hash() != q.identity_hash()
    with pytest.raises(ValueError, match="preset"):
        get_preset("nope")


# ----------------------------------------------------------------------------------- a real tiny run
TINY = Preset(name="tiny", description="test", datasets=("digits",), archs=("small_cnn",),
              model_kwargs={"width": 4}, sparsities={"unstructured": (0.9,)}, base_epochs=1, prune_epochs=0,
              finetune_epochs=1, recipe=dict(mode="pgd", steps=1, batch_size=64, lr=0.05, finetune_lr=0.02),
              train_subset=128, eps=0.1, attack="quick", aa_samples=16, aa_iters=3, aa_targets=1, fmn_samples=8,
              fmn_steps=5, curve_max=0.3, check_samples=8, square_queries=5, latency_batch=4, latency_rounds=1,
              eval_batch=64, device="cpu")


def test_run_resumes_skipping_finished_cells_and_rerunning_torn_ones(tmp_path):
    from apb_sparse.bench.runner import run_benchmark

    out = tmp_path / "run"
    out.mkdir()
    store = ResultsStore(out / "results.jsonl")
    fake = _record("lwm_local", 0.9, aa=0.123)
    store.append(fake)                                      # finished before the "interruption"
    with open(store.path, "ab") as f:                       # torn line of the random cell
        f.write(json.dumps(_record("random", 0.9))[:40].encode())
    kw = dict(methods=["lwm_local", "random"], structures=["unstructured"], sparsities=TINY.sparsities,
              seeds=[0], archs=["small_cnn"], datasets=["digits"], progress=False, latency=True, plots=False,
              log=lambda s: None)
    s1 = run_benchmark(TINY, out, **kw)
    assert {k[0] for k in s1.ran} == {"dense", "dense_base", "random"}, s1.failed
    assert [k[0] for k in s1.skipped] == ["lwm_local"]
    assert not s1.failed
    recs = {r["method"]: r for r in read_records(out / "results.jsonl")}
    assert recs["lwm_local"]["robust_accuracy"] == 0.123    # untouched
    r = recs["random"]
    assert r["measured_sparsity"] > 0.85 and 0 <= r["robust_accuracy"] <= r["clean_accuracy"] <= 1
    assert r["latency"]["cpu"]["outputs_match"] and r["size_bytes"]["sparse"] < r["size_bytes"]["dense"]
    assert r["min_norm"]["checks"] and "environment" in r and r["config"]["preset"]["name"] == "tiny"
    model, _ = load_checkpoint(out / r["checkpoint"])
    assert apb_sparse.sparsity_report(model).sparsity == pytest.approx(r["measured_sparsity"])
    assert r["latency"]["cpu"]["batch1"]["speedup"] > 0 and r["latency"]["cpu"]["batch1"]["sparse_ms"] > 0
    # Budgets: one epoch of 128 digits at batch 64 is 2 SGD steps; every model gets 2 epochs
    # (pipeline A: the shared 1-epoch base + 1 finetuning epoch), the dense base only its own.
    base = recs["dense_base"]
    assert "dense base" in base["role"] and base["budget"]["epochs"] == 1 and base["budget"]["steps"] == 2
    assert r["budget"]["epochs"] == recs["dense"]["budget"]["epochs"] == 2
    assert r["budget"]["steps"] == recs["dense"]["budget"]["steps"] == 4
    assert [p["phase"] for p in r["budget"]["phases"] if p["steps"]] == ["dense base (shared)", "finetune"]
    mn = r["min_norm"]
    assert 0.0 <= mn["clean_error_share"] <= 1.0 and "median_distance_all" in mn
    base_files = list((out / "base").glob("*.safetensors"))
    assert len(base_files) == 1
    mtime = base_files[0].stat().st_mtime_ns
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (out / "leaderboard.md", out / "leaderboard.html", base_files[0], out / r["checkpoint"]):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # readable by others under umask 022

    s2 = run_benchmark(TINY, out, **kw)                      # nothing left: all skipped, base reused
    assert s2.ran == [] and len(s2.skipped) == 4
    assert base_files[0].stat().st_mtime_ns == mtime
    assert "| random |" in (out / "leaderboard.md").read_text()

    with pytest.raises(ValueError, match="another configuration"):
        run_benchmark(TINY.with_overrides(eps=0.2), out, **kw)


# ----------------------------------------------------------------------------------- grid, seeds, spread
def test_plan_cells_deduplicates_repeated_sparsities_and_seeds_keeping_order():
    from apb_sparse.bench.runner import plan_cells

    cells = plan_cells(TINY, methods=["random", "hydra"], structures=["unstructured", "unstructured"],
                       sparsities={"unstructured": [0.9, 0.5, 0.9, 0.5000000001]}, seeds=[1, 0, 1],
                       archs=["small_cnn"], datasets=["digits"])
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys)) == 2 * (2 + 2 * 2)  # dense, dense_base (pipeline-A methods), cells
    assert [c.seed for c in cells if c.method == "dense"] == [1, 0]
    assert [c.seed for c in cells if c.method == "dense_base"] == [1, 0]
    assert [(c.method, c.sparsity) for c in cells if c.seed == 1][2:] == \
        [("random", 0.9), ("hydra", 0.9), ("random", 0.5), ("hydra", 0.5)]


def test_leaderboard_mean_std_over_seeds_kendall_tau_and_spread():
    recs = []
    for seed, aas in ((0, {"hydra": 0.5, "rst": 0.4, "harp": 0.3}), (1, {"hydra": 0.5, "rst": 0.3, "harp": 0.4})):
        recs.append(_record("dense", 0.0, structure="none", seed=seed))
        recs[-1]["role"] = "dense reference, trained with every method's total epoch budget"
        recs[-1]["latency"]["cpu"].update(speedup=1.0, phase="exclusive", threads=1)
        for m, aa in aas.items():
            r = _record(m, 0.9, aa=aa, seed=seed)
            r["latency"]["cpu"].update(speedup_q25=1.8, speedup_q75=2.2 + seed, phase="exclusive", threads=1)
            recs.append(r)
    md = to_markdown(recs)
    assert "How to read this" in md and "custom AutoAttack subset" in md
    assert "one exclusive phase" in md and "dense reference" in md
    # 3 methods: (hydra, rst) and (hydra, harp) agree, (rst, harp) swap: tau = (2 - 1) / 3
    assert "Kendall tau +0.33 over 3 methods" in md
    long = _table_after(md, "### All columns")
    table = [l for l in long if l.startswith("| rst ")][0].split("|")
    assert table[3].strip() == "2" and table[7].strip() == "35.0 ± 7.1" and table[6].strip() == "90.0 ± 0.0"
    assert table[13].strip() == "1.80-3.20"  # widest IQR over the seeds
    hydra = [l for l in long if l.startswith("| hydra ")][0].split("|")
    assert hydra[7].strip() == "50.0 ± 0.0"
    rows = list(csv.DictReader(io.StringIO(to_csv(recs))))
    assert len(rows) == 8
    r = next(r for r in rows if r["method"] == "rst" and r["seed"] == "1")
    assert float(r["cpu_speedup_q75"]) == pytest.approx(3.2) and r["latency_phase"] == "exclusive"
    html_text = to_html(recs)
    assert "How to read this" in html_text and "Kendall tau" in html_text


def test_interleaved_medians_clock_cpu_time_ignores_time_not_spent_computing():
    import time as _time

    from apb_sparse.bench import interleaved_medians

    fns = {"sleep": lambda: _time.sleep(0.01)}
    wall = interleaved_medians(fns, rounds=3, warmup=0)
    cpu = interleaved_medians(fns, rounds=3, warmup=0, clock=_time.process_time)
    assert wall["sleep"]["median_s"] >= 0.009
    assert cpu["sleep"]["median_s"] < 0.005  # the process was descheduled, not working


def test_latency_script_lanes_ab_smoke(tmp_path):
    """benchmarks/latency.py end to end on a tiny budget: the outputs-agree check runs for every
    variant (it raises on a mismatch) and --lanes-ab adds the lanes-off variant to the JSON and the
    table (batch 8 puts ResNet-18's 4x4 maps on the images-in-lanes layout)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"
    spec = importlib.util.spec_from_file_location("apb_latency_script", path)
    latency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(latency)
    out = tmp_path / "lat.json"
    threads = torch.get_num_threads()
    try:  # the script sets the thread count and flush-denormal mode for its process
        assert latency.main(["--archs", "resnet18", "--batches", "8", "--masks", "us@0.95", "--rounds", "1",
                             "--min-time", "0", "--no-stock", "--lanes-ab", "--script-ab", "--threads", "1",
                             "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert set(row["median_ms"]) >= {"dense", "dense_deployed", "ours", "ours_no_lanes", "ours_no_script"}
    assert "deploy(dense, x, layout='dense')" in row["baseline"]  # the speedup's baseline is named
    assert row["median_ms"]["ours_no_lanes"] > 0 and row["speedup"]["ours_no_lanes"] > 0
    assert data["environment"]["apb_sparse_kernel"] in ("avx512", "avx2+fma", "portable")
    assert "apb_sparse, lanes off" in latency.markdown_table(data)


# ----------------------------------------------------------------------------------- issue 24: the APB view
def _issue24_records():
    recs = []
    for seed in (0, 1):
        dense = _record("dense", 0.0, aa=0.80, clean=0.99, structure="none", seed=seed, speedup=1.0)
        dense["role"] = "dense reference, trained with every method's total epoch budget"
        dense["budget"] = {"epochs": 14, "steps": 168, "lr_sum": 4.225,
                           "phases": [{"phase": "dense training", "epochs": 14, "steps": 168, "lr": 0.05, "lr_sum": 4.225}]}
        base = _record("dense_base", 0.0, aa=0.75, clean=0.97, structure="none", seed=seed, speedup=1.0)
        base["role"] = "dense base of the pipeline-A methods (the model they prune)"
        recs += [dense, base]
        for m, aas in (("hydra", (0.70, 0.60)), ("flyingbird", (0.72, 0.70)), ("mad", (0.09, 0.08))):
            for s, aa in zip((0.9, 0.95), aas):
                r = _record(m, s, aa=aa + 0.01 * seed, clean=0.95, seed=seed, speedup=2.0 if s == 0.9 else 3.0)
                r["tags"] = dict(r["tags"], training=["AT(TRADES)", "AT(TRADES)"] if m == "hydra" else ["AT(PGD)", "AT(PGD)"],
                                 caveat="needs the authors' long finetuning" if m == "mad" else "")
                r["config"]["preset"]["recipe"] = {"mode": "pgd"}
                r["dense_macs"], r["sparse_macs"] = 1000, int(1000 * (1 - s))
                r["latency"]["cpu"]["batch1"] = {"speedup": 1.5, "sparse_ms": 0.1, "dense_ms": 0.15}
                r["budget"] = {"epochs": 14, "steps": 168, "lr_sum": 4.25,
                               "phases": [{"phase": "dense base (shared)", "epochs": 8, "steps": 96, "lr": 0.05},
                                          {"phase": "finetune", "epochs": 6, "steps": 72, "lr": 0.05}]}
                recs.append(r)
    return recs


def test_leaderboard_pivot_budgets_flags_and_speed_columns():
    from apb_sparse.bench.leaderboard import pivot_rows

    md = to_markdown(_issue24_records())
    pivot = _table_after(md, "### Clean / AA % by sparsity")
    assert pivot[0].split("|")[3:5] == [" 90 % ", " 95 % "]
    names = [l.split("|")[1].strip() for l in pivot[2:]]
    assert names == ["dense", "dense_base", "flyingbird", "hydra", "mad"]  # references, then by mean AA
    fb = pivot[4].split("|")
    assert fb[3].strip() == "**95.0 / 72.5**" and fb[4].strip() == "**95.0 / 70.5**"  # best of both columns
    hydra = pivot[5].split("|")
    assert hydra[3].strip() == "95.0 / 70.5" and hydra[4].strip() == "95.0 / 60.5"  # seed means, not bold
    assert "needs-long-finetune" in pivot[6] and "needs-long-finetune" not in pivot[5]
    # under the pivot: best and median method against the dense reference (80.0 AA)
    assert ("- 90 %: best **flyingbird** 95.0 / 72.5 (-7.5 vs dense); median of 3 methods 95.0 / 70.5 "
            "(-9.5 vs dense); dense reference 99.0 / 80.0") in md
    # the taxonomy says what ran (the recipe's PGD), not HYDRA's TRADES
    assert "A AT(PGD)/AT(PGD) 1S US L LWM" in pivot[5] and "TRADES" not in md.split("## Method notes")[0]
    budget = _table_after(md, "### Optimisation budget")
    assert any(l.startswith("| dense |") and "| 168 | 4.22 |" in l for l in budget)
    assert any(l.startswith("| hydra |") and "dense base (shared) 8 ep (96 steps, lr 0.05)" in l and "| 168 |" in l
               for l in budget)
    long = _table_after(md, "### All columns")
    header = [h.strip() for h in long[0].split("|")]
    for col in ("kept MACs %", "ideal speedup", "CPU speedup (batch 64)", "CPU speedup (batch 1)", "clean errors %"):
        assert col in header
    row = next(l for l in long if l.startswith("| hydra ") and "| 95.0 |" in l).split("|")
    assert row[header.index("kept MACs %")].strip() == "5.0" and row[header.index("ideal speedup")].strip() == "20.00x"
    assert row[header.index("CPU speedup (batch 1)")].strip() == "1.50x"
    sps, prows, summary = pivot_rows(aggregate_rows_for(_issue24_records()))
    assert summary[0.95]["best_method"] == "flyingbird" and summary[0.95]["median_aa"] == pytest.approx(0.605)


def aggregate_rows_for(records):
    from apb_sparse.bench.leaderboard import aggregate_rows

    return [r for r in aggregate_rows(leaderboard_rows(records)) if r["structure"] == "unstructured"]


def test_leaderboard_html_is_self_contained_sortable_and_has_the_pareto_plot(tmp_path):
    recs = _issue24_records()
    write_leaderboard(recs, tmp_path)
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert any(p.startswith("pareto_") for p in pngs) and any(p.startswith("speedup_vs_sparsity") for p in pngs)
    page = (tmp_path / "leaderboard.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(pngs)  # plots embedded, the page travels alone
    assert "class='sortable'" in page and "class='filter'" in page and "<script>" in page
    assert "max-width:1400px" in page
    assert "td class=' best'" in page  # best AA per column marked in the pivot


# ----------------------------------------------------------------------------------- issue 24: equal budgets
def _budget_recipe(**kw):
    from apb_sparse.methods import Recipe

    # The quick preset's shape (digits at batch 128: 12 SGD steps per epoch); natural training keeps
    # the tests fast, the step counts do not depend on the loss.
    base = dict(arch="small_cnn", dataset="digits", mode="natural", eps=0.1, steps=1, pretrain_epochs=8,
                prune_epochs=1, finetune_epochs=5, batch_size=128, lr=0.05, finetune_lr=0.05, seed=0)
    base.update(kw)
    return Recipe(**base)


def test_admm_methods_take_their_lengthened_phase_out_of_the_retraining():
    from apb_sparse import methods
    from apb_sparse.bench.runner import training_budget

    data = apb_sparse.data.get_dataset("digits")
    model = get_model("small_cnn", num_classes=10, in_channels=1, width=4)
    res = methods.RADMM().prune(model, data, sparsity=0.8, recipe=_budget_recipe(), pretrained=True)
    phases = [(p["phase"], p["epochs"]) for p in res.log["phases"] if p["epochs"]]
    assert phases == [("prune (ADMM)", 5), ("finetune", 1)]  # 1 + 5 epochs of the recipe, not 5 + 5
    assert res.log["admm_borrowed_epochs"] == 4 and res.log["finetune_epochs_after_admm"] == 1
    budget = training_budget(res.log["phases"])
    assert budget["epochs"] == 6 and budget["steps"] == 72


def test_li20_search_is_a_sixth_of_the_total_budget():
    from apb_sparse import methods

    li = methods.Li20()
    assert [li.search_epochs(_budget_recipe(finetune_epochs=f)) for f in (5, 8)] == [2, 3]  # 14 and 17 epochs
    assert li.search_epochs(_budget_recipe(pretrain_epochs=0, finetune_epochs=0)) == 1  # never below prune_epochs
    with pytest.raises(ValueError, match="search_share"):
        methods.Li20(search_share=1.0)
    data = apb_sparse.data.get_dataset("digits")
    res = li.prune(get_model("small_cnn", num_classes=10, in_channels=1, width=4), data, sparsity=0.9,
                   recipe=_budget_recipe(pretrain_epochs=2, finetune_epochs=2), pretrained=False)
    phases = [(p["phase"], p["epochs"], p["steps"]) for p in res.log["phases"] if p["epochs"]]
    assert phases == [("ticket search", 1, 12), ("train ticket", 4, 48)]  # total 5 = the recipe's


def test_lr_sum_follows_the_cosine_schedule():
    from apb_sparse.bench.runner import lr_sum

    assert lr_sum(0.05, 168, "cosine") == pytest.approx(0.05 * 169 / 2)  # sum of (1 + cos) / 2 over a half period
    assert lr_sum(0.1, 10, "none") == pytest.approx(1.0) and lr_sum(0.1, 0, "cosine") == 0.0


def test_an_early_stopped_search_counts_its_steps_in_the_budget():
    from apb_sparse import methods
    from apb_sparse.bench.runner import lr_sum, training_budget

    data = apb_sparse.data.get_dataset("digits")
    # tol 1.0: every mask distance passes, so the early-bird test stops at its first full window
    rb = methods.RobustBird(tol=1.0, window=2, min_draws=12)
    res = rb.prune(get_model("small_cnn", num_classes=10, in_channels=1, width=4), data, sparsity=0.9,
                   recipe=_budget_recipe(pretrain_epochs=1, prune_epochs=1, finetune_epochs=1), pretrained=False)
    assert res.log["early_bird_step"] is not None and res.log["search_steps_used"] < 12
    search = res.log["phases"][0]
    assert search["phase"] == "ticket search" and search["steps"] == res.log["search_steps_used"] > 0
    budget = training_budget(res.log["phases"])
    assert budget["steps"] == search["steps"] + res.log["phases"][1]["steps"]
    # the first steps of the planned cosine, not a whole cosine squeezed into them
    assert lr_sum(0.05, 3, "cosine", 12) > lr_sum(0.05, 3, "cosine")


def test_preset_model_kwargs_apply_to_its_own_architectures_only():
    """The quick preset's width=16 is small_cnn's: another --arch (timm:, resnet18) is built with
    its own defaults, and its checkpoint config says so."""
    from apb_sparse.bench.presets import get_preset
    from apb_sparse.bench.prepare import build_model, load_data

    quick = get_preset("quick")
    assert quick.model_kwargs_for("small_cnn") == {"width": 16}
    other = quick.with_overrides(archs=("resnet18",))
    assert other.model_kwargs_for("resnet18") == {} and other.model_kwargs_for("small_cnn") == {"width": 16}
    data = load_data("digits", quick)
    model = build_model(other, "resnet18", data, seed=0)  # raised "unexpected keyword 'width'" before
    assert model(torch.rand(2, *data.input_shape)).shape == (2, 10)
