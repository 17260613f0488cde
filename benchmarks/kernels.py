"""Static resource report of every Triton kernel in ``rlhf_fast.kernels`` (and the CUDA sources in csrc/cuda/),
compiled ahead of time for sm_80 (A100) and sm_90 (H100/H200) on a machine without a GPU::

    python -m benchmarks kernels [--check] [--arch 80,90] [--json PATH] [--md PATH] [--results-md]

Each kernel is compiled (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``) for each
operand dtype and each launch config its dispatcher can choose (``rlhf_fast.kernels.configs``, the same table
the launchers read), with the specialisation a contiguous launch gets from Triton's JIT (pointers and
multiples of 16 marked 16-divisible, unit strides as the constant 1). Per compiled kernel:

    regs, stack, LDL / STL   cuobjdump -res-usage / -sass (local-memory spills)
    shared                   bytes of shared memory, against the device limit (sm_80 163 KB, sm_90 227 KB)
    HGMMA / HMMA             tensor-core instructions (wgmma on sm_90 / mma.sync), for dot kernels
    LDG widths               global loads by width (LDG.E.128 = 16-byte vector loads; U16 / U8: scalar)

``--check`` exits 1 on: a compile error, a spill in a bf16/fp16 kernel (hot paths), shared memory over the
limit, or a dot kernel with bf16/fp16/tf32 operands without tensor-core instructions. fp32 spills are
reported, not failed (none today). CUDA sources: ``nvcc -cubin -Xptxas -v`` when nvcc exists (else skipped,
said so in the report). ``--results-md`` writes the table into the "Static kernel report" section of
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TENSOR_CORE = {80: "HMMA", 90: "HGMMA"}
SECTION = "## Static kernel report (Triton AOT, no GPU)"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One kernel: its pointer types (``"D"`` = the operand dtype), the int arguments that are 1 in a contiguous
    launch (specialised to the constant 1), the feature flags compiled (all optional work on: the most
    registers), and its launch configs as ``(constexprs, num_warps)``."""
    module: str
    kernel: str
    ptrs: dict
    unit: tuple
    flags: dict
    configs: tuple
    dtypes: tuple = ("fp32", "bf16")
    dot: bool = False


def _row_configs(max_elems=None):
    from rlhf_fast.kernels.configs import ROW_MAX_ELEMS, ROW_WARPS, row_tiling_extremes
    return tuple(({"ROWS": r, "BLOCK_T": t}, ROW_WARPS) for r, t in row_tiling_extremes(max_elems or ROW_MAX_ELEMS))


def _logprob_configs():
    from rlhf_fast.kernels.configs import logprob_tiling_extremes
    return tuple(({"R": r, "BLOCK_V": v}, w) for r, v, w in logprob_tiling_extremes())


def _linear_configs():
    """(dtype label, operand dtype, constexprs + warps) per arch: the tile linear_logprob_tile picks."""
    from rlhf_fast.kernels.configs import linear_logprob_tile
    out = {}
    for cc in SHARED_LIMIT:
        for label, dtype, tf32 in (("bf16", "bf16", False), ("fp16", "fp16", False), ("fp32", "fp32", False),
                                   ("tf32", "fp32", True)):
            t = linear_logprob_tile(dtype, cc, allow_tf32=tf32)
            out[(cc, label)] = (dtype, {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": t.block_k,
                                        "DOT_PRECISION": t.dot_precision}, t.num_warps)
    return out


