"""RESULTS.md and PNG charts from the results files, and the headline ratios quoted in the README.

``python -m benchmarks report`` regenerates both from ``benchmarks/results/*.json`` without rerunning.
Per device, one section (machine, date, exact commands, measured limits) with one table and one chart per
bench, each bench from the newest results file that ran it (a bench rerun on a later day replaces only its own
rows); files no bench comes from any more are listed. Definitions used throughout::

    speed-up of ours over X = median_ms(X) / median_ms(ours)          (> 1: ours is faster)
    best peer               = the peer with the smallest median_ms in that case
    % of roofline           = 100 * limit_ms / median_ms              (see benchmarks/limits.py)

The GPU step-time model (:mod:`benchmarks.gpu_model`) is placed beside the distributed bench's table.
"ours" is the ``rlhf_fast`` row of a case (else the fastest ``rlhf_fast*`` row); a peer is any other impl.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections import defaultdict

from benchmarks import gpu_model, kernels
from benchmarks.harness import is_ours, parse_size
from benchmarks.suite import merge

DEVICE_ORDER = {"cpu": 0, "cuda": 1}
NO_HEADLINE = "(no case with both ours and a peer yet)"


# ---------------------------------------------------------------- loading and ratios

def load_results(results_dir: pathlib.Path) -> list[dict]:
    out = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "rows" in data and "meta" in data:
            data["_path"] = path
            out.append(data)
    return out


def latest_per_device(results: list[dict]) -> dict[str, dict]:
    """Per device, the files folded oldest to newest with :func:`benchmarks.suite.merge`: every bench's rows
    and record come from the newest file that ran it; each record names its file in ``_path``."""
    latest: dict[str, dict] = {}
    for res in sorted(results, key=lambda r: r["meta"]["date"]):
        tagged = {**res, "benches": {b: {**rec, "_path": res["_path"]} for b, rec in res["benches"].items()}}
        latest[res["meta"]["device"]] = merge(latest.get(res["meta"]["device"]), tagged)
    return dict(sorted(latest.items(), key=lambda kv: DEVICE_ORDER.get(kv[0], 9)))


def source_files(res: dict) -> list[pathlib.Path]:
    """The results files a merged device record's benches come from."""
    return sorted({rec["_path"] for rec in res["benches"].values()})


