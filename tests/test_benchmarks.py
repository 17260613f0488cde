"""The benchmark harness, suite and report, on tiny synthetic benches written to a temporary package.

Timings use time.sleep (ours 1 ms, peers 10 ms and 30 ms) so ratios are predictable on a loaded
machine; memory uses a known 200 MiB temporary. Each child process (a bench, a memory probe)
imports torch (~2 s), so the suite test runs only three small benches and four memory probes.
"""
from __future__ import annotations

import json
import pathlib
import textwrap

import pytest

from benchmarks import limits
from benchmarks import report as report_mod
from benchmarks.__main__ import main
from benchmarks.harness import Case, case_size, parse_size
from benchmarks.suite import merge

PKG = "rlhf_fast_bench_selftest"

OK_BENCH = '''
import time
import torch
from benchmarks.harness import Case

def _sleeper(ms):
    def fn(inputs):
        time.sleep(ms / 1e3)
        return inputs["x"] * 2
    return fn

def _alloc200(inputs):
    tmp = torch.ones(200 * 2**20 // 4)  # 200 MiB, touched
    return inputs["x"].sum() + tmp[0]

def _noalloc(inputs):
    return inputs["x"].sum()

def _inputs_after_a_transient_peak():
    torch.ones(300 * 2**20 // 4).sum()  # a higher peak before the call must not hide the call's own
    return {"x": torch.zeros(16)}

def cases(quick, device):
    out = [Case(f"B1xT{n}", lambda n=n: {"x": torch.zeros(1, n)},
                {"rlhf_fast": _sleeper(1), "peer-slow": _sleeper(10), "peer-slower": _sleeper(30)},
                bytes_moved=8 * n, min_reps=3, budget_s=0.05, memory=False) for n in (1024, 4096)]
    out.append(Case("alloc", _inputs_after_a_transient_peak, {"rlhf_fast": _noalloc, "peer-alloc": _alloc200},
                    min_reps=2, budget_s=0.0))
    out.append(Case("whole", lambda: {"x": torch.ones(300 * 2**20 // 4)}, {"rlhf_fast": _noalloc,
                    "peer-alloc": _alloc200}, min_reps=2, budget_s=0.0, memory_scope="process"))
    return out
'''

CRASH_BENCH = '''
import os
import torch
from benchmarks.harness import Case

def _crash(inputs):
    os._exit(3)  # a segfault-like death, no Python exception

def _raise(inputs):
    raise ValueError("impl broken on purpose")

def cases(quick, device):
    return [Case("B1xT8", lambda: {"x": torch.zeros(1, 8)}, {"rlhf_fast": lambda i: i["x"] + 1, "peer": _raise},
                 min_reps=2, budget_s=0.0, memory=False),
            Case("B1xT16", lambda: {"x": torch.zeros(1, 16)}, {"rlhf_fast": _crash}, memory=False)]
'''


@pytest.fixture(scope="module")
def bench_pkg(tmp_path_factory):
    """A package with an ok bench, a bench that fails to import and one that kills its process."""
    root = tmp_path_factory.mktemp("benchpkg")
    pkg = root / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ok.py").write_text(textwrap.dedent(OK_BENCH))
    (pkg / "bad.py").write_text("raise ImportError('broken on purpose')\n")
    (pkg / "crash.py").write_text(textwrap.dedent(CRASH_BENCH))
    return root


@pytest.fixture
def on_path(bench_pkg, monkeypatch):
    monkeypatch.syspath_prepend(str(bench_pkg))
    monkeypatch.setenv("PYTHONPATH", str(bench_pkg))
    return bench_pkg


@pytest.mark.parametrize("name, size, label, family", [
    ("B64xT1024", 65536, "B·T", "*"),
    ("N8192xV32000-bf16", 8192 * 32000, "N·V", "*-bf16"),
    ("k3-B2xT3", 6, "B·T", "k3-*"),
    ("V32k", 32000, "V", "*"),
    ("N1kxHd64", 64000, "N·Hd", "*"),
    ("bf16-fp32", None, "", "bf16-fp32"),      # lower-case tokens are not dimensions
    ("xB64T", None, "", "xB64T"),
])
def test_parse_size(name, size, label, family):
    assert parse_size(name) == (size, label, family)