def specs() -> list[Spec]:
    from rlhf_fast.kernels.configs import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, GAE_MAX_ELEMS
    ew = (({"BLOCK": ELEMENTWISE_BLOCK}, ELEMENTWISE_WARPS),)
    row, lp = _row_configs(), _logprob_configs()
    f32 = "fp32"
    return [
        Spec("kl", "_kl_fwd_kernel", {"out_ptr": f32}, (), {"EST": 2, "CLAMP": True}, ew),
        Spec("kl", "_kl_bwd_kernel", {"g_ptr": f32}, (),
             {"EST": 2, "STRAIGHT": False, "CLAMP": True, "NEED_REF": True}, ew),
        Spec("kl", "_shape_rewards_kernel", {"m_ptr": "u8", "rw_ptr": f32, "kl_ptr": f32}, ("s_at", "s_bt", "s_mt"),
             {"EST": 2, "CLAMP": True, "CLIP": True}, row),
        Spec("gae", "_gae_kernel", {"m_ptr": "u8", "adv_ptr": f32, "ret_ptr": f32}, ("s_rt", "s_vt", "s_mt"),
             {}, _row_configs(GAE_MAX_ELEMS)),
        Spec("masked", "_row_stats_kernel", {"m_ptr": "u8", "out_ptr": f32}, ("s_xt", "s_mt"), {}, row),
        Spec("policy_loss", "_policy_fwd_kernel", {"m_ptr": "u8", "parts_ptr": f32, "tok_ptr": f32}, (),
             {"HAS_TIS": True, "HAS_W": True, "TOKEN_OUT": True}, row),
        Spec("policy_loss", "_policy_bwd_kernel", {"m_ptr": "u8", "coef_ptr": f32}, (),
             {"HAS_TIS": True, "HAS_W": True, "COEF_PER_TOKEN": True}, row),
        Spec("value_loss", "_value_fwd_kernel", {"m_ptr": "u8", "parts_ptr": f32, "tok_ptr": f32}, (),
             {"TOKEN_OUT": True}, row),
        Spec("value_loss", "_value_bwd_kernel", {"m_ptr": "u8", "coef_ptr": f32}, (), {"COEF_PER_TOKEN": True}, row),
        Spec("logprob", "_logprob_fwd_kernel", {"labels_ptr": "i64", "logp_ptr": f32, "ent_ptr": f32, "lse_ptr": f32},
             (), {"NEED_ENTROPY": True}, lp),
        Spec("logprob", "_logprob_bwd_kernel", {"labels_ptr": "i64", "lse_ptr": f32, "glogp_ptr": f32,
                                                "gent_ptr": f32, "ent_ptr": f32}, (),
             {"HAS_GLOGP": True, "HAS_GENT": True, "HAS_ENT": True}, lp),
        Spec("linear_logprob", "_linear_logprob_fwd_kernel",
             {"labels_ptr": "i64", "m_ptr": f32, "d_ptr": f32, "q_ptr": f32, "sy_ptr": f32}, (),
             {"HAS_BIAS": False, "HAS_SOFTCAP": False, "NEED_ENTROPY": True, "UPCAST": False}, (),
             dtypes=("bf16", "fp16", "fp32", "tf32"), dot=True),
    ]


