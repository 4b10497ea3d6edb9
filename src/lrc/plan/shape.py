"""The shapes a plan reads, from configs alone: teacher and exported student counted on the meta device, the
student's dimensions (`Shape`), and which projections are generated or factored."""

from __future__ import annotations

from dataclasses import dataclass

from lrc.model.clone import student_config, teacher_head_dim
from lrc.model.costs import choose_projections, role_outs
from lrc.model.families import ROLES
from lrc.model.meta import meta_model, parameter_count, tied_head
from lrc.model.precision import checkpoint_dtype, dtype_name


@dataclass(frozen=True)
class Shape:
    """The teacher's dimensions and the student width: everything the cost and memory models read."""

    layers: int
    d_t: int
    d_s: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    ffn_s: int | None = None
    """The student's FFN width M when it has its own projection Q (`--ffn-size`); None: the teacher's."""
    t_layers: int | None = None
    """The teacher's layers when the student keeps fewer (`--layers`); None: `layers`, the student's."""

    @property
    def student_ffn(self) -> int:
        return self.ffn if self.ffn_s is None else self.ffn_s

    @property
    def teacher_layers(self) -> int:
        return self.layers if self.t_layers is None else self.t_layers

    @property
    def role_outs(self) -> dict[str, int]:
        """The `out` of each role in the cost model (as `LowRankClone.plan_projections`), head included."""
        return role_outs(self.heads, self.kv_heads, self.head_dim, self.ffn, self.vocab)


def student_meta(teacher_meta, hidden_size: int, rms_norm_eps: float | None = None, ffn_size: int | None = None,
                 kept_layers=None):
    """The exported student (the config `export` writes, `lrc.model.clone.student_config`) on the meta device."""
    return meta_model(student_config(teacher_meta, hidden_size, rms_norm_eps, ffn_size, kept_layers))


_COUNTS: dict[tuple, tuple[int, int, bool]] = {}


def param_counts(teacher_config, hidden_size: int, rms_norm_eps, ffn_size, kept) -> tuple[int, int, bool]:
    """(teacher parameters, exported student parameters, tied head), counted on the meta device once per
    shape (`lrc plan --gpus` plans many option changes of one run)."""
    key = (teacher_config.to_json_string(use_diff=False), hidden_size, rms_norm_eps, ffn_size, kept)
    if key not in _COUNTS:
        t_meta = meta_model(teacher_config)
        s_meta = student_meta(t_meta, hidden_size, rms_norm_eps, ffn_size, kept)
        _COUNTS[key] = (parameter_count(t_meta), parameter_count(s_meta), tied_head(t_meta))
    return _COUNTS[key]


def teacher_dtype_name(config, teacher_dtype: str) -> str:
    if teacher_dtype != "auto":
        return teacher_dtype
    return dtype_name(checkpoint_dtype(config))


def shape_of(config, hidden_size: int, tied: bool, ffn_size: int | None = None,
             layers: int | None = None) -> Shape:
    n = config.num_hidden_layers
    return Shape(layers=layers or n, d_t=config.hidden_size, d_s=hidden_size,
                 heads=config.num_attention_heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                 head_dim=teacher_head_dim(config), ffn=config.intermediate_size, vocab=config.vocab_size,
                 tied=tied, ffn_s=ffn_size, t_layers=n if layers and layers != n else None)


def choose_roles(shape: Shape, tokens_per_micro_batch: int, reuse: int, sharded: bool) -> dict[str, str]:
    """generated / factored per role, as `LowRankClone.plan_projections` decides (never factored when sharded)."""
    if sharded:
        return {r: "generated" for r in shape.role_outs}
    roles = choose_projections(shape.role_outs, tokens_per_micro_batch, shape.d_t, shape.d_s, reuse)
    if shape.ffn_s is not None:  # Q^T W P: always generated (`LowRankClone.plan_projections`)
        roles.update({r: "generated" for r in ("gate", "up", "down")})
    return roles


def trainable_params(shape: Shape) -> int:
    """Projections (7 per layer and an FFN projection Q, the embedding's, an untied head's) and the student's
    RMSNorm gains."""
    proj = shape.d_t * shape.d_s
    q = 0 if shape.ffn_s is None else shape.ffn * shape.ffn_s
    return (shape.layers * (len(ROLES) * proj + q + 2 * shape.d_s) + proj + (0 if shape.tied else proj)
            + shape.d_s)