def test_explicit_size_wins_over_name():
    case = Case("B2xT3", dict, {}, size=1e6, size_label="tokens")
    assert case_size(case) == (1e6, "tokens", "*")


def test_annotate_takes_the_larger_bound():
    lim = {"copy_GBps": 10.0, "matmul_GFLOPs": 100.0}
    rows = [{"bytes_moved": 10e6, "median_ms": 2.0},                      # 1 ms memory bound
            {"bytes_moved": 10e6, "flops": 1e9, "median_ms": 20.0},       # 10 ms compute bound
            {"median_ms": 1.0}]
    limits.annotate(rows, lim)
    assert rows[0]["limit_ms"] == pytest.approx(1.0) and rows[0]["limit_kind"] == "memory"
    assert rows[0]["roofline_pct"] == pytest.approx(50.0)
    assert rows[1]["limit_ms"] == pytest.approx(10.0) and rows[1]["limit_kind"] == "compute"
    assert "limit_ms" not in rows[2]


def test_merge_replaces_only_rerun_benches():
    old = {"benches": {"a": {"status": "ok"}, "b": {"status": "failed"}}, "missing": ["c", "d"],
           "rows": [{"bench": "a", "v": 1}, {"bench": "b", "v": 1}]}
    new = {"meta": {}, "limits": {}, "benches": {"b": {"status": "ok"}, "c": {"status": "ok"}}, "missing": [],
           "rows": [{"bench": "b", "v": 2}, {"bench": "c", "v": 2}]}
    out = merge(old, new)
    assert out["benches"] == {"a": {"status": "ok"}, "b": {"status": "ok"}, "c": {"status": "ok"}}
    assert out["rows"] == [{"bench": "a", "v": 1}, {"bench": "b", "v": 2}, {"bench": "c", "v": 2}]
    assert out["missing"] == ["d"]


