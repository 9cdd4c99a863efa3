"""What is measured: lm-head shapes, batches (mask × logit distribution) and the presets.

A case is one seeded batch ``(weight (V, H), hidden (2B, T, H), target (2B, T))``:

* ``mask="full"``: every position is a valid target.
* ``mask="ragged"``: like real preference data. Each sequence ignores a prompt of T/4
  positions, then has a completion whose length is uniform in [T/4, 3T/4], then padding;
  about half the positions are valid. Chosen row j and rejected row B+j share the prompt.
* ``logits="flat"``: hidden ~ N(0, 1), weight ~ N(0, 0.02²), targets uniform: an untrained
  head, whose softmax is nearly uniform (mean token log-prob ≈ −log V).
* ``logits="peaked"``: shaped like a trained model's softmax (see :func:`peaked_batch`):
  a Zipf unigram prior shared by every row plus each row's target pushed up, calibrated so
  the mean token log-prob is −1.6 and the mean top-1 probability 0.5. Most of the
  vocabulary then has a probability far below bf16's resolution, which is where gradient
  filtering (Cut Cross-Entropy's ``filter_eps``) pays.

Everything is generated in float32 on the benchmark device from a seed derived from the
case, then cast to the benchmark dtype.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

IGNORE_INDEX = -100
SIGMA_W = 0.02  # std of the weight noise: a typical initialiser scale for lm-heads

# The calibration targets of logits="peaked": perplexity ≈ e^1.6 ≈ 5 and a confident argmax
# half of the time, as a trained 7B model shows on its own preference data.
PEAKED_LOGP = -1.6
PEAKED_TOP1 = 0.5


@dataclass(frozen=True)
class Shape:
    """An lm-head: hidden size H and vocabulary V."""

    name: str
    H: int
    V: int
    standin_for: str = ""  # CPU stand-ins: the real head they imitate


# DESIGN.md §3: the heads that matter, and the small CPU stand-ins of the --quick preset
# (chosen so that the (tokens × V) logits dominate memory, as they do at full size).
SHAPES = {
    "llama3-8b": Shape("Llama-3-8B", 4096, 128256),
    "qwen2.5-7b": Shape("Qwen2.5-7B", 3584, 152064),
    "gemma2-2b": Shape("Gemma-2-2B", 2304, 256000),
    "qwen2.5-0.5b": Shape("Qwen2.5-0.5B", 896, 151936),
    "mistral-7b": Shape("Mistral-7B", 4096, 32768),
    "standin-8k": Shape("stand-in H=128 V=8192", 128, 8192, "Llama-3-8B (narrow H, V ≫ H)"),
    "standin-16k": Shape("stand-in H=64 V=16384", 64, 16384, "Gemma-2-2B (wide V)"),
    "cpu-h512": Shape("CPU side-by-side H=512 V=16384", 512, 16384, "the CPU comparison of the 6·N·H·V issue"),
    "tiny": Shape("tiny H=32 V=512", 32, 512, "smoke tests"),
}

MASKS = ("full", "ragged")
LOGITS = ("flat", "peaked")


@dataclass(frozen=True)
class Case:
    """One batch to measure every provider on.

    ``group`` is "main" (the tables) or "sweep" (tokens grow until the reference runs
    out of memory); ``accuracy=False`` skips the fp32/fp64 reference (sweep points).
    """

    shape: str
    B: int  # pairs: 2B sequences
    T: int  # positions per sequence
    mask: str = "full"
    logits: str = "flat"
    seed: int = 0
    group: str = "main"
    accuracy: bool = True

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {sorted(SHAPES)}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {self.logits!r}")
        if self.B < 1 or self.T < 4:
            raise ValueError(f"need B >= 1 and T >= 4, got B={self.B}, T={self.T}")

    @property
    def H(self) -> int:
        return SHAPES[self.shape].H

    @property
    def V(self) -> int:
        return SHAPES[self.shape].V

    @property
    def N(self) -> int:
        """Positions in the batch, valid or not: 2B·T."""
        return 2 * self.B * self.T

    @property
    def id(self) -> str:
        tag = "" if self.group == "main" else f"-{self.group}"
        return f"{self.shape}-{self.B}x{self.T}-{self.mask}-{self.logits}{tag}"

    def to_dict(self) -> dict:
        return asdict(self)

    def child_seed(self, stream: str) -> int:
        """A seed per (case, stream), stable across runs and processes."""
        key = f"{self.seed}|{self.shape}|{self.B}|{self.T}|{self.mask}|{self.logits}|{stream}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def valid_mask(case: Case, device="cpu") -> torch.Tensor:
    """(2B, T) bool: which positions carry a target (see the module docstring)."""
    B, T = case.B, case.T
    if case.mask == "full":
        return torch.ones(2 * B, T, dtype=torch.bool, device=device)
    g = _generator("cpu", case.child_seed("mask"))
    prompt = T // 4
    lo, hi = T // 4, (3 * T) // 4
    lengths = torch.randint(lo, hi + 1, (2 * B,), generator=g)  # completion lengths, inclusive range
    pos = torch.arange(T)
    valid = (pos >= prompt) & (pos < prompt + lengths[:, None])
    return valid.to(device)


def zipf_log_prior(V: int, exponent: float = 1.0, device="cpu") -> torch.Tensor:
    """Zipf log-probabilities ``-exponent·log(rank)``, normalised; token id v has rank v+1.

    Id order stands for frequency order: BPE vocabularies are built by merge frequency,
    so low ids are roughly the frequent ones.
    """
    logp = -exponent * torch.log(torch.arange(1, V + 1, dtype=torch.float32, device=device))
    return logp - torch.logsumexp(logp, 0)


def flat_batch(case: Case, device="cpu"):
    """hidden ~ N(0, 1), weight ~ N(0, 0.02²), targets uniform over the vocabulary (fp32)."""
    g = _generator(device, case.child_seed("flat"))
    weight = torch.randn(case.V, case.H, generator=g, device=device) * SIGMA_W
    hidden = torch.randn(2 * case.B, case.T, case.H, generator=g, device=device)
    ids = torch.randint(0, case.V, (2 * case.B, case.T), generator=g, device=device)
    return weight, hidden, ids


@dataclass(frozen=True)
class PeakedParams:
    """The two calibrated knobs of ``logits="peaked"`` and what they achieved."""

    prior_scale: float  # a: logits get a·(centred Zipf log-prior), shared by all rows
    push: float  # m: each row's target logit is raised by m
    logp: float  # mean target log-prob on the calibration rows
    top1: float  # mean top-1 probability on the calibration rows


def calibrate_peaked(Z0, P, Q, y, iters: int = 40) -> PeakedParams:
    """Solve ``mean logp(a, m) = PEAKED_LOGP`` and ``mean top1(a, m) = PEAKED_TOP1``.

    The logits of the calibration rows are ``z = Z0 + a·P + m·Q`` (linear in both knobs),
    so with ``p = softmax(z)`` and ``k = argmax z`` the Jacobian is exact and cheap::

        d logp / d(a, m) = mean(P[y] − <p, P>,  Q[y] − <p, Q>)
        d top1 / d(a, m) = mean(p_k (P[k] − <p, P>),  p_k (Q[k] − <p, Q>))

    Damped Newton from (a, m) = (1, 5), both kept ≥ 0; a handful of steps. Where the
    targets cannot both be met the closest point found is returned (its achieved values
    are in the result).
    """
    target = torch.tensor([PEAKED_LOGP, PEAKED_TOP1], dtype=torch.float64)

    def evaluate(a, m):
        z = Z0 + a * P + m * Q
        lse = torch.logsumexp(z, -1, keepdim=True)
        p = torch.exp(z - lse)
        zmax, k = z.max(-1)
        logp = z.gather(1, y[:, None]).squeeze(1) - lse.squeeze(1)
        top1 = torch.exp(zmax - lse.squeeze(1))
        eP, eQ = p @ P, (p * Q).sum(-1)
        J = torch.stack(
            [
                torch.stack([(P[y] - eP).mean(), (1.0 - eQ).mean()]),  # Q[i, y_i] = 1 by construction
                torch.stack([(top1 * (P[k] - eP)).mean(), (top1 * (Q.gather(1, k[:, None]).squeeze(1) - eQ)).mean()]),
            ]
        ).double().cpu()
        F = torch.tensor([logp.mean().item(), top1.mean().item()], dtype=torch.float64) - target
        return F, J

    x = torch.tensor([1.0, 5.0], dtype=torch.float64)
    F, J = evaluate(*x.tolist())
    best = (F.norm().item(), x.clone(), F.clone())
    for _ in range(iters):
        if F.abs().max() < 1e-4:
            break
        step = torch.linalg.lstsq(J, -F[:, None]).solution.squeeze(1)
        scale = 1.0
        while scale > 1e-3:  # backtrack until the residual shrinks
            x_new = (x + scale * step).clamp(min=0.0)
            F_new, J_new = evaluate(*x_new.tolist())
            if F_new.norm() < F.norm():
                break
            scale *= 0.5
        x, F, J = x_new, F_new, J_new
        if F.norm().item() < best[0]:
            best = (F.norm().item(), x.clone(), F.clone())
    _, x, F = best
    achieved = (F + target).tolist()
    return PeakedParams(x[0].item(), x[1].item(), achieved[0], achieved[1])


def peaked_batch(case: Case, device="cpu", calibration_rows: int = 1024):
    """A batch whose softmax looks trained: Zipf prior + pushed targets (fp32).

    Construction (all rows share W; e is a random unit vector of R^H):

        W = Wn + a · P ⊗ e          Wn ~ N(0, 0.02²), P = centred Zipf log-prior (rank v+1)
        h = hn + e + m · D(y)        hn ~ N(0, 1) with hn ⟂ e;  D(y) = d / |d|², d = Wn[y] ⟂ e
        y ~ Zipf(1) over the vocabulary

    so ``z = W h = Wn·(hn + e) + a·P + m·(1 at y, small cross-talk elsewhere)``: every row
    sees the same frequency prior (``h·e = 1``) and its own target sits m above where the
    prior and the noise put it. (a, m) are solved on up to ``calibration_rows`` of the
    batch's own valid rows (:func:`calibrate_peaked`). Returns ``(weight, hidden, ids,
    params)``.
    """
    g = _generator(device, case.child_seed("peaked"))
    V, H, rows = case.V, case.H, 2 * case.B * case.T
    Wn = torch.randn(V, H, generator=g, device=device) * SIGMA_W
    e = torch.randn(H, generator=g, device=device)
    e = e / e.norm()
    P = zipf_log_prior(V, device=device)
    P = P - P.mean()  # softmax ignores the shift; centring keeps W's e-component small
    y = torch.multinomial(zipf_log_prior(V, device=device).exp(), rows, replacement=True, generator=g)
    h0 = torch.randn(rows, H, generator=g, device=device)
    h0 = h0 - (h0 @ e)[:, None] * e + e
    d = Wn[y]
    d = d - (d @ e)[:, None] * e  # the push leaves h·e (the prior term) alone
    D = d / (d * d).sum(1, keepdim=True)  # Wn[y]·D = d·D = 1

    valid = valid_mask(case, device).reshape(-1).nonzero().squeeze(1)
    pick = torch.randperm(valid.numel(), generator=g, device=device)[:calibration_rows]
    cal = valid[pick]
    params = calibrate_peaked(h0[cal] @ Wn.t(), P, D[cal] @ Wn.t(), y[cal])

    weight = Wn + params.prior_scale * P[:, None] * e[None, :]
    hidden = (h0 + params.push * D).view(2 * case.B, case.T, H)
    return weight, hidden, y.view(2 * case.B, case.T), params


class Batch(NamedTuple):
    weight: torch.Tensor  # (V, H)
    hidden: torch.Tensor  # (2B, T, H)
    target: torch.Tensor  # (2B, T) int64, IGNORE_INDEX on prompt and padding
    peaked: PeakedParams | None  # the calibration of logits="peaked"


def make_batch(case: Case, device="cpu", dtype=torch.float32) -> Batch:
    """The case's seeded batch in ``dtype`` on ``device``."""
    device = torch.device(device)
    params = None
    if case.logits == "flat":
        weight, hidden, ids = flat_batch(case, device)
    else:
        weight, hidden, ids, params = peaked_batch(case, device)
    target = torch.where(valid_mask(case, device), ids, IGNORE_INDEX)
    return Batch(weight.to(dtype).contiguous(), hidden.to(dtype).contiguous(), target, params)


