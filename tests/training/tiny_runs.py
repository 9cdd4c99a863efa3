"""Tiny training runs for the trainer's tests: a config of ~20k parameters and what to read back.

A run of this size takes a fraction of a second per step on one CPU thread.
"""

from __future__ import annotations

from alphapo.training.config import TrainConfig

# A tiny, fast configuration: ~20k parameters, 8 pairs a step, no progress bar.
TINY = dict(train_size=256, eval_size=32, n_layer=1, n_embd=32, n_head=2, batch_size=8, eval_batch_size=16,
            max_steps=4, warmup_steps=2, eval_every=2, save_every=2, log_every=1, progress=False, plot=False)


def tiny_config(tmp_path, name="run", **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **overrides})


def quiet(*args):
    pass


def params_of_dir(ckpt):
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


def params_of(run_dir):
    """The parameters of a run's latest checkpoint."""
    return params_of_dir(run_dir / (run_dir / "latest").read_text().strip())


def flags(values: dict) -> list[str]:
    """Command-line flags for knob values."""
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        out += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return out