def uncovered() -> list[str]:
    """``@triton.jit`` kernels (``*_kernel``) of kernels/*.py that no Spec compiles: --check fails on them."""
    import ast
    covered = {f"{s.module}.{s.kernel}" for s in specs()}
    found = []
    for path in sorted((HERE.parent / "kernels").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                found.append(f"{path.stem}.{node.name}")
    return [k for k in found if k not in covered]


# ------------------------------------------------------------------------------------------------- compiling
def _kernel_fn(spec: Spec):
    import importlib
    return getattr(importlib.import_module(f"rlhf_fast.kernels.{spec.module}"), spec.kernel)


def _signature(fn, spec: Spec, dtype: str, constexprs: dict):
    """(signature, constexprs, attrs) of a contiguous launch, as Triton's JIT would specialise it."""
    sig, const, aligned = {}, dict(constexprs), []
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            t = spec.ptrs.get(name, "D")
            sig[name] = "*" + (dtype if t == "D" else t)
            aligned.append(name)
        elif name in spec.unit:
            sig[name], const[name] = "constexpr", 1
        elif name in ("c", "rc", "coef", "clip", "lo", "hi", "dual", "cap", "gamma", "gamma_lam", "inv_t",
                      "inv_tau", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name != "ignore_index":
                aligned.append(name)      # sizes and strides: multiples of 16 in the typical launch
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in const]
    if missing:
        raise KeyError(f"{spec.kernel}: no value for constexpr {missing}")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return sig, const, attrs


def _tool(name: str) -> str:
    import triton
    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not os.access(path, os.X_OK):          # a wheel unpacked by hand (pip --target) may lack the exec bit
        path.chmod(path.stat().st_mode | 0o111)
    return str(path)


def analyse_cubin(cubin: bytes) -> dict:
    """Registers, stack and the instruction mix of one cubin (cuobjdump from the triton wheel)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    loads = {}
    for width in re.findall(r"\bLDG\.E((?:\.[A-Z0-9]+)*)", sass):
        w = ".".join(p for p in width.split(".") if p in ("128", "64", "U16", "U8", "S16", "S8")) or "32"
        loads[w] = loads.get(w, 0) + 1
    count = lambda op: len(re.findall(rf"\b{op}\b", sass))   # noqa: E731
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "LDL": count(r"LDL(?:\.[A-Z0-9]+)*"),
            "STL": count(r"STL(?:\.[A-Z0-9]+)*"), "HGMMA": count(r"HGMMA(?:\.[A-Za-z0-9]+)*"),
            "HMMA": count(r"HMMA(?:\.[A-Za-z0-9]+)*"), "LDGSTS": count(r"LDGSTS(?:\.[A-Z0-9]+)*"),
            "loads": loads}


def compile_one(job: tuple) -> dict:
    """One (kernel, dtype, arch, config) -> a report row (``error`` set when it does not compile)."""
    spec, label, cc, constexprs, warps = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    dtype = "fp32" if label == "tf32" else label
    row = {"kernel": f"{spec.module}.{spec.kernel}", "dtype": label, "arch": f"sm_{cc}", "warps": warps,
           "config": ",".join(f"{k}={v}" for k, v in constexprs.items() if k not in spec.flags),
           "dot": spec.dot, "shared_limit": SHARED_LIMIT[cc]}
    t0 = time.perf_counter()
    try:
        fn = _kernel_fn(spec)
        sig, const, attrs = _signature(fn, spec, dtype, {**spec.flags, **constexprs})
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                  target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
        row.update(analyse_cubin(compiled.asm["cubin"]), shared=int(compiled.metadata.shared))
    except Exception as err:  # noqa: BLE001 -- a compile error is a result of the report
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def jobs(archs, only=()) -> list[tuple]:
    linear = _linear_configs()
    out = []
    for spec in specs():
        if only and not any(o in f"{spec.module}.{spec.kernel}" for o in only):
            continue
        for cc in archs:
            for label in spec.dtypes:
                if spec.dot:
                    _, constexprs, warps = linear[(cc, label)]
                    out.append((spec, label, cc, constexprs, warps))
                else:
                    out.extend((spec, label, cc, constexprs, warps) for constexprs, warps in spec.configs)
    return out


# ------------------------------------------------------------------------------------------------- CUDA sources
def cuda_sources(archs) -> list[dict]:
    """``nvcc -cubin -Xptxas -v`` of csrc/cuda/*.cu per arch; [] with a note when nvcc is absent."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [{"kernel": "csrc/cuda/*.cu", "error": "skipped: nvcc not found"}]
    rows = []
    for src in sorted((HERE.parent / "csrc" / "cuda").glob("*.cu")):
        for cc in archs:
            row = {"kernel": f"csrc/cuda/{src.name}", "dtype": "fp32", "arch": f"sm_{cc}", "warps": 4, "config": "nvcc",
                   "dot": False, "shared_limit": SHARED_LIMIT[cc]}
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                out = pathlib.Path(tmp) / "k.cubin"
                p = subprocess.run([nvcc, "-cubin", f"-arch=sm_{cc}", "-O3", "-std=c++17", "-Xptxas", "-v",
                                    str(src), "-o", str(out)], capture_output=True, text=True)
                if p.returncode:
                    row["error"] = f"nvcc: {p.stderr.strip().splitlines()[-1][:300]}"
                else:
                    row.update(analyse_cubin(out.read_bytes()))
                    row["ptxas"] = "; ".join(line.split("info    :")[-1].strip() for line in p.stderr.splitlines()
                                             if "Used" in line or "stack frame" in line)
                    smem = re.search(r"(\d+) bytes smem", p.stderr)
                    row["shared"] = int(smem.group(1)) if smem else 0
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- checking
def problems(row: dict) -> list[str]:
    """The --check failures of one row (empty: fine)."""
    if "error" in row:
        return [] if row["error"].startswith("skipped") else [f"compile error: {row['error']}"]
    out = []
    spills = row["stack"] or row["LDL"] or row["STL"]
    if spills and row["dtype"] in ("bf16", "fp16"):
        out.append(f"spills in a {row['dtype']} hot path (stack {row['stack']} B, LDL {row['LDL']}, STL {row['STL']})")
    if row["shared"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared']} B over the {row['arch']} limit {row['shared_limit']} B")
    cc = int(row["arch"][3:])
    if row["dot"] and row["dtype"] in ("bf16", "fp16", "tf32") and not row[TENSOR_CORE[cc]]:
        out.append(f"{row['dtype']} dot without tensor-core instructions ({TENSOR_CORE[cc]}) on {row['arch']}")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"triton {meta['triton']}, {meta['when']}; `{meta['command']}`. Registers per thread (limit 255), "
             "stack bytes and local loads/stores (spills), shared memory in KB (limit: sm_80 163, sm_90 227), "
             "tensor-core instructions, global loads by width.", "",
             "| kernel | dtype | arch | config | warps | regs | stack | LDL/STL | shared KB | HGMMA/HMMA | "
             "global loads | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r.get('dtype', '')} | {r.get('arch', '')} | {r.get('config', '')} | | | | | | | | "
                         f"{r['error']} |")
            continue
        loads = " ".join(f"{k}:{v}" for k, v in sorted(r["loads"].items()))
        tc = f"{r['HGMMA']}/{r['HMMA']}" if r["dot"] else "-"
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['config']} | {r['warps']} | {r['regs']} | "
                     f"{r['stack']} | {r['LDL']}/{r['STL']} | {r['shared'] / 1024:.1f} | {tc} | {loads} | "
                     f"{'; '.join(problems(r)) or 'ok'} |")
    return "\n".join(lines) + "\n"


def _section_span(text: str) -> tuple[int, int] | None:
    """[start, end) of this report's section in a RESULTS.md text (up to the next ``## `` heading), or None."""
    start = text.find(SECTION)
    if start < 0:
        return None
    nxt = text.find("\n## ", start + len(SECTION))
    return start, (nxt + 1 if nxt >= 0 else len(text))


def results_section(text: str) -> str | None:
    """This report's section of a RESULTS.md text, heading included (what ``write_results_section`` wrote)."""
    span = _section_span(text)
    return text[span[0]:span[1]] if span else None


def write_results_section(md_path: pathlib.Path, table: str) -> None:
    """Replace (or append) this report's own section of RESULTS.md; the rest of the file is untouched."""
    text = md_path.read_text() if md_path.exists() else ""
    block = f"{SECTION}\n\n{table}"
    span = _section_span(text)
    if span is None:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        text = text[:span[0]] + block + text[span[1]:]
    md_path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 on a compile error, spill, shared-memory or "
                                                         "tensor-core problem (see above)")
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--json", type=pathlib.Path, help="write the rows here")
    p.add_argument("--md", type=pathlib.Path, help="write the markdown table here")
    p.add_argument("--results-md", action="store_true", help="put the table into benchmarks/RESULTS.md")
    p.add_argument("--only", default="", help="compile only kernels whose name contains one of these "
                                               "comma-separated strings (and skip the CUDA sources)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    a = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # triton 3.9 warns when unset; 1 = its default
    os.environ.pop("TRITON_INTERPRET", None)                   # compile for real, not for the interpreter
    import triton
    archs = [int(x) for x in a.arch.split(",")]
    bad = [cc for cc in archs if cc not in SHARED_LIMIT]
    if bad:
        p.error(f"--arch: known compute capabilities are {sorted(SHARED_LIMIT)}, got {bad}")
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(a.workers) as pool:
        rows = list(pool.map(compile_one, jobs(archs, [x for x in a.only.split(",") if x])))
    if not a.only:
        rows += cuda_sources(archs)
    meta = {"triton": triton.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -m benchmarks kernels " + " ".join(argv if argv is not None else sys.argv[2:]),
            "seconds": round(time.perf_counter() - t0, 1)}
    table = markdown(rows, meta)
    print(table)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if a.md:
        a.md.write_text(table)
    if a.results_md:
        write_results_section(HERE / "RESULTS.md", table)
    failed = [(r, msg) for r in rows for msg in problems(r)]
    if not a.only:
        failed += [({"kernel": k}, "no Spec in benchmarks/kernels.py: the report does not compile it")
                   for k in uncovered()]
    print(f"{len(rows)} kernels compiled in {meta['seconds']} s with triton {meta['triton']}; "
          f"{len(failed)} problems", file=sys.stderr)
    for r, msg in failed:
        print(f"FAIL {r['kernel']} {r.get('dtype')} {r.get('arch')} {r.get('config')}: {msg}", file=sys.stderr)
    return 1 if (a.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
