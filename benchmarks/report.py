"""Results on disk: the raw JSON records, a markdown table and a PNG plot.

All three are written under the output directory as ``<device>-<date>.{json,md,png}``;
the table and the plot are computed from the JSON records alone (:func:`load` +
:func:`markdown` reproduce the committed table from the committed JSON).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .cases import SHAPES

VARIANT_ORDER = (("full", "flat"), ("full", "peaked"), ("ragged", "flat"), ("ragged", "peaked"))


def _clean(x):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def stem(records: list[dict], device_slug: str) -> str:
    date = next((r.get("date") for r in records if r.get("date")), "undated")
    return f"{device_slug}-{date}"


def write_json(records: list[dict], path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(records), indent=1) + "\n")
    tmp.replace(path)  # never leave a half-written file behind a killed run


def load(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


def _ms(x):
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _mb(x):
    if x is None:
        return "–"
    if x >= 1024:
        return f"{x / 1024:.1f} GB"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _err(x):
    return "–" if x is None else f"{x:.1e}"


def _group_key(r):
    return (r["shape"], r["B"], r["T"])


def _ordered_groups(records, group):
    keys = []
    for r in records:
        if r.get("group", "main") == group and _group_key(r) not in keys:
            keys.append(_group_key(r))
    return keys


def _provider_order(records):
    order = []
    for r in records:
        if r["provider"] not in order:
            order.append(r["provider"])
    return order


def markdown(records: list[dict], title: str | None = None) -> str:
    """The results table: one section per head and batch, one row per variant × provider."""
    if not records:
        return "(no records)\n"
    r0 = records[0]
    cpu = str(r0.get("device", "")).startswith("CPU")
    peers = r0.get("peers") or {}
    lines = [f"# {title or 'AlphaPO loss benchmark'}", ""]
    lines += [
        f"- device: **{r0.get('device')}**{' — a CPU run: stand-in shapes, CPU times' if cpu else ''}",
        f"- command: `{r0.get('command') or 'python -m benchmarks'}` (preset `{r0.get('preset')}`, dtype {r0.get('dtype')})",
        f"- torch {r0.get('torch')}, triton {r0.get('triton')}, "
        + ", ".join(f"{k} {v or 'not installed'}" for k, v in peers.items())
        + f"; commit `{r0.get('commit')}`, {r0.get('date')}",
        "- loss: AlphaPO α = 0.25, β = 2.5, γ = 1.375, length-averaged log-probs; rows marked α = 0 "
        "(Liger, which has no α, and our `-a0` rows) compute SimPO",
        "- **GEMM** = one GEMM (valid tokens × H)·(H × V) in the same dtype on the same device; **floor** "
        "= 4 × GEMM, the 8·N·H·V limit of a method that stores no logits; **×3 GEMM** = fwd+bwd ÷ (3 × GEMM), "
        "against the 6·N·H·V limit of the pair-chunked order",
        "- **path**: alphapo's order of work (`pair-chunked` 6·N·H·V, `recompute` 8·N·H·V), or the peer's method",
        "- **TFLOP/s** = 6 · n_valid · H · V / (fwd+bwd time), whatever the provider computes",
        "- **peak MB**: memory above the inputs and the parameter-dtype gradients during fwd+bwd ("
        + ("peak RSS, each provider in its own process" if cpu else "`torch.cuda.max_memory_allocated`")
        + "); **err**: ‖x − x_ref‖ / ‖x_ref‖ against an exact "
        + ("float64" if cpu else "float32")
        + " reference",
        "",
    ]
    summary = summary_markdown(records)
    if summary:
        lines += ["## Summary", "", summary, ""]
    for key in _ordered_groups(records, "main"):
        lines += _main_section(records, key)
    sweep = [r for r in records if r.get("group") == "sweep"]
    if sweep:
        lines += _sweep_section(sweep)
    return "\n".join(lines) + "\n"


def summary_markdown(records: list[dict], variants=(("full", "flat"), ("ragged", "peaked"))) -> str:
    """The compact table of the README: per provider, fwd+bwd ms and peak MB on each head's
    two key variants (dense and untrained; ragged and trained-looking), and its worst
    error over every variant measured."""
    main = [r for r in records if r.get("group", "main") == "main"]
    groups = _ordered_groups(main, "main")
    cols = [(g, v) for g in groups for v in variants if any(_group_key(r) == g and (r["mask"], r["logits"]) == v for r in main)]
    provs = [p for p in _provider_order(main) if any(r["provider"] == p and r["status"] == "ok" for r in main)]
    if not cols or not provs:
        return ""

    def col_name(g, v):
        return f"{g[0]} {g[1]}×{g[2]} {v[0]}/{v[1]}"

    out = ["fwd+bwd ms · peak MB per head, batch and mask/logits; worst relative error over all variants.", ""]
    out.append("| provider | α | " + " | ".join(col_name(g, v) for g, v in cols) + " | worst err loss / grad_h / grad_w |")
    out.append("|---|--:|" + "--:|" * len(cols) + "--:|")
    floor = []
    for g, v in cols:
        r = next((r for r in main if _group_key(r) == g and (r["mask"], r["logits"]) == v and r.get("floor_ms")), None)
        floor.append(_ms(r["floor_ms"]) if r else "–")
    out.append("| *floor* (4 × GEMM) | | " + " | ".join(floor) + " | |")
    for p in provs:
        rows = [r for r in main if r["provider"] == p]
        cells = []
        for g, v in cols:
            r = next((r for r in rows if _group_key(r) == g and (r["mask"], r["logits"]) == v), None)
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(f"{_ms(r['fwd_bwd_ms'])} · {_mb(r['peak_mem_mb'])}")
            else:
                cells.append(r["status"])
        worst = [max((r.get(k) or 0.0) for r in rows if r["status"] == "ok") for k in ("loss_rel_err", "grad_h_rel_err", "grad_w_rel_err")]
        alpha = next((r.get("alpha") for r in rows), None)
        out.append(f"| {p} | {'' if alpha is None else f'{alpha:g}'} | " + " | ".join(cells) + " | " + " / ".join(_err(w) for w in worst) + " |")
    skipped = defaultdict(set)
    for r in main:
        if r["status"] == "skipped" and r["provider"] not in provs:
            skipped[r["reason"]].add(r["provider"])
    if skipped:
        out.append("")
    for reason, names in skipped.items():
        out.append(f"Skipped: {', '.join(sorted(names))} — {reason}  ")
    return "\n".join(out)


def _main_section(records, key):
    shape, B, T = key
    rows = [r for r in records if r.get("group", "main") == "main" and _group_key(r) == key]
    s = SHAPES.get(shape)
    head = f"## {s.name if s else shape} (H = {rows[0]['H']}, V = {rows[0]['V']}), {B} pairs × {T} positions"
    if s and s.standin_for:
        head += f" — stand-in for {s.standin_for}"
    out = [head, ""]
    out.append(
        "| mask | logits | n_valid | provider | α | path | fwd ms | fwd+bwd ms [p20, p80] | ×3 GEMM | TFLOP/s "
        "| peak MB | err loss | err grad_h | err grad_w |"
    )
    out.append("|---|---|--:|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    skipped = defaultdict(list)
    for mask, logits in VARIANT_ORDER:
        var = [r for r in rows if r["mask"] == mask and r["logits"] == logits]
        if not var:
            continue
        n_valid = next((r["n_valid"] for r in var if r.get("n_valid") is not None), None)
        gemm = next((r["gemm_ms"] for r in var if r.get("gemm_ms") is not None), None)
        extra = ""
        top1 = next((r.get("top1_mean") for r in var if r.get("top1_mean") is not None), None)
        logp = next((r.get("logp_mean") for r in var if r.get("logp_mean") is not None), None)
        if top1 is not None:
            extra = f" (logp {logp:.2f}, top-1 {top1:.2f})"
        nv = "–" if n_valid is None else str(n_valid)
        out.append(f"| {mask} | {logits}{extra} | {nv} | *3 × GEMM* | | | | {_ms(None if gemm is None else 3 * gemm)} | 1 | | | | | |")
        for r in var:
            if r["status"] == "skipped":
                skipped[r["reason"]].append(r["provider"])
                continue
            a = r.get("alpha")
            alpha = "" if a is None else f"{a:g}"
            if r["status"] != "ok":
                out.append(f"| {mask} | {logits} | {nv} | {r['provider']} | {alpha} | | **{r['status']}** | {r['reason'][:80]} |||||||")
                continue
            ratio = r.get("floor6_ratio")
            out.append(
                f"| {mask} | {logits} | {nv} | {r['provider']} | {alpha} | {r.get('path') or ''} | {_ms(r['fwd_ms'])} | "
                f"{_ms(r['fwd_bwd_ms'])} [{_ms(r['fwd_bwd_p20_ms'])}, {_ms(r['fwd_bwd_p80_ms'])}] | "
                f"{'–' if ratio is None else f'{ratio:.2f}'} | {r['tflops']:.3g} | {_mb(r['peak_mem_mb'])} | "
                f"{_err(r.get('loss_rel_err'))} | {_err(r.get('grad_h_rel_err'))} | {_err(r.get('grad_w_rel_err'))} |"
            )
    out.append("")
    for reason, names in skipped.items():
        out.append(f"Skipped: {', '.join(sorted(set(names)))} — {reason}")
    if skipped:
        out.append("")
    return out


def _sweep_section(sweep):
    out = []
    heads = {}
    for r in sweep:
        heads.setdefault((r["shape"], r["T"], r["mask"], r["logits"]), []).append(r)
    for (shape, T, mask, logits), rows in heads.items():
        s = SHAPES.get(shape)
        out += [
            f"## Token sweep: {s.name if s else shape}, {T} positions per sequence, mask={mask}, logits={logits}",
            "",
            "fwd+bwd ms / peak MB per provider as the batch grows (N = 2 · pairs · positions).",
            "",
        ]
        provs = [p for p in _provider_order(rows) if any(r["provider"] == p and r["status"] != "skipped" for r in rows)]
        out.append("| pairs | N | floor ms | " + " | ".join(provs) + " |")
        out.append("|--:|--:|--:|" + "--:|" * len(provs))
        for B in sorted({r["B"] for r in rows}):
            pts = {r["provider"]: r for r in rows if r["B"] == B}
            floor = next((r["floor_ms"] for r in pts.values() if r.get("floor_ms") is not None), None)
            cells = []
            for p in provs:
                r = pts.get(p)
                if r is None:
                    cells.append("")
                elif r["status"] == "ok":
                    cells.append(f"{_ms(r['fwd_bwd_ms'])} / {_mb(r['peak_mem_mb'])}")
                else:
                    cells.append(r["status"].upper() if r["status"] == "oom" else r["status"])
            N = next(iter(pts.values()))["N"]
            out.append(f"| {B} | {N} | {_ms(floor)} | " + " | ".join(cells) + " |")
        skipped = sorted({(r["provider"], r["reason"]) for r in rows if r["status"] == "skipped"})
        out.append("")
        for p, reason in skipped:
            out.append(f"Skipped: {p} — {reason}")
        out.append("")
    return out


# ---------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------

_COLORS = {
    ("full", "flat"): "#9ecae1",
    ("full", "peaked"): "#3182bd",
    ("ragged", "flat"): "#fdae6b",
    ("ragged", "peaked"): "#e6550d",
}


def plot(records: list[dict], path: Path) -> Path | None:
    """Time and memory per provider, one row per head × batch (variants side by side),
    plus the token sweep. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = _ordered_groups(records, "main")
    sweep = [r for r in records if r.get("group") == "sweep" and r["status"] == "ok"]
    n_rows = len(groups) + (1 if sweep else 0)
    if n_rows == 0:
        return None
    fig, axes = plt.subplots(n_rows, 2, figsize=(13, 3.1 * n_rows), squeeze=False)
    for row, key in enumerate(groups):
        rows = [r for r in records if r.get("group", "main") == "main" and _group_key(r) == key]
        _bars(axes[row], rows, key)
    if sweep:
        _sweep_lines(axes[-1], sweep)
    r0 = records[0]
    fig.suptitle(f"{r0.get('device')} — {r0.get('dtype')}, torch {r0.get('torch')}, commit {r0.get('commit')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _bars(ax_pair, rows, key):
    shape, B, T = key
    provs = [p for p in _provider_order(rows) if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
    variants = [v for v in VARIANT_ORDER if any((r["mask"], r["logits"]) == v for r in rows)]
    width = 0.8 / max(1, len(variants))
    s = SHAPES.get(shape)
    name = f"{s.name if s else shape}, {B}×{T}"
    for ax, metric, label in (
        (ax_pair[0], "fwd_bwd_ms", "fwd+bwd ms"),
        (ax_pair[1], "peak_mem_mb", "peak MB above inputs+grads"),
    ):
        xs = (["floor"] if metric == "fwd_bwd_ms" else []) + provs
        for j, v in enumerate(variants):
            vals = []
            for p in xs:
                if p == "floor":
                    r = next((r for r in rows if (r["mask"], r["logits"]) == v and r.get("floor_ms")), None)
                    vals.append(r["floor_ms"] if r else 0)
                    continue
                r = next((r for r in rows if r["provider"] == p and (r["mask"], r["logits"]) == v), None)
                vals.append(r[metric] if r and r["status"] == "ok" and r[metric] is not None else 0)
            pos = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(xs))]
            ax.bar(pos, [max(x, 1e-3) for x in vals], width, color=_COLORS[v], label=f"{v[0]} / {v[1]}")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(name, fontsize=9)
        if metric == "peak_mem_mb":
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    ax_pair[0].legend(fontsize=7, ncol=2)


