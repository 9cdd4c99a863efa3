"""``python -m benchmarks``: measure the providers on a preset's cases and write the results.

    python -m benchmarks --quick                      # CPU stand-ins, fp32, a couple of minutes
    python -m benchmarks --preset gpu --time-budget 400
    python -m benchmarks --providers alphapo-triton,liger --shapes llama3-8b --masks ragged

Writes ``<device>-<date>.json`` (one record per provider × case), ``.md`` (the table) and
``.png`` (the plot) under ``--out`` (default ``benchmarks/results/``); the JSON is rewritten
after every record, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import harness, report
from .cases import LOGITS, MASKS, PRESETS, SHAPES, preset_cases, select
from .providers import PROVIDERS, default_providers

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}  # fmt: skip

# The --quick stand-ins are ~1000× smaller than real heads; the alphapo backends' scratch
# budget shrinks with them so that a chunk holds one pair, as the GPU default does at
# Llama-3-8B (1 GiB for a pair of 2 × 2048): 16 MiB is one pair of 2 × 128 float32 tokens
# at the wider stand-in (V = 16,384), two at V = 8,192 — the pair-chunked path, with the
# recompute path's chunks small beside the logits they replace.
QUICK_SCRATCH_BYTES = 16 * 2**20


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, help="case list (default: gpu on CUDA, quick on CPU)")
    p.add_argument("--quick", action="store_true", help="= --preset quick: CPU stand-in shapes in float32")
    p.add_argument("--providers", help=f"comma list from {','.join(PROVIDERS)} (default: all)")
    p.add_argument("--shapes", help=f"comma list from {','.join(SHAPES)}")
    p.add_argument("--masks", help=f"comma list from {','.join(MASKS)}")
    p.add_argument("--logits", help=f"comma list from {','.join(LOGITS)}")
    p.add_argument("--batches", help="comma list of PAIRSxPOSITIONS for the main cases, e.g. 4x2048")
    p.add_argument("--no-sweep", action="store_true", help="leave out the token sweep")
    p.add_argument("--sweep-only", action="store_true", help="only the token sweep")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available; --quick: cpu)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output directory")
    p.add_argument("--name", help="file stem of the outputs (default: <device>-<date>)")
    p.add_argument("--scratch-mb", type=float, help="alphapo scratch budget in MiB (default: 16 for --quick, else the backend's)")
    p.add_argument("--time-budget", type=float, help="seconds; cases not started by then are recorded as skipped")
    p.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                   help="run each provider in its own process (auto: on CPU, for peak RSS)")  # fmt: skip
    p.add_argument("--threads", type=int,
                   help="CPU intra-op threads (default 1: on a shared machine more threads than idle cores "
                        "turn OpenMP barriers into the measurement; 0 = torch's default)")  # fmt: skip
    p.add_argument("--cpu-time-s", type=float, default=0.4, help="CPU timer: seconds of calls per measurement")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="with --isolate none on a CPU: re-time fwd+bwd round-robin over the providers, ROUNDS "
                        "rounds (side by side, so machine drift hits every provider alike)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="print the cases and providers, then exit")
    p.add_argument("--render", metavar="JSON", help="only rebuild the .md and .png beside a results JSON")
    return p.parse_args(argv)


def resolve(args, argv=None):
    """Options and the case list from the parsed arguments."""
    preset = "quick" if args.quick else args.preset
    if args.device:
        device = torch.device(args.device)
    elif preset in ("quick", "smoke", "cpu-check"):
        device = torch.device("cpu")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = preset or ("gpu" if device.type == "cuda" else "quick")
    if args.dtype:
        dtype = DTYPES[args.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" and preset not in ("quick", "smoke") else torch.float32
    groups = ["sweep"] if args.sweep_only else (["main"] if args.no_sweep else None)
    cases = select(preset_cases(preset), _csv(args.shapes), _csv(args.masks), _csv(args.logits), _csv(args.batches), groups)
    names = _csv(args.providers) or default_providers(device)
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; known: {list(PROVIDERS)}")
    if args.scratch_mb is not None:
        scratch = int(args.scratch_mb * 2**20)
    else:
        scratch = QUICK_SCRATCH_BYTES if preset in ("quick", "smoke") else None
    isolate = {"process": True, "none": False, "auto": device.type == "cpu"}[args.isolate]
    if isolate and device.type == "cpu" and not harness.cpu_peak_supported():
        print("warning: /proc peak-RSS reset unavailable; CPU memory numbers will include earlier cases", file=sys.stderr)
    opts = harness.RunOptions(
        preset=preset, device=device, dtype=dtype, providers=names, scratch_bytes=scratch, isolate=isolate,
        time_budget_s=args.time_budget, cpu_budget_s=args.cpu_time_s, interleave_rounds=args.interleave,
        threads=(1 if args.threads is None else args.threads or None) if device.type == "cpu" else None,
        command=" ".join(["python -m benchmarks", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
    )  # fmt: skip
    return opts, cases


class _Progress:
    """tqdm when installed, else one line per record."""

    def __init__(self, total, enabled=True):
        self.bar = None
        self.enabled = enabled
        self.done = 0
        self.total = total
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="meas", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, rec):
        self.done += 1
        label = f"{rec['provider']} {rec['shape']} {rec['B']}x{rec['T']} {rec['mask']}/{rec['logits']}: {rec['status']}"
        if self.bar is not None:
            self.bar.set_description(label[:70])
            self.bar.update(1)
        elif self.enabled:
            ms = rec.get("fwd_bwd_ms")
            print(f"[{self.done}/{self.total}] {label}" + (f" {ms:.3g} ms" if ms else ""), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        path = Path(args.render)
        paths = report.write_all(report.load(path), path.parent, path.stem, plot_png=not args.no_plot, raw=False)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    opts, cases = resolve(args, argv)
    if args.list:
        for c in cases:
            print(f"{c.group:5s} {c.id}  providers: {','.join(harness.providers_for(c, opts.providers))}")
        return 0
    if not cases:
        raise SystemExit("no cases selected")
    harness.apply_threads(opts)
    opts.env = harness.environment(opts.device)
    name = args.name or f"{harness.device_slug(opts.device)}-{opts.env['date']}"
    out = Path(args.out)
    total = sum(len(harness.providers_for(c, opts.providers)) for c in cases)
    print(
        f"{len(cases)} cases × providers = {total} measurements on {opts.env['device']} "
        f"({str(opts.dtype).removeprefix('torch.')}, preset {opts.preset}) -> {out / name}.json",
        flush=True,
    )
    progress = _Progress(total, enabled=not args.no_progress)
    partial: list[dict] = []

    def on_record(rec):
        partial.append(rec)
        progress.update(rec)
        report.write_json(partial, out / f"{name}.json")

    opts.on_record = on_record
    t0 = time.time()
    records = harness.run(cases, opts)
    progress.close()
    paths = report.write_all(records, out, name, plot_png=not args.no_plot)
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"done in {time.time() - t0:.0f} s: {counts}; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
