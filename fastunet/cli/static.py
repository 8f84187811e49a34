"""Static report of the Triton kernels: every config each launcher can select, compiled for sm_80 and sm_90.

The launchers (attention forward/backward, group_norm_act forward/backward, fourier filter) are called
on CPU tensors of representative shapes (SD 1.5, SDXL and AnimateDiff shapes, odd ones; every dtype,
mask kind and layout) with their kernel launches intercepted, once with the arch forced to 80 and once
to 90; each distinct launch is specialised as Triton's runtime does it and compiled with Triton's own
compiler and bundled ptxas (no GPU needed). Per compiled case it prints registers, spills (local and
stack), shared memory, occupancy (warps per SM and the limiting resource), whether tl.dot lowered to
tensor-core instructions (mma = HMMA, wgmma = HGMMA) and the SASS instructions per iteration of each
innermost loop.

It exits 1 with the list of problems if any case spills, exceeds the shared-memory limit, runs an
attention dot without tensor-core instructions (fp32: only once kernels/attention.py sets
_FP32_TENSOR_CORES), has an innermost loop longer than recorded in fastunet/static_baseline.json,
or if a config of the tables is reached by no launch; 2 if triton or its bundled tools are missing.

Compile results are cached under ~/.cache/fastunet/static (or $FASTUNET_STATIC_CACHE), keyed by the
kernel source and the case, so a second run only compiles what changed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

#: Columns of the per-case table printed to stdout (the CSV has more).
TABLE_COLUMNS = ("kernel", "cc", "dtype", "config", "num_warps", "num_stages", "registers", "spill_local",
                 "spill_stack", "shared", "warps_per_sm", "limiter", "mma", "loops")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The static report's options."""
    from fastunet.static_report import BASELINE_PATH, PROBE_SETS

    p.add_argument("--out", metavar="DIR", default=None,
                   help="also write DIR/static.md (per-kernel headline, problems, every case) and DIR/static.csv "
                        "(every case, every column)")
    p.add_argument("--record", action="store_true",
                   help="rewrite the loop baseline (--baseline) with the innermost-loop instruction counts of this "
                        "run instead of checking against it (merged into the file when --ops, --arch or --subset "
                        "restrict the run)")
    p.add_argument("--baseline", metavar="FILE", default=BASELINE_PATH,
                   help="the loop baseline JSON to check against or --record into (default: the package's "
                        "static_baseline.json)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="compile in N parallel processes (default 2)")
    p.add_argument("--no-cache", action="store_true",
                   help="compile everything afresh, neither reading nor writing the compile cache")
    p.add_argument("--ops", nargs="+", choices=list(PROBE_SETS), default=list(PROBE_SETS),
                   help="only these ops' launchers (default: all)")
    p.add_argument("--arch", nargs="+", type=int, choices=(80, 90), default=[80, 90],
                   help="compute capabilities to force and compile for (default: 80 90)")
    p.add_argument("--subset", action="store_true",
                   help="compile only the CI test's representative subset (every kernel x arch x dtype, the "
                        "heaviest configs) instead of every case")
    p.add_argument("--brief", action="store_true",
                   help="print only the per-kernel headline and the cases with a problem (default: every case "
                        "too; --out always writes every case)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the report. Reads ``args.out``, ``args.record``, ``args.baseline``, ``args.workers``,
    ``args.no_cache``, ``args.ops``, ``args.arch``, ``args.subset``, ``args.brief`` and
    ``args.quiet``, each optional (the defaults of :func:`add_arguments` where absent)."""
    from fastunet import static_report as sr

    out = getattr(args, "out", None)
    record = bool(getattr(args, "record", False))
    baseline_path = getattr(args, "baseline", None) or sr.BASELINE_PATH
    workers = int(getattr(args, "workers", 2) or 2)
    use_cache = not getattr(args, "no_cache", False)
    ops = tuple(getattr(args, "ops", None) or sr.PROBE_SETS)
    ccs = tuple(getattr(args, "arch", None) or (80, 90))
    subset = bool(getattr(args, "subset", False))
    brief = bool(getattr(args, "brief", False))
    quiet = bool(getattr(args, "quiet", False))
    if workers < 1:
        print(f"--workers must be >= 1; got {workers}", file=sys.stderr)
        return 2
    try:
        sr.toolchain()
    except RuntimeError as e:
        print(f"fastunet static report: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    cases = sr.collect_cases_in_child(ccs, ops)
    missing = sr.coverage(cases, ccs)
    notes, problems = [], []
    if "fourier_filter" in ops and missing["fourier_filter"]:
        extra = sr.synthesise_fourier(cases, missing["fourier_filter"])
        cases += extra
        notes.append(f"fourier_filter: {len(missing['fourier_filter'])} (cc, config) entries of the config table "
                     f"are reached by no input (a row pad of 1 on a tile taller than one row, or a row pad and "
                     f"column-pad class no threshold gives together); {len(extra)} cases synthesised from the table for them")
    for op in ("attention", "group_norm_act"):
        if op in ops:
            problems += [f"{op}: config {m} is reached by no probe launch" for m in missing[op]]
    if subset:
        cases = sr.representative_subset(cases)
    baseline = {} if record else sr.load_baseline(baseline_path)
    t1 = time.perf_counter()
    results, rows, case_problems = sr.run_report(cases, workers=workers, use_cache=use_cache, progress=not quiet,
                                                 baseline=baseline)
    problems += case_problems
    unrecorded = sum(1 for c, r in zip(cases, results) if "error" not in r and sr.baseline_key(c) not in baseline)
    if unrecorded and not record:
        notes.append(f"{unrecorded} of {len(cases)} cases have no entry in the loop baseline {baseline_path} "
                     f"(new configs or changed kernels; `--record` adds them)")
    t2 = time.perf_counter()

    heads = sr.headline(rows)
    print(f"static report: {len(cases)} compiled cases ({'CI subset' if subset else 'every captured launch'}), "
          f"ops {', '.join(ops)}, sm_{', sm_'.join(map(str, ccs))}; capture {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    print()
    print(sr.format_table(heads, list(heads[0]) if heads else []))
    shown = rows if not brief else [r for r, c, res in zip(rows, cases, results)
                                   if sr.check_case(c, res, baseline, sr.fp32_tensor_cores_expected())]
    if shown:
        print()
        print(sr.format_table(shown, TABLE_COLUMNS))
    for n in notes:
        print(f"\nnote: {n}")
    if out:
        sr.write_report(out, rows, problems, notes)
        print(f"\nwrote {os.path.join(out, 'static.md')} and {os.path.join(out, 'static.csv')}")
    if record:
        n = sr.save_baseline(cases, results, baseline_path, merge=subset or set(ops) != set(sr.PROBE_SETS)
                             or set(ccs) != {80, 90})
        print(f"\nrecorded the innermost loops of {len(cases)} cases into {baseline_path} ({n} entries)")
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("\nno problems")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastunet.cli.static [options]``."""
    parser = argparse.ArgumentParser(prog="python -m fastunet.cli.static", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