def _sweep_lines(ax_pair, sweep):
    for p in _provider_order(sweep):
        pts = sorted((r["N"], r["fwd_bwd_ms"], r["peak_mem_mb"]) for r in sweep if r["provider"] == p)
        ax_pair[0].plot([x[0] for x in pts], [x[1] for x in pts], marker="o", label=p)
        ax_pair[1].plot([x[0] for x in pts], [max(x[2], 1e-3) for x in pts], marker="o", label=p)
    floor = sorted({(r["N"], r["floor_ms"]) for r in sweep if r.get("floor_ms")})
    if floor:
        ax_pair[0].plot([x[0] for x in floor], [x[1] for x in floor], "k--", label="floor")
    s = SHAPES.get(sweep[0]["shape"])
    for ax, label in ((ax_pair[0], "fwd+bwd ms"), (ax_pair[1], "peak MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N = 2·pairs·positions", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"token sweep, {s.name if s else sweep[0]['shape']}", fontsize=9)
        ax.grid(alpha=0.3)
    ax_pair[0].legend(fontsize=7)


def write_all(records: list[dict], out_dir: Path, name: str, plot_png: bool = True, raw: bool = True) -> dict[str, Path]:
    """``<name>.json`` (raw records, unless ``raw=False``), ``<name>.md`` (table) and ``<name>.png`` (plot)."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    if raw:
        write_json(records, paths["json"])
    else:
        del paths["json"]
    paths["md"].write_text(markdown(records, title=f"AlphaPO loss benchmark — {name}"))
    if plot_png:
        png = plot(records, out_dir / f"{name}.png")
        if png:
            paths["png"] = png
    return paths