@torch.no_grad()
def softmax_stats(weight, hidden, target, rows_per_chunk: int | None = None) -> tuple[float, float]:
    """Mean target log-prob and mean top-1 probability over the valid tokens (fp32)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = target.reshape(-1)
    idx = (y != IGNORE_INDEX).nonzero().squeeze(1)
    V = weight.shape[0]
    step = rows_per_chunk or max(1, (256 * 2**20) // (4 * V))
    w = weight.float()
    logp_sum = top1_sum = 0.0
    for start in range(0, idx.numel(), step):
        sl = idx[start : start + step]
        z = h[sl].float() @ w.t()
        lse = torch.logsumexp(z, -1)
        logp_sum += (z.gather(1, y[sl][:, None]).squeeze(1) - lse).sum().item()
        top1_sum += torch.exp(z.max(-1).values - lse).sum().item()
    n = max(1, idx.numel())
    return logp_sum / n, top1_sum / n


# ---------------------------------------------------------------------------------------
# Presets: which cases a run measures, in priority order (a time budget cuts the tail).
# ---------------------------------------------------------------------------------------

REAL_SHAPES = ("llama3-8b", "qwen2.5-7b", "gemma2-2b", "qwen2.5-0.5b", "mistral-7b")
VARIANTS = tuple((m, l) for m in MASKS for l in LOGITS)  # full-flat, full-peaked, ragged-flat, ragged-peaked
KEY_VARIANTS = (("full", "flat"), ("ragged", "peaked"))  # the two ends: untrained & dense, trained & real


def _grid(shapes, batches, variants, group="main", accuracy=True):
    return [
        Case(s, B, T, mask, logits, group=group, accuracy=accuracy)
        for s in shapes
        for (B, T) in batches
        for (mask, logits) in variants
    ]


def _sweep(shape, T, pair_counts):
    return [Case(shape, B, T, "full", "flat", group="sweep", accuracy=False) for B in pair_counts]


def preset_cases(preset: str) -> list[Case]:
    """The case list of a preset.

    * ``quick``: CPU stand-ins (2 pairs × 128 positions) in all four variants, plus a
      token sweep; a couple of minutes on 2 cores.
    * ``gpu``: in priority order for one ~6-minute slot on an H100/H200
      (``benchmarks/gpu_suite.sh``, whose time budget cuts the tail): Llama-3-8B at 4×2048
      in all four variants, a Llama-3-8B token sweep (1 to 16 pairs of 2048), the other
      four heads at 4×2048 in the two key variants (full/flat, ragged/peaked), then
      2×1024 and the remaining variants.
    * ``full``: every head × {4×2048, 2×1024} × every variant, and the sweep to 32 pairs.
    * ``cpu-check``: the CPU side-by-side of the 6·N·H·V issue — H = 512, V = 16,384, 2,048
      positions as 4 pairs × 256 and 1 pair × 1024, full and ragged masks (run it with
      ``--isolate none`` for times taken side by side in one process, in fp32 and bf16).
    """
    if preset == "quick":
        return _grid(("standin-8k", "standin-16k"), [(2, 128)], VARIANTS) + _sweep("standin-8k", 128, (1, 2, 4, 8))
    if preset == "gpu":
        first = _grid(("llama3-8b",), [(4, 2048)], VARIANTS)
        others = [s for s in REAL_SHAPES if s != "llama3-8b"]
        second = _grid(others, [(4, 2048)], KEY_VARIANTS)
        sweep = _sweep("llama3-8b", 2048, (1, 2, 8, 16))
        small = _grid(REAL_SHAPES, [(2, 1024)], KEY_VARIANTS)
        rest = _grid(others, [(4, 2048)], [v for v in VARIANTS if v not in KEY_VARIANTS])
        return first + sweep + second + small + rest
    if preset == "full":
        return _grid(REAL_SHAPES, [(4, 2048), (2, 1024)], VARIANTS) + _sweep("llama3-8b", 2048, (1, 2, 8, 16, 32))
    if preset == "cpu-check":
        return _grid(("cpu-h512",), [(4, 256), (1, 1024)], (("full", "flat"), ("ragged", "flat")))
    if preset == "smoke":
        return [Case("tiny", 2, 16, "ragged", "peaked"), Case("tiny", 1, 16, "full", "flat", group="sweep", accuracy=False)]
    raise ValueError(f"unknown preset {preset!r}; known: {PRESETS}")


PRESETS = ("quick", "gpu", "full", "smoke", "cpu-check")


def select(cases, shapes=None, masks=None, logits=None, batches=None, groups=None):
    """Filter a case list by the CLI's --shapes/--masks/--logits/--batches/--groups."""
    out = []
    for c in cases:
        if shapes and c.shape not in shapes:
            continue
        if masks and c.mask not in masks:
            continue
        if logits and c.logits not in logits:
            continue
        if batches and f"{c.B}x{c.T}" not in batches and c.group == "main":
            continue
        if groups and c.group not in groups:
            continue
        out.append(c)
    return out


__all__ = [
    "Case",
    "IGNORE_INDEX",
    "LOGITS",
    "MASKS",
    "PEAKED_LOGP",
    "PEAKED_TOP1",
    "PRESETS",
    "PeakedParams",
    "SHAPES",
    "Shape",
    "calibrate_peaked",
    "Batch",
    "make_batch",
    "preset_cases",
    "select",
    "softmax_stats",
    "valid_mask",
    "zipf_log_prior",
]
