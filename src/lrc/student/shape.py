"""The student's shape from the options: `--ffn-size`, `--layers` / `--drop-layers`, and `--target-params`.

Everything here reads only the teacher's config (no weights): `check_shape` rejects impossible shapes before
anything is loaded, `resolve_target` turns `--target-params N` into a hidden size (and, with `--target-dims`,
an FFN width and a depth), `describe` says what was chosen. Which layers `--layers K` keeps is measured on
calibration data later (`lrc.student.select.choose_layers`) and recorded in the run's config as `drop_layers`.

Parameter counts are exact: `param_counter` builds the exported student on the meta device at a few tiny
probe shapes and reads off the coefficients of count = K (a h + b m + c h m + d) + e h + f (h hidden, m FFN
width, K layers), which holds for every supported family (biases and per-head norms land in a, b, d; the
embedding and an untied head in e).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lrc.config import RunConfig
from lrc.errors import UserError
from lrc.model.clone import student_config_for
from lrc.model.meta import config_is_tied, meta_model, parameter_count

TARGET_DIMS = ("hidden", "ffn", "layers")
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def multiple_for(width: int) -> int:
    """The granule a solved width is rounded to: 128 for wide teachers, 64 for middling, 8 for toy ones."""
    return 128 if width >= 2048 else 64 if width >= 512 else 8


def dropped_layers(cfg: RunConfig) -> list[int] | None:
    """--drop-layers as a list of ints (None: not given); UserError on anything but comma-separated integers."""
    if cfg.student.drop_layers is None:
        return None
    text = str(cfg.student.drop_layers).strip()
    if not text:
        return []
    try:
        return sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise UserError(f"--drop-layers {cfg.student.drop_layers!r} must be comma-separated layer indices, "
                        "e.g. 2,5") from None


def kept_layers(cfg: RunConfig, n_layers: int) -> tuple[int, ...] | None:
    """The teacher layers the student keeps (None: all), from --drop-layers."""
    dropped = dropped_layers(cfg)
    if not dropped:
        return None
    return tuple(i for i in range(n_layers) if i not in dropped)


def needs_layer_choice(cfg: RunConfig) -> bool:
    """--layers K without --drop-layers: which layers to keep is measured on calibration data."""
    return cfg.student.layers is not None and cfg.student.drop_layers is None


def student_layers(cfg: RunConfig, n_layers: int) -> int:
    kept = kept_layers(cfg, n_layers)
    return cfg.student.layers if cfg.student.layers is not None else len(kept) if kept is not None else n_layers


def check_shape(cfg: RunConfig, teacher_config) -> None:
    """UserError (one line) unless --hidden-size, --ffn-size, --layers and --drop-layers fit this teacher."""
    d_t, d_ff, n = teacher_config.hidden_size, teacher_config.intermediate_size, teacher_config.num_hidden_layers
    if cfg.student.hidden_size is not None and not 0 < cfg.student.hidden_size <= d_t:
        raise UserError(f"--hidden-size {cfg.student.hidden_size} is out of range: it must be between 1 and the "
                        f"teacher's "
                        f"hidden size {d_t}")
    if cfg.student.ffn_size is not None and not 0 < cfg.student.ffn_size <= d_ff:
        raise UserError(f"--ffn-size {cfg.student.ffn_size} is out of range: it must be between 1 and the teacher's "
                        f"intermediate size {d_ff}")
    if cfg.student.layers is not None and not 0 < cfg.student.layers <= n:
        raise UserError(f"--layers {cfg.student.layers} is out of range: it must be between 1 and the teacher's {n} "
                        f"layers")
    dropped = dropped_layers(cfg)
    if dropped is not None:
        bad = [i for i in dropped if not 0 <= i < n]
        if bad:
            raise UserError(f"--drop-layers {bad[0]} is not a layer of the teacher: its layers are 0 to {n - 1}")
        if len(dropped) >= n:
            raise UserError(f"--drop-layers drops all {n} layers of the teacher; keep at least one")
        if cfg.student.layers is not None and cfg.student.layers != n - len(dropped):
            raise UserError(f"--layers {cfg.student.layers} contradicts --drop-layers {cfg.student.drop_layers} "
                            f"({n - len(dropped)} "
                            f"of {n} layers kept); give one of them")


def parse_target(text: str, teacher_params: int) -> int:
    """'1.5B', '350M', '120000000' or '35%' (of the teacher's parameters) -> a parameter count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%|[kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise UserError(f"--target-params {text!r} is not a size; write e.g. 1.5B, 350M, 120000000 or 35%")
    value, unit = float(m.group(1)), m.group(2).upper()
    count = value / 100 * teacher_params if unit == "%" else value * _SUFFIX[unit]
    if not 0 < count <= teacher_params:
        raise UserError(f"--target-params {text} is {count:,.0f} parameters; it must be positive and at most the "
                        f"teacher's {teacher_params:,}")
    return int(count)


@dataclass(frozen=True)
class Counter:
    """count(h, m, K) = K (a h + b m + c h m + d) + e h + f: the exported student's parameters."""

    a: int
    b: int
    c: int
    d: int
    e: int
    f: int
    embedding_per_hidden: int
    """Parameters of the embedding (and an untied head) per unit of hidden width."""

    def __call__(self, hidden: int, ffn: int, layers: int) -> int:
        return layers * (self.a * hidden + self.b * ffn + self.c * hidden * ffn + self.d) + self.e * hidden + self.f

    def non_embedding(self, hidden: int, ffn: int, layers: int) -> int:
        return self(hidden, ffn, layers) - self.embedding_per_hidden * hidden


def param_counter(teacher_config) -> Counter:
    """The exact parameter count of a student of this teacher as a function of its shape (see module doc)."""
    tied = config_is_tied(teacher_config)

    def count(h, m, k):
        return parameter_count(meta_model(student_config_for(teacher_config, tied, h, None, m, range(k))))

    layer = {(h, m): count(h, m, 2) - count(h, m, 1) for h in (1, 2) for m in (1, 2)}
    c = layer[2, 2] - layer[2, 1] - layer[1, 2] + layer[1, 1]
    a = layer[2, 1] - layer[1, 1] - c
    b = layer[1, 2] - layer[1, 1] - c
    d = layer[1, 1] - a - b - c
    glob = {h: count(h, 1, 1) - layer[h, 1] for h in (1, 2)}
    e = glob[2] - glob[1]
    f = glob[1] - e
    vocab = teacher_config.vocab_size
    return Counter(a, b, c, d, e, f, embedding_per_hidden=vocab * (1 if tied else 2))


def _round_to(x: float, granule: int, hi: int) -> int:
    return int(min(hi, max(granule, granule * round(x / granule))))


@dataclass(frozen=True)
class Solution:
    hidden: int
    ffn: int
    layers: int
    params: int
    target: int


def solve(teacher_config, target: int, dims: tuple[str, ...], *, hidden: int | None = None,
          ffn: int | None = None, layers: int | None = None,
          count: Callable[[int, int, int], int] | None = None) -> Solution:
    """The shape with about `target` parameters, shrinking `dims` (the others stay as given, default the
    teacher's). FFN width and depth, where asked, shrink by a common factor r from the teacher's (widths
    rounded to `multiple_for`, layers to an integer >= 1); the hidden size is then the multiple closest to
    the target. Of the shapes within 2% of the target, the one whose hidden size shrank most like r wins
    (a balanced student); else the closest. `count`: what is counted (default: every exported parameter)."""
    d_t, d_ff, n = teacher_config.hidden_size, teacher_config.intermediate_size, teacher_config.num_hidden_layers
    count = count or param_counter(teacher_config)
    g_h, g_f = multiple_for(d_t), multiple_for(d_ff)
    hiddens = sorted({*range(g_h, d_t + 1, g_h), d_t}) if "hidden" in dims else [hidden or d_t]
    others = {(_round_to(r * d_ff, g_f, d_ff) if "ffn" in dims else ffn or d_ff,
               max(1, min(n, round(r * n))) if "layers" in dims else layers or n, r)
              for r in (step / 400 for step in range(1, 401))}
    best, best_key = None, None
    for m, k, r in others:
        h = min(hiddens, key=lambda x: (abs(count(x, m, k) - target), -x))
        err = abs(count(h, m, k) - target) / target
        balance = abs(h / d_t - r) if "hidden" in dims and len(dims) > 1 else 0.0
        key = (err > 0.02, balance if err <= 0.02 else 0.0, err, -h, -k, -m)
        if best_key is None or key < best_key:
            best, best_key = (h, m, k), key
    assert best is not None
    return Solution(*best, count(*best), target)


def resolve_target(cfg: RunConfig, teacher_config) -> tuple[RunConfig, Solution | None]:
    """cfg with the shape --target-params asks for filled in (unchanged without it), and the solution.

    A dimension that --target-dims solves may also be given explicitly only with the solved value (a resumed
    run's saved config holds both)."""
    if cfg.student.target_params is None:
        return cfg, None
    dims = tuple(d.strip() for d in str(cfg.student.target_dims).split(",") if d.strip())
    unknown = [d for d in dims if d not in TARGET_DIMS]
    if unknown or not dims:
        raise UserError(f"--target-dims {cfg.student.target_dims!r}: choose comma-separated from "
                        f"{', '.join(TARGET_DIMS)}")
    if "hidden" not in dims and cfg.student.hidden_size is None:
        raise UserError("--target-dims without hidden needs --hidden-size (or add hidden to --target-dims)")
    check_shape(cfg, teacher_config)
    n = teacher_config.num_hidden_layers
    counter = param_counter(teacher_config)
    teacher_params = parameter_count(meta_model(teacher_config))
    target = parse_target(cfg.student.target_params, teacher_params)
    k_given = None if cfg.student.layers is None and cfg.student.drop_layers is None else student_layers(cfg, n)
    sol = solve(teacher_config, target, dims, hidden=cfg.student.hidden_size, ffn=cfg.student.ffn_size, layers=k_given,
                count=counter)
    if abs(sol.params - target) > 0.1 * target:
        raise UserError(f"--target-params {cfg.student.target_params} ({target:,}) is out of reach by shrinking "
                        f"{', '.join(dims)}: the closest student has {sol.params:,} parameters; shrink more "
                        "dimensions (--target-dims) or choose another target")
    solved = {"hidden_size": sol.hidden,
              "ffn_size": sol.ffn if sol.ffn < teacher_config.intermediate_size else None,
              "layers": sol.layers if sol.layers < n else None}
    flags = {"hidden_size": "hidden", "ffn_size": "ffn", "layers": "layers"}
    for name, dim in flags.items():
        given = cfg.get(name)
        if dim in dims and given is not None and given != solved[name]:
            raise UserError(f"--{name.replace('_', '-')} {given} and --target-params {cfg.student.target_params} "
                            f"both set "
                            f"it (the target solves {solved[name]}); drop one of them")
        if dim in dims and name == "layers" and cfg.student.drop_layers is not None and sol.layers != k_given:
            raise UserError("--drop-layers and --target-dims layers both set the depth; drop one of them")
    updates: dict[str, Any] = {name: solved[name] for name, dim in flags.items() if dim in dims}
    return cfg.replace(**updates), sol


def describe(cfg: RunConfig, teacher_config, params: int | None = None) -> str:
    """'hidden 128, FFN 384 of 512, 3 of 4 layers (dropped 2)': the student's shape for start-up lines."""
    n = teacher_config.num_hidden_layers
    parts = [f"hidden {cfg.student.hidden_size} of {teacher_config.hidden_size}"]
    if cfg.student.ffn_size is not None:
        parts.append(f"FFN {cfg.student.ffn_size} of {teacher_config.intermediate_size}")
    k = student_layers(cfg, n)
    if k != n:
        dropped = dropped_layers(cfg)
        parts.append(f"{k} of {n} layers" + (f" (dropped {', '.join(map(str, dropped))})" if dropped else
                                            " (chosen by importance on calibration data)"))
    if params is not None:
        parts.append(f"{params:,} parameters")
    return ", ".join(parts)