def test_all_survives_failing_benches_and_reports(on_path, tmp_path):
    res_dir, md = tmp_path / "results", tmp_path / "RESULTS.md"
    rc = main(["all", "--quick", "--only", f"{PKG}.ok,{PKG}.bad,{PKG}.crash,{PKG}.absent",
               "--results-dir", str(res_dir), "--md", str(md), "--report"])
    assert rc == 1
    (path,) = res_dir.glob("cpu-*.json")
    data = json.loads(path.read_text())
    assert {"machine", "cpu_model", "cores", "torch", "triton", "date", "command", "git_commit"} <= set(data["meta"])
    assert data["limits"]["copy_GBps"] > 0.1 and data["limits"]["matmul_GFLOPs"] > 0.1
    assert data["benches"][f"{PKG}.ok"]["status"] == "ok"
    assert data["benches"][f"{PKG}.bad"]["status"] == "failed"
    assert "broken on purpose" in data["benches"][f"{PKG}.bad"]["error"]
    assert data["benches"][f"{PKG}.crash"]["status"] == "partial"              # rows before the crash
    assert data["missing"] == [f"{PKG}.absent"]

    rows = {(r["bench"], r["case"], r["impl"]): r for r in data["rows"]}
    for r in rows.values():
        assert {"bench", "case", "impl", "device", "median_ms", "peak_mb"} <= set(r)
    assert rows[(f"{PKG}.crash", "B1xT8", "rlhf_fast")]["median_ms"] > 0      # cases before the crash are kept
    failed_impl = rows[(f"{PKG}.crash", "B1xT8", "peer")]                       # an impl that raises is one row
    assert failed_impl["median_ms"] is None and "impl broken on purpose" in failed_impl["error"]
    ours, slow = rows[(f"{PKG}.ok", "B1xT4096", "rlhf_fast")], rows[(f"{PKG}.ok", "B1xT4096", "peer-slow")]
    assert 5 < slow["median_ms"] / ours["median_ms"] < 15
    assert ours["size"] == 4096 and ours["limit_kind"] == "memory" and ours["roofline_pct"] > 0
    # memprobe: a 200 MiB temporary is seen as such, an impl that allocates nothing as ~0
    assert rows[(f"{PKG}.ok", "alloc", "peer-alloc")]["peak_mb"] == pytest.approx(200, rel=0.2)
    assert rows[(f"{PKG}.ok", "alloc", "rlhf_fast")]["peak_mb"] < 5
    assert rows[(f"{PKG}.ok", "B1xT1024", "rlhf_fast")]["peak_mb"] is None   # memory=False
    # memory_scope="process": the whole process's peak, inputs (300 MiB) included, plus what the call adds
    whole, whole_alloc = rows[(f"{PKG}.ok", "whole", "rlhf_fast")], rows[(f"{PKG}.ok", "whole", "peer-alloc")]
    assert whole["peak_scope"] == "process" and "peak_scope" not in rows[(f"{PKG}.ok", "alloc", "rlhf_fast")]
    assert whole["peak_mb"] > 300 and whole_alloc["peak_mb"] - whole["peak_mb"] == pytest.approx(200, rel=0.2)

    text = md.read_text()
    assert "## CPU" in text and "## Headline" in text and "% of roofline" in text
    assert "vs peer-slow" in text                                  # ours' row names the fastest peer
    assert f"| whole | **rlhf_fast** |" in text and " (process) |" in text
    assert f"{PKG}.bad, failed" in text and f"{PKG}.crash, partial" in text
    png = res_dir / f"cpu-{PKG}.ok.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(case, impl, ms, **kw):
    return {"bench": "gae", "case": case, "impl": impl, "device": kw.pop("device", "cpu"), "median_ms": ms,
            "p20_ms": ms * 0.95, "p80_ms": ms * 1.05, "reps": 5, "peak_mb": kw.pop("peak_mb", 1.0), **kw}


def _results(device, date, rows, bench="gae", command=None):
    meta = {"device": device, "date": date, "command": command or f"python -m benchmarks all --device {device}",
            "cpu_model": "Test CPU", "cores": 2, "gpu": "Test GPU" if device == "cuda" else None,
            "git_commit": "0" * 40, "torch": "2.13.0"}
    lim = {"copy_GBps": 10.0, "copy_MiB": 256, "matmul_GFLOPs": 50.0, "matmul_n": 2048, "matmul_dtype": "float32"}
    for r in rows:
        r["bytes_moved"] = 5_000_000
    limits.annotate(rows, lim)
    rec = {"status": "ok", "command": meta["command"], "date": date}
    return {"meta": meta, "limits": lim, "benches": {bench: rec}, "missing": [], "rows": rows}


def test_report_keeps_benches_a_later_file_did_not_rerun(tmp_path):
    """A bench rerun on a later day replaces its own rows only; the section names both files and commands."""
    res_dir = tmp_path / "results"
    res_dir.mkdir()
    gae = [_row("B64xT1024", "rlhf_fast", 1.0), _row("B64xT1024", "verl-loop", 10.0)]
    kl = [_row("B64xT1024-k3", "rlhf_fast", 1.0, bench="kl"), _row("B64xT1024-k3", "verl-eager", 3.0, bench="kl")]
    (res_dir / "cpu-2024-01-01.json").write_text(json.dumps(_results("cpu", "2024-01-01T00:00:00", gae)))
    later = _results("cpu", "2024-01-02T00:00:00", kl, bench="kl", command="python -m benchmarks all --only kl")
    (res_dir / "cpu-2024-01-02.json").write_text(json.dumps(later))
    md = tmp_path / "RESULTS.md"
    heads = report_mod.write_report(res_dir, md)
    assert any(h.startswith("gae B64xT1024 (cpu): **10× faster**") for h in heads)
    assert any(h.startswith("kl B64xT1024-k3 (cpu): **3.0× faster**") for h in heads)
    text = md.read_text()
    assert "Results files: `results/cpu-2024-01-01.json`, `results/cpu-2024-01-02.json`" in text
    assert "- gae: rows from `python -m benchmarks all --device cpu` (2024-01-01)" in text
    assert "## Earlier results files" not in text