def by_bench_case(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """``{bench: {case: [rows]}}`` in the order the rows were measured."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        out[row["bench"]][row["case"]].append(row)
    return out


def _timed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("median_ms")]


def ours_row(case_rows: list[dict]) -> dict | None:
    ours = [r for r in _timed(case_rows) if is_ours(r["impl"])]
    exact = [r for r in ours if r["impl"] == "rlhf_fast"]
    return (exact or sorted(ours, key=lambda r: r["median_ms"]) or [None])[0]


def best_peer(case_rows: list[dict]) -> dict | None:
    peers = [r for r in _timed(case_rows) if not is_ours(r["impl"])]
    return min(peers, key=lambda r: r["median_ms"], default=None)


def speedup(ours: dict, peer: dict) -> float:
    return peer["median_ms"] / ours["median_ms"]


def overlap(a: dict, b: dict) -> bool:
    """The p20-p80 spreads of two rows overlap: their ratio is within run-to-run noise."""
    return a["p20_ms"] <= b["p80_ms"] and b["p20_ms"] <= a["p80_ms"]


def size_of(row: dict) -> tuple[float | None, str, str]:
    if "family" in row:
        return row.get("size"), row.get("size_label", ""), row["family"]
    return parse_size(row["case"])


# ---------------------------------------------------------------- formatting

def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:#.3g}"


def fmt_x(x: float) -> str:
    return f"{x:,.0f}×" if x >= 10 else f"{x:#.2g}×"


def fmt_pct(p: float) -> str:
    return f"{p:.0f}%" if p >= 10 else f"{p:#.2g}%"


def fmt_mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_peak(row: dict) -> str:
    """peak_mb, marked when it is the whole process's peak RSS (end-to-end benches), not the extra memory."""
    text = fmt_mb(row.get("peak_mb"))
    return f"{text} (process)" if row.get("peak_scope") == "process" and row.get("peak_mb") is not None else text


def machine_line(meta: dict) -> str:
    parts = [meta.get("gpu"), meta.get("cpu_model"), f"{meta.get('cores')} cores",
             f"{meta['memory_gb']:.0f} GiB RAM" if meta.get("memory_gb") else None]
    return ", ".join(p for p in parts if p)


def versions_line(meta: dict) -> str:
    keys = ["python", "torch", "triton", "vllm", "transformers", "trl", "liger_kernel", "verl", "openrlhf"]
    return ", ".join(f"{k} {meta[k]}" for k in keys if meta.get(k))


def limits_line(limits: dict) -> str:
    return (f"copy bandwidth {limits['copy_GBps']:.1f} GB/s ({limits['copy_MiB']} MiB tensor copy), "
            f"matmul {limits['matmul_GFLOPs']:.0f} GFLOP/s ({limits['matmul_dtype']}, "
            f"{limits['matmul_n']}×{limits['matmul_n']})")


def bench_table(case_map: dict[str, list[dict]]) -> str:
    """Markdown table of one bench: every impl of every case, ours first, then peers fastest first."""
    lines = ["| case | impl | median ms | p20–p80 ms | peak MB | speed-up of ours | limit ms | % of roofline |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    errors = []
    for case, rows in case_map.items():
        ours, peer = ours_row(rows), best_peer(rows)
        order = sorted(rows, key=lambda r: (not is_ours(r["impl"]), r.get("median_ms") is None,
                                            r.get("median_ms") or 0))
        for r in order:
            impl = f"**{r['impl']}**" if is_ours(r["impl"]) else r["impl"]
            if not r.get("median_ms"):
                errors.append(f"{case} / {r['impl']}: {r.get('error', 'no timing')}")
                lines.append(f"| {case} | {impl} | failed | | | | | |")
                continue
            ratio = ""
            if is_ours(r["impl"]) and peer is not None:
                ratio = f"**{fmt_x(speedup(r, peer))}** vs {peer['impl']}"
            elif not is_ours(r["impl"]) and ours is not None:
                ratio = fmt_x(speedup(ours, r))
            limit = f"{fmt_ms(r['limit_ms'])} ({r['limit_kind']})" if r.get("limit_ms") else ""
            pct = fmt_pct(r["roofline_pct"]) if r.get("roofline_pct") else ""
            lines.append(f"| {case} | {impl} | {fmt_ms(r['median_ms'])} | "
                         f"{fmt_ms(r['p20_ms'])}–{fmt_ms(r['p80_ms'])} | {fmt_peak(r)} | "
                         f"{ratio} | {limit} | {pct} |")
    if errors:
        lines += ["", "Failed measurements:", *[f"- {e}" for e in errors]]
    return "\n".join(lines)


# ---------------------------------------------------------------- headline

def headline(bench: str, device: str, case_map: dict[str, list[dict]]) -> str | None:
    """One sentence per bench: ours against the fastest peer at the largest compared size, and the range."""
    compared = [(case, rows) for case, rows in case_map.items() if ours_row(rows) and best_peer(rows)]
    if not compared:
        return None
    sizes = [size_of(rows[0])[0] for _, rows in compared]
    pick = max(range(len(compared)), key=lambda i: (sizes[i] or 0, -i)) if any(sizes) else len(compared) - 1
    case, rows = compared[pick]
    ours, peer = ours_row(rows), best_peer(rows)
    x = speedup(ours, peer)
    verdict = f"**{fmt_x(x)} faster**" if x >= 1 else f"**{fmt_x(x)}** (slower)"
    text = (f"{bench} {case} ({device}): {verdict} than the fastest peer, {peer['impl']} "
            f"({fmt_ms(ours['median_ms'])} ms vs {fmt_ms(peer['median_ms'])} ms")
    text += ", within run-to-run spread)" if overlap(ours, peer) else ")"
    mo, mp = ours.get("peak_mb"), peer.get("peak_mb")
    if mo is not None and mp is not None and max(mo, mp) >= 1:
        scope = " (whole process)" if ours.get("peak_scope") == "process" else ""
        text += f"; peak memory{scope} {fmt_mb(mo)} MB vs {fmt_mb(mp)} MB"
        if min(mo, mp) >= 1:
            r = mp / mo
            text += " (about the same)" if 1 / 1.1 < r < 1.1 else f" ({fmt_x(r)} less)" if r > 1 else f" ({fmt_x(1 / r)} more)"
    if len(compared) > 1:
        xs = [speedup(ours_row(r), best_peer(r)) for _, r in compared]
        text += f"; {fmt_x(min(xs))}–{fmt_x(max(xs))} over {len(xs)} cases"
    if ours.get("roofline_pct"):
        text += f"; ours at {ours['roofline_pct']:.0f}% of the {ours['limit_kind']} roofline"
    return text + "."


def headlines(latest: dict[str, dict]) -> list[str]:
    out = []
    for device, res in latest.items():
        for bench, case_map in by_bench_case(res["rows"]).items():
            line = headline(bench, device, case_map)
            if line:
                out.append(line)
    return out


# ---------------------------------------------------------------- charts

def chart(case_map: dict[str, list[dict]], title: str, path: pathlib.Path) -> None:
    """Time and peak memory against problem size (log axes), ours and peers on one plot.

    One row of plots per case family (cases that differ only in size); cases without a size are in the
    table only, unless no case has one (then the x axis lists the cases).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for rs in case_map.values() for r in rs]
    numeric = any(size_of(r)[0] for r in rows)
    if numeric:
        rows = [r for r in rows if size_of(r)[0]]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    families = list(dict.fromkeys(size_of(r)[2] for r in rows)) if numeric else [""]
    impls = list(dict.fromkeys(r["impl"] for r in sorted(rows, key=lambda r: not is_ours(r["impl"]))))
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    label = next((size_of(r)[1] for r in rows if size_of(r)[1]), "")

    def x_of(r: dict) -> float:
        return size_of(r)[0] if numeric else cases.index(r["case"])

    fig, axes = plt.subplots(len(families), 2, figsize=(12, 4.2 * len(families)), squeeze=False, sharex="row")
    for (ax_t, ax_m), fam in zip(axes, families):
        fam_rows = [r for r in rows if not numeric or size_of(r)[2] == fam]
        for impl in impls:
            pts = sorted((r for r in fam_rows if r["impl"] == impl), key=x_of)
            kw = dict(color=colors[impl], marker="o" if is_ours(impl) else "s", label=impl,
                      linestyle="-" if is_ours(impl) else "--", linewidth=2.5 if is_ours(impl) else 1.2)
            t = [(x_of(r), r["median_ms"]) for r in pts if r.get("median_ms")]
            m = [(x_of(r), r["peak_mb"]) for r in pts if r.get("peak_mb") is not None]
            if t:
                ax_t.plot(*zip(*t), **kw)
            if m:
                ax_m.plot(*zip(*m), **kw)
        lim = {x_of(r): r["limit_ms"] for r in fam_rows if r.get("limit_ms")}
        if lim:
            xs = sorted(lim)
            ax_t.plot(xs, [lim[x] for x in xs], color="black", linestyle=":", linewidth=1, marker="_",
                      markersize=14, label="physical limit")
        ax_t.set_yscale("log")
        ax_t.set_ylabel("median time (ms)")
        ax_m.set_yscale("symlog", linthresh=1.0)
        ax_m.set_ylim(bottom=0)
        ax_m.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_m.set_ylabel("peak extra memory (MB)")
        for ax in (ax_t, ax_m):
            if numeric:
                ax.set_xscale("log")
                ax.set_xlabel(f"problem size ({label})" if label else "problem size")
            else:
                ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
        if fam not in ("", "*"):
            ax_t.set_title(fam, fontsize=9)
            ax_m.set_title(fam, fontsize=9)
        ax_t.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- RESULTS.md

def _rel(path: pathlib.Path, start: pathlib.Path) -> str:
    return pathlib.Path(os.path.relpath(path, start)).as_posix()


def device_section(device: str, res: dict, results_dir: pathlib.Path, md_dir: pathlib.Path,
                   beside: dict[str, list[str]] | None = None) -> list[str]:
    """The device's section; ``beside[bench]``: lines placed right after that bench's table."""
    meta = res["meta"]
    out = [f"## {device.upper()} — {meta['date'][:10]}", "",
           f"- Machine: {machine_line(meta)}",
           f"- Command: `{meta['command']}`",
           f"- Commit: `{(meta.get('git_commit') or 'unknown')[:12]}`" + (" (with uncommitted changes)"
                                                                         if meta.get("git_dirty") else ""),
           f"- Versions: {versions_line(meta)}",
           f"- Physical limits, measured in the same run: {limits_line(res['limits'])}",
           "- Results files: " + ", ".join(f"`{_rel(p, md_dir)}`" for p in source_files(res))]
    benches = res.get("benches", {})
    failed = {b: rec for b, rec in benches.items() if rec.get("status", "ok") != "ok"}
    if failed:
        out.append("- **Failed benches:** " + "; ".join(f"{b}, {rec['status']}: {rec['error']}"
                                                        for b, rec in failed.items()))
    if res.get("missing"):
        out.append("- Not present in this run: " + ", ".join(res["missing"]))
    for b, rec in benches.items():
        if rec.get("command") and rec["command"] != meta["command"]:
            commit = f", commit `{rec['git_commit'][:12]}`" if rec.get("git_commit") else ""
            out.append(f"- {b}: rows from `{rec['command']}` ({rec['date'][:10]}{commit})")
    out.append("")
    for bench, case_map in by_bench_case(res["rows"]).items():
        png = results_dir / f"{device}-{bench}.png"
        chart(case_map, f"{bench} ({device}, {meta['date'][:10]})", png)
        out += [f"### {bench}", "", f"![{bench} on {device}]({_rel(png, md_dir)})", "", bench_table(case_map), ""]
        out += (beside or {}).get(bench, [])
    return out


def write_report(results_dir: pathlib.Path, md_path: pathlib.Path) -> list[str]:
    """Regenerate ``md_path`` and the charts from every results file; return the headline lines."""
    results = load_results(results_dir)
    latest = latest_per_device(results)
    heads = headlines(latest)
    md_dir = md_path.parent
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks report` from the results files in "
             f"`{_rel(results_dir, md_dir)}/`; do not edit by hand. Times are medians of repeated calls "
             "after a warm-up (spread: 20th–80th percentile). Peak MB is the memory an implementation "
             "allocates beyond its inputs and returned outputs, measured in a fresh process; rows marked "
             "(process) are end-to-end iterations and give the fresh process's whole peak resident memory "
             "during one iteration instead. Speed-up of ours = peer median / ours "
             "median (> 1: ours is faster); ours' row shows it against the fastest peer. Limit ms is the "
             "roofline time: bytes moved over the measured copy bandwidth, or FLOPs over the measured "
             "matmul rate, whichever is larger; % of roofline = limit / median (above 100% the data stayed "
             "in cache, which the copy-bandwidth limit does not model).", "",
             "## Headline", ""]
    lines += [f"- {h}" for h in heads] or [f"- {NO_HEADLINE}"]
    lines.append("")
    # the GPU step-time model goes beside the first distributed table, else after the device sections
    host = next((d for d, res in latest.items() if any(r["bench"] == "distributed" for r in res["rows"])), None)
    model = gpu_model.section("###" if host else "##")
    for device, res in latest.items():
        lines += device_section(device, res, results_dir, md_dir, {"distributed": model} if device == host else None)
    if host is None:
        lines += model
    used = {p for res in latest.values() for p in source_files(res)}
    older = [r for r in results if r["_path"] not in used]
    if older:
        lines += ["## Earlier results files", ""]
        lines += [f"- `{_rel(r['_path'], md_dir)}`: {r['meta']['date']}, `{r['meta']['command']}`, "
                  f"{machine_line(r['meta'])}" for r in older]
        lines.append("")
    kernel_report = kernels.results_section(md_path.read_text()) if md_path.exists() else None
    if kernel_report:   # the static kernel report's own section (python -m benchmarks kernels --results-md)
        lines += ["", kernel_report.rstrip("\n")]
    md_path.write_text("\n".join(lines) + "\n")
    return heads


README_BEGIN = "<!-- headlines: written by `python -m benchmarks report` from benchmarks/results; do not edit -->"
README_END = "<!-- /headlines -->"


def headline_block(heads: list[str]) -> str:
    return "\n".join([README_BEGIN, *[f"- {h}" for h in heads or [NO_HEADLINE]], README_END])


def update_readme(readme: pathlib.Path, heads: list[str]) -> bool:
    """Replace the README's headline block (between README_BEGIN and README_END) with ``heads``, so the ratios
    it quotes are always those of the committed results. False when the README has no such block."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    before, rest = text.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    readme.write_text(before + headline_block(heads) + after)
    return True


def print_headlines(heads: list[str]) -> None:
    print("Headline:")
    for h in heads or [NO_HEADLINE]:
        print(f"- {h.replace('**', '')}")
