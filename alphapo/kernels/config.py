"""One fixed launch configuration per kernel, dtype class and GPU family.

A configuration is the GEMM tile each kernel computes: ``block_m`` output rows (tokens),
``block_n`` output columns (vocabulary for the forward and ``dz`` kernels, hidden for
``grad_h``), ``block_k`` the reduction step (hidden, or vocabulary for ``grad_h``).

Choices (to be re-measured on the lent GPUs; see the GPU performance issues):

* sm_90 (H100/H200), 16-bit: 128×128×64, 8 warps, 3 stages (the forward kernels: 128×64×64,
  see ``_FWD_16``) — the pointer-based ``tl.dot`` tile that DESIGN.md §3 measured at
  0.81–0.85× cuBLAS; 96 KiB of shared memory for the
  three stages of the A and B tiles, well under the 227 KiB limit, and a 128×128 float32
  accumulator over 256 threads (64 registers each), leaving room for the epilogue.
* sm_80 (A100) and other pre-Hopper parts, 16-bit: 128×128×32, 8 warps, 3 stages — half
  the K step keeps three stages inside the smaller shared memory with headroom.
* float32 inputs (any GPU): 64×64×32, 4 warps, 2 stages — exact float32 products
  (``input_precision="ieee"``) run on the FMA units, where big tiles only add registers
  (sm_80's backward tiles take 32 rows: see the entry).
* Gradient filtering needs the ``dz`` and ``grad_h`` tiles to share their rows and the
  ``dz`` tile's columns to hold whole ``grad_h`` K-steps; every entry satisfies that.
* Triton's CPU interpreter: 16×32×16 — the smallest tiles ``tl.dot`` accepts, since the
  interpreter's cost is per masked element, not per launch.

Autotuning is not used: each entry is fixed, so launches are reproducible and cheap.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


KERNELS = ("fwd", "fwd_tma", "dz", "grad_h")
# The elementwise dz kernel of the pair-chunked path (no GEMM): block_m × block_n tiles,
# block_k rows swept per program (so its bias partials are few).
TILE_KERNEL = "dz_tile"

# Which forward kernel each family runs: the pointer-based one everywhere until the TMA
# persistent kernel is measured against it on a lent Hopper GPU (GPU performance issue I);
# ALPHAPO_FWD_IMPL=tma selects it for that measurement.
FWD_IMPL = {"sm90": "pointer", "sm80": "pointer", "interpreter": "pointer"}
# Forward work items per SM: a plain grid leaves balancing to the hardware scheduler (2
# waves); a persistent grid loops over items itself, and a whole split per item makes the
# last wave's imbalance cost ~1/(2·waves) on average, hence more, smaller items.
GRID_WAVES = 2
PERSISTENT_WAVES = 8

# (family, dtype class) -> kernel -> config
# fwd / fwd_store: the forward, and the one that also stores each logit tile (pair-chunked
# path). Besides the log-sum-exp it folds the metrics' statistics (Σ e·z, Σ e², the max
# before the target), which keep more tiles live: at 128×128 ptxas (Triton 3.9) spilled
# 44-128 bytes on sm_90 and 584-1284 on sm_80, at 128×64×64 (8 warps, 3 stages, 72 KiB of
# shared memory) nothing on either. float32 (64×64×32 spilled 60 and 244 bytes) takes
# 32×64×32. Every shipped variant also compiles without spills, and with tensor-core
# instructions for 16-bit inputs, under Triton 3.6 (the lent GPUs' image; checked with its
# wheel and alphapo.kernels.aot, 2026-12-02). Whether a separate pass over the stored tile for those statistics beats the
# narrower tile is for a lent GPU to measure (docs/perf-notes.md).
_FWD_16 = LaunchConfig(128, 64, 64, 8, 3)
_FWD_32 = LaunchConfig(32, 64, 32, 4, 2)
# dz_tile on GPUs: 16 × 512 tiles over 4 warps (64 elements a thread, one exp each),
# 256 rows a program: at 4,096 tokens × 128,256 vocabulary, 16 × 251 programs.
_DZ_TILE = LaunchConfig(16, 512, 256, 4, 1)

CONFIGS: dict[tuple[str, str], dict[str, LaunchConfig]] = {
    ("sm90", "16bit"): {**{k: LaunchConfig(128, 128, 64, 8, 3) for k in KERNELS},
                        "fwd": _FWD_16, "fwd_store": _FWD_16, TILE_KERNEL: _DZ_TILE},
    ("sm80", "16bit"): {**{k: LaunchConfig(128, 128, 32, 8, 3) for k in KERNELS},
                        "fwd": _FWD_16, "fwd_store": _FWD_16, TILE_KERNEL: _DZ_TILE},
    ("sm90", "fp32"): {**{k: LaunchConfig(64, 64, 32, 4, 2) for k in KERNELS},
                       "fwd": _FWD_32, "fwd_store": _FWD_32, TILE_KERNEL: _DZ_TILE},
    # sm_80 float32: the dz kernel with a bias and gradient filtering spilled 8 bytes at
    # 64 rows, grad_h 36 bytes at 32×64: 32-row tiles (equal rows, as filtering needs) do not.
    ("sm80", "fp32"): {
        "fwd": _FWD_32,
        "fwd_tma": LaunchConfig(64, 64, 32, 4, 2),
        "dz": LaunchConfig(32, 64, 32, 4, 2),
        "grad_h": LaunchConfig(32, 32, 32, 4, 2),
        "fwd_store": _FWD_32,
        TILE_KERNEL: _DZ_TILE,
    },
    ("interpreter", "16bit"): {**{k: LaunchConfig(16, 32, 16, 1, 1) for k in (*KERNELS, "fwd_store")},
                               TILE_KERNEL: LaunchConfig(16, 32, 32, 1, 1)},
    ("interpreter", "fp32"): {**{k: LaunchConfig(16, 32, 16, 1, 1) for k in (*KERNELS, "fwd_store")},
                              TILE_KERNEL: LaunchConfig(16, 32, 32, 1, 1)},
}


def gpu_family(device: torch.device) -> str:
    """"sm90" for Hopper and newer, "sm80" before it, "interpreter" off-GPU."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def launch_config(device: torch.device, dtype: torch.dtype, kernel: str) -> LaunchConfig:
    return CONFIGS[(gpu_family(device), dtype_class(dtype))][kernel]