def test_readme_quotes_the_committed_results():
    """The README's headline block is exactly what the committed results files give (no stale or hand-made
    ratio); `python -m benchmarks report` rewrites it."""
    root = pathlib.Path(__file__).resolve().parents[1]
    results = report_mod.load_results(root / "benchmarks" / "results")
    heads = report_mod.headlines(report_mod.latest_per_device(results))
    assert heads, "no committed benchmark results"
    assert report_mod.headline_block(heads) in (root / "README.md").read_text()


def test_report_from_results_files_without_rerun(tmp_path, capsys):
    res_dir = tmp_path / "results"
    res_dir.mkdir()
    cpu_rows = [_row("B8xT128", "rlhf_fast", 0.5), _row("B8xT128", "verl-loop", 2.0),
                _row("B64xT1024", "rlhf_fast", 1.0, peak_mb=2.0), _row("B64xT1024", "verl-loop", 10.0, peak_mb=8.0),
                _row("B64xT1024", "openrlhf-loop", 40.0)]
    cuda_rows = [_row("B64xT1024", "rlhf_fast", 0.01, device="cuda"), _row("B64xT1024", "verl-loop", 5.0, device="cuda")]
    (res_dir / "cpu-2024-01-01.json").write_text(json.dumps(_results("cpu", "2024-01-01T00:00:00", cpu_rows[:2])))
    (res_dir / "cpu-2024-02-01.json").write_text(json.dumps(_results("cpu", "2024-02-01T00:00:00", cpu_rows)))
    (res_dir / "cuda-2024-02-02.json").write_text(json.dumps(_results("cuda", "2024-02-02T00:00:00", cuda_rows)))
    md, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report_mod.README_BEGIN}\n- stale\n{report_mod.README_END}\n\nrest\n")
    assert main(["report", "--results-dir", str(res_dir), "--md", str(md), "--readme", str(readme)]) == 0
    block = readme.read_text().split(report_mod.README_BEGIN)[1].split(report_mod.README_END)[0]
    assert "stale" not in block and "gae B64xT1024 (cpu): **10× faster**" in block
    assert readme.read_text().endswith("\n\nrest\n")

    text = md.read_text()
    assert text.index("## CPU — 2024-02-01") < text.index("## CUDA — 2024-02-02")
    assert "cpu-2024-01-01.json" in text.split("## Earlier results files")[1]
    # the headline compares against the fastest peer (10x), at the largest size, with the range over cases
    head = text.split("## Headline")[1].split("##")[0]
    assert "gae B64xT1024 (cpu): **10× faster** than the fastest peer, verl-loop" in head
    assert "4.0× less" in head and "4.0×–10× over 2 cases" in head
    assert "1.0 MB vs 1.0 MB (about the same)" in head
    assert "gae B64xT1024 (cuda): **500× faster**" in head
    # table: ours' row shows the speed-up over the best peer, each peer's row ours' speed-up over it
    assert "| B64xT1024 | **rlhf_fast** | 1.00 | 0.950–1.05 | 2.0 | **10×** vs verl-loop |" in text
    assert "| B64xT1024 | openrlhf-loop | 40.00 | 38.00–42.00 | 1.0 | 40× |" in text
    assert "| 0.500 (memory) | 50% |" in text                       # 5 MB at 10 GB/s = 0.5 ms, ours 1 ms
    assert "10× faster than the fastest peer" in capsys.readouterr().out
    for device in ("cpu", "cuda"):
        assert (res_dir / f"{device}-gae.png").stat().st_size > 5000
