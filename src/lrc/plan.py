"""`lrc plan`: what an `lrc distill` run will cost, from the teacher's config.json alone.

Nothing is loaded: the teacher and the exported student are built on the meta device (no memory) to count
their parameters, and everything else follows from the shapes and the run's options. `lrc distill` prints
the same forecast in one line at start-up (`startup_summary`).

Memory is modelled per process as what is alive at a few moments of a run; the plan reports the largest
(`Plan.peak_bytes`) with the parts alive then (`Plan.memory`):

* ``loss``: the chunked CE + KL of a micro-batch, at the end of its forward, from the second optimizer step
  on (AdamW's moments exist; the gradients do not yet, `zero_grad(set_to_none=True)`). Alive: the teacher,
  projections and moments, the generated student weights, every tensor autograd saved for the backward
  (student activations and the teacher's clone targets), the loss's gradient buffers and its (chunk x V)
  logits, and the teacher head cast to fp32 where it is stored lower (or gathered, under fsdp).
* ``backward``: the start of that backward (the head's gradient is scaled and sent back).
* ``optimizer``: the optimizer step (gradients and both moments; with gradient accumulation the step's
  generated leaves and their gradients, which live until `train_step` returns).
* ``end``: the last held-out evaluation and the checkpoint written after the last step.
* ``load``: the teacher's shards read by each process (`--parallel fsdp` only; host memory, not the GPU's:
  the teacher is built on the meta device and each process reads only its own rows of the safetensors files).

The activation counts follow the autograd graph of the code as written (`activation_bytes`; tests/test_plan.py
checks them against the tensors autograd really saves). Two constants were measured on CPU with
`benchmarks/plan_accuracy.py`, which compares this forecast with the peak RSS of real `lrc distill` runs:
`RUNTIME_BYTES` (what is not a tensor of the run) and `CPU_HEAP_SLACK` (glibc keeps freed heap memory
resident; with MALLOC_MMAP_THRESHOLD_ set, large blocks are mmapped and returned, and there is no slack).
On 40 calibration runs (hidden 256-2048, 2-6 layers, vocabularies 16K-128K, bf16/fp32 teachers, accumulation
1 and 2, fp32) the forecast was within 3% of the measured peak with a fixed mmap threshold and within 8%
with glibc's default, except one small-matrix shape with accumulation where glibc kept 2-3x more (-24%).
GPU memory is not calibrated.

FLOPs follow `lrc.costs` (the generated-vs-factored cost model) with the generated/factored choice per role that
`LowRankClone.plan_projections` makes, plus attention scores, which the cost model leaves out.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from lrc.config import RunConfig
from lrc.errors import UserError
from lrc.families import ROLES, family_for
from lrc.precision import resolve_precision

GiB = 1 << 30
MiB = 1 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Resident memory that is not a tensor of the run: Python, torch, transformers and lrc imported, a tokenizer and
# a token cache read. Measured on CPU (Linux, torch 2.13, transformers 5) at 370-400 MiB; on CUDA the figure
# stands for the CUDA context and kernels, which live outside PyTorch's allocator (not measured here).
RUNTIME_BYTES = {"cpu": 390 * MiB, "cuda": 500 * MiB}
# glibc heap slack on CPU, as a share of a step's activations and generated weights: measured 0.45-1.0 with
# Llama-3.2-1B-shaped layers (hidden 2048, FFN 8192, 2-6 layers; benchmarks/plan_accuracy.py), up to 2.7 with
# smaller matrices under gradient accumulation
CPU_HEAP_SLACK = 0.7
DEFAULT_MFU = 0.4
PHASES = ("loss", "backward", "optimizer", "end", "load")
# The baselines train an ordinary model; their memory is not modelled (yet).
MODELLED_METHODS = ("lrc",)


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
        hq, hk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q": hq, "k": hk, "v": hk, "o": hq, "gate": self.ffn, "up": self.ffn, "down": self.ffn,
                "head": self.vocab}


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    teacher: str
    family: str
    shape: Shape
    teacher_params: int
    student_params: int
    trainable_params: int
    student_shape: str
    """The student's shape in words (`lrc.sizing.describe`)."""
    teacher_dtype: str
    precision: str
    device: str
    nproc: int
    parallel: str
    sharded: bool
    batch_size: int
    seq_len: int
    grad_accum: int
    chunk_size: int
    grad_checkpointing: bool
    roles: dict[str, str]
    memory: list[Part]
    """The parts alive at the peak (what `peak_bytes` sums)."""
    peak_bytes: int
    peak_phase: str
    phases: dict[str, int]
    """Modelled total of every phase (see the module docstring)."""
    activations: dict[str, int]
    """Activation bytes (student + teacher) without and with --grad-checkpointing."""
    peak_other_checkpointing: int
    """The peak with --grad-checkpointing toggled (the other setting than this run's)."""
    flops: dict[str, float]
    """FLOPs per trained token, by part (per process; multiply by tokens for a step)."""
    flops_per_token: float
    device_tflops: float | None = None
    mfu: float = DEFAULT_MFU
    tokens_per_s: float | None = None
    """Per process; the whole run processes nproc times as many."""
    notes: list[str] = field(default_factory=list)
    budget_tokens: int | None = None
    """The run's training tokens (--max-tokens, or --max-steps x tokens per step; the smaller), None without
    a budget."""
    hours: float | None = None
    """budget_tokens at tokens_per_s on all processes, in hours (None without both)."""

    @property
    def student_share(self) -> float:
        return self.student_params / self.teacher_params

    def to_dict(self) -> dict:
        d = asdict(self)
        d["student_share"] = self.student_share
        d["tokens_per_s_all_processes"] = None if self.tokens_per_s is None else self.tokens_per_s * self.nproc
        return d


# ---------------------------------------------------------------------------------------------- config
def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head is counted once


def _is_tied_meta(model) -> bool:
    fam = family_for(model.config)
    return model.get_submodule(fam.head).weight is model.get_submodule(f"{fam.base}.{fam.embed}").weight


def student_meta(teacher_meta, hidden_size: int, rms_norm_eps: float | None = None, ffn_size: int | None = None,
                 kept_layers=None):
    """The exported student (the config `export` writes, `lrc.clone.student_config`) on the meta device."""
    from lrc.clone import student_config

    return _meta_model(student_config(teacher_meta, hidden_size, rms_norm_eps, ffn_size, kept_layers))


_COUNTS: dict[tuple, tuple[int, int, bool]] = {}


def _param_counts(teacher_config, hidden_size: int, rms_norm_eps, ffn_size, kept) -> tuple[int, int, bool]:
    """(teacher parameters, exported student parameters, tied head), counted on the meta device once per
    shape (`lrc plan --gpus` plans many option changes of one run)."""
    key = (teacher_config.to_json_string(use_diff=False), hidden_size, rms_norm_eps, ffn_size, kept)
    if key not in _COUNTS:
        t_meta = _meta_model(teacher_config)
        s_meta = student_meta(t_meta, hidden_size, rms_norm_eps, ffn_size, kept)
        _COUNTS[key] = (_count(t_meta), _count(s_meta), _is_tied_meta(t_meta))
    return _COUNTS[key]


def teacher_dtype_name(config, teacher_dtype: str) -> str:
    if teacher_dtype != "auto":
        return teacher_dtype
    from lrc.precision import checkpoint_dtype, dtype_name

    return dtype_name(checkpoint_dtype(config))


def resolve_device(spec: str) -> str:
    """"cpu" or "cuda" for --device, as `lrc distill` picks it, without initialising CUDA."""
    s = str(spec).strip().lower()
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if s == "cpu" or s == "cuda" or s.startswith("cuda:"):
        return "cpu" if s == "cpu" else "cuda"
    raise UserError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N")


def shape_of(config, hidden_size: int, tied: bool, ffn_size: int | None = None,
             layers: int | None = None) -> Shape:
    from lrc.clone import teacher_head_dim

    n = config.num_hidden_layers
    return Shape(layers=layers or n, d_t=config.hidden_size, d_s=hidden_size,
                 heads=config.num_attention_heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                 head_dim=teacher_head_dim(config), ffn=config.intermediate_size, vocab=config.vocab_size,
                 tied=tied, ffn_s=ffn_size, t_layers=n if layers and layers != n else None)


def choose_roles(shape: Shape, tokens_per_micro_batch: int, reuse: int, sharded: bool) -> dict[str, str]:
    """generated / factored per role, as `LowRankClone.plan_projections` decides (never factored when sharded)."""
    from lrc.costs import choose_projections

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


# ---------------------------------------------------------------------------------------------- FLOPs
def flops_per_token(shape: Shape, roles: dict[str, str], tokens: int, reuse: int, seq_len: int,
                    kl: bool = True, projected_terms: int = 2,
                    gate_up_terms: tuple[str, ...] = ("gate", "up")) -> dict[str, float]:
    """Training FLOPs per token by part, from `lrc.costs` (matrix products) plus attention scores."""
    from lrc.costs import factored_flops, generated_flops, generated_through_ffn_flops

    s, n = shape, float(tokens)
    outs = s.role_outs
    layer_outs = sum(outs[r] for r in ROLES)

    def matrix(role):
        args = (n, outs[role], s.d_t, s.d_s)
        if s.ffn_s is not None and role in ("gate", "up", "down"):
            return generated_through_ffn_flops(n, s.ffn, s.ffn_s, s.d_t, s.d_s, reuse=reuse)
        return factored_flops(*args) if roles[role] == "factored" else generated_flops(*args, reuse=reuse)

    ctx = (seq_len + 1) / 2  # causal: keys attended per query, on average (packed documents attend fewer)
    attn = 4.0 * n * ctx * s.heads * s.head_dim  # QK^T and AV of one layer's forward
    targets = projected_terms * 4.0 * n * s.d_t * s.d_s
    if s.ffn_s is not None:  # gate and up targets through Q: forward and the gradient to Q
        targets += len(gate_up_terms) * 4.0 * n * s.ffn * s.ffn_s
    out = {
        "teacher forward": 2.0 * n * s.d_t * (s.teacher_layers * layer_outs + (s.vocab if kl else 0)),
        "student matrices (generated or factored)": s.layers * sum(matrix(r) for r in ROLES),
        "student head": matrix("head"),
        "clone targets through P_o / P_down" + (" / Q" if s.ffn_s is not None else ""): s.layers * targets,
        "attention scores (teacher fwd + student fwd/bwd)": attn * (s.teacher_layers + 3 * s.layers),
    }
    return {k: v / n for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- memory
def activation_bytes(shape: Shape, batch: int, seq_len: int, precision: str, roles: dict[str, str],
                     terms: set[str], grad_checkpointing: bool = False) -> dict[str, int]:
    """Bytes alive at the end of a micro-batch's forward for its backward: {"student", "teacher"}.

    Counted from what autograd saves in the code as written (`LowRankClone.forward`, transformers' Llama-style
    layer with sdpa, the clone MSEs, the fused loss), per layer and token, in the precision's dtypes:

    fp32 (4 bytes each): two RMSNorms (input, unscaled and scaled output: 3 d_S, and 1/rms), sdpa's q, k, v,
    output (K/V repeated to every head when GQA meets a packing mask) and log-sum-exp, the MLP's gate, up,
    SiLU and product (4 F), and per clone term its student and teacher side (q, k, v; gate and up only the
    teacher's, the student's are saved anyway; attention/FFN outputs: the student's, the target T P and the
    teacher's T for P's gradient). An output-side role applied factored saves its d_T-wide intermediate.
    bf16 autocast: matrix outputs in bf16 (2), norms in fp32 with bf16 casts of their output for each
    consumer, and the MSE's fp32 copies of both sides (4 + 4).
    Global: the embedding rows (N x d_T, for P_emb's gradient), the final norm, RoPE's cos/sin, the packing
    mask (B x T x T). With gradient checkpointing a layer keeps only its input, and one layer is recomputed
    at a time; the teacher's clone targets stay alive either way.
    """
    s = shape
    n = batch * seq_len
    hq, hk, f, dt, ds = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.student_ffn, s.d_t, s.d_s
    # with an FFN projection Q the gate/up targets are T Q: the teacher's d_ff_T-wide T is saved for Q's gradient
    f_t = s.ffn if s.ffn_s is not None else 0
    repeat = s.kv_heads < s.heads  # sdpa gets K/V repeated to every head (a mask turns native GQA off)
    out_factored = sum(1 for r in ("o", "down") if roles.get(r) == "factored")
    if precision == "fp32":
        a = 4
        norms = 2 * (3 * ds + 1)
        attn = hq + (2 * hq if repeat else 2 * hk) + hq + s.heads  # q_rope, k/v (repeated), out, lse
        mlp = 4 * f
        # student side of each clone term: what the MSE saves beyond the above (v is sdpa's own without
        # repetition; gate and up are saved by SiLU and the product anyway)
        s_terms = {"q": hq, "k": hk, "v": hk if repeat else 0, "gate": 0, "up": 0,
                   "attn_out": 2 * ds, "ffn_out": 2 * ds}
        t_terms = {"q": hq, "k": hk, "v": hk, "gate": f + f_t, "up": f + f_t, "attn_out": dt, "ffn_out": dt}
        student = norms + attn + mlp + out_factored * dt + sum(s_terms[t] for t in terms)
        teacher = sum(t_terms[t] for t in terms)
        layer_student_b, layer_teacher_b = student * a, teacher * a
        glob = a * (dt + 2 * ds + 1 + 2 * s.head_dim) + a * seq_len  # rows, final norm, cos/sin, mask row
        if roles.get("head") == "factored":
            glob += a * ds  # the final norm's output, saved by h P_head^T
    else:  # bf16 autocast: bytes per token
        norms = 2 * (4 * ds + 2 * ds + 4)  # fp32 copy, bf16 unscaled, 1/rms
        casts = 2 * 5 * ds  # the normed input cast to bf16 once per consumer (q, k, v, gate, up)
        attn = 2 * (hq + (2 * hq if repeat else 2 * hk) + hq) + 4 * s.heads
        mlp = 2 * 4 * f
        s_terms = {"q": 4 * hq, "k": 4 * hk, "v": 4 * hk, "gate": 4 * f, "up": 4 * f,
                   "attn_out": 8 * ds, "ffn_out": 8 * ds}
        # teacher side: the fp32 copies the MSE saves (its bf16 originals go with the forward), and for the
        # projected terms the bf16 output that T P's gradient needs
        t_terms = {"q": 4 * hq, "k": 4 * hk, "v": 4 * hk, "gate": 4 * f + 2 * f_t, "up": 4 * f + 2 * f_t,
                   "attn_out": 2 * dt, "ffn_out": 2 * dt}
        layer_student_b = norms + casts + attn + mlp + 2 * out_factored * dt + sum(s_terms[t] for t in terms)
        layer_teacher_b = sum(t_terms[t] for t in terms)
        glob = 2 * dt + 6 * ds + 4 + 4 * s.head_dim + 2 * seq_len
        if roles.get("head") == "factored":
            glob += 2 * ds
    if grad_checkpointing:
        # each layer keeps its input (the residual stream); one layer's activations exist while recomputed
        a_in = 4 if precision == "fp32" else 2
        student_total = n * (s.layers * a_in * ds + layer_student_b + glob)
    else:
        student_total = n * (s.layers * layer_student_b + glob)
    return {"student": int(student_total), "teacher": int(n * s.layers * layer_teacher_b)}


def _chunk_bytes(shape: Shape, n_tokens: int, chunk: int, precision: str, kl: bool, head_generated: bool,
                 grad: bool = True) -> int:
    """The fused CE + KL's transient at its worst moment (see `losses._FusedKDLMLoss`)."""
    c, v = min(chunk, n_tokens), shape.vocab
    # fp32: student and teacher logits, both log-softmaxes, the teacher's probabilities, the gradient dz and,
    # from the second chunk on, the previous chunk's dz
    k = (6 if kl else 3) if grad else (5 if kl else 2)
    if grad and n_tokens > chunk:
        k += 1
    if precision != "fp32":
        k += 1  # bf16 logits and their fp32 copies
    logits = k * c * v * 4
    if grad and head_generated:  # grad_w += dz^T h: a (V x d_S) product, next to three chunk tensors
        logits = max(logits, 3 * c * v * 4 + v * shape.d_s * 4)
    return logits


def cpu_heap_slack_applies() -> bool:
    """Whether glibc's dynamic mmap threshold is in effect (the default; MALLOC_MMAP_THRESHOLD_ fixes it)."""
    import os
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and \
        "MALLOC_MMAP_THRESHOLD_" not in os.environ


def memory_phases(shape: Shape, *, teacher_params: int, teacher_bytes_per_param: int, trainable: int,
                  roles: dict[str, str], precision: str, batch: int, seq_len: int, grad_accum: int,
                  chunk: int, kl: bool, terms: set[str], grad_checkpointing: bool, nproc: int, sharded: bool,
                  device: str, evaluates: bool = True, heap_slack: bool | None = None,
                  shard_trainables: bool = True) -> dict[str, list[Part]]:
    """The parts alive in each phase of a run (see the module docstring), per process.

    shard_trainables (under fsdp): the layer projections, their gradients and moments are sharded too (1/nproc
    each, `lrc.sharding.shard_projections`), gathered whole for the step and their gradients reduce-scattered
    at its end; False: the projections whole on every process (fsdp before they were sharded)."""
    s = shape
    n = batch * seq_len
    tb = teacher_bytes_per_param
    fp32 = precision == "fp32"
    a = 4 if fp32 else 2  # bytes of an activation element
    runtime = Part("runtime", RUNTIME_BYTES[device],
                   "CUDA context and kernels" if device == "cuda" else "python, torch, transformers, tokenizer, data")
    teacher_whole = teacher_params * tb
    teacher_held = math.ceil(teacher_params / nproc) * tb if sharded else teacher_whole
    teacher = Part("teacher weights", teacher_held,
                   f"{_count_str(teacher_params)} x {tb} B" + (f", 1/{nproc} per process (fsdp)" if sharded else ""))

    split = sharded and shard_trainables
    layer_part = s.layers * (len(ROLES) * s.d_t * s.d_s + 2 * s.d_s) if split else 0  # the sharded unit
    held_train = math.ceil(layer_part / nproc) + trainable - layer_part

    def trainables(grads: bool):
        per = 12 + (4 if grads else 0)
        return Part("trainables (fp32)", held_train * per, f"{_count_str(trainable)} x {per} B: params + AdamW "
                    f"moments" + (" + gradients" if grads else " (gradients not yet allocated)")
                    + (f"; layer projections 1/{nproc} per process (fsdp)" if split else ""))

    # the sharded layer projections gathered whole for a step; in its backward also their whole gradients
    gathered_params = Part("projections gathered", layer_part * 4, "whole for the step (fsdp)")
    # in a micro-batch's backward, gradients reach the whole P_o / P_down through the clone targets; the rest
    # arrive with the generation's backward (at once without accumulation, at the step's end with it)
    projected = len({"attn_out", "ffn_out"} & terms) / len(ROLES)
    back_grads = layer_part * 4 * (1.0 if grad_accum == 1 else projected)
    gathered_grads = Part("projections gathered", int(layer_part * 4 + back_grads),
                          "whole, and their gradients so far (fsdp)")
    # at the step's end: the gathered projections and their whole gradients, reduce-scattered (and resharded)
    # one layer at a time through one layer's flat buffer
    reduce = Part("gradient reduce-scatter", layer_part * 8 + layer_part * 4 // max(1, s.layers),
                  "gathered projections + whole gradients, then one layer at a time (fsdp)")

    outs = dict(s.role_outs)
    ffn_mid = 0
    if s.ffn_s is not None:  # Q^T (W_T P): the student matrix is M wide; W_T P (d_ff_T x d_S) is kept for Q's grad
        outs.update({r: s.ffn_s for r in ("gate", "up", "down")})
        ffn_mid = s.layers * 3 * s.ffn * s.d_s
        if not fp32:  # and autocast's bf16 copies of Q: Q^T for gate and for up, Q for down
            ffn_mid += s.layers * 3 * s.ffn * s.ffn_s
    gen_el = s.layers * s.d_s * sum(outs[r] for r in ROLES if roles[r] == "generated") + ffn_mid
    head_generated = roles["head"] == "generated"
    head_el = s.vocab * s.d_s if head_generated else 0
    gb = 4 if fp32 else 2
    per_layer = grad_checkpointing and not split  # `LowRankClone.generate_per_layer`
    if per_layer:
        # each checkpointed layer generates its own weights, in forward and again in its backward recompute,
        # per micro-batch: about one layer's weights and their gradients alive at a time (2 layers' worth)
        per_el = gb
        live_el = math.ceil(gen_el * 2 / max(1, s.layers))
        gen_note = (f"{'fp32' if fp32 else 'bf16'}, generated per layer inside its checkpointed forward "
                    "(about 2 layers alive; regenerated in backward and per micro-batch)")
    elif grad_accum > 1:
        live_el = gen_el
        # `StepWeights`: fp32 leaves with fp32 gradients, shared by the micro-batches (under fp32 the leaf is
        # the generated tensor itself); under bf16 also the bf16 originals and each micro-batch's bf16 casts
        per_el = 8 if fp32 else 12
        gen_note = f"fp32 leaves + gradients, kept across {grad_accum} micro-batches"
    else:
        live_el = gen_el
        per_el = gb
        gen_note = f"{'fp32' if fp32 else 'bf16'}, generated in the forward"
    # the whole student's are `gen_el` elements (evaluation generates them all); `live_el` are alive in training
    reused = grad_accum > 1 and not per_layer  # `StepWeights` kept across the micro-batches
    gen = Part("generated student weights", (live_el + head_el) * per_el,
               f"{_count_str(live_el + head_el)} elements, {gen_note}"
               + ("" if head_generated else "; head factored"))

    acts = activation_bytes(s, batch, seq_len, precision, roles, terms, grad_checkpointing)
    act_part = Part("activations", acts["student"] + acts["teacher"],
                    f"student {acts['student'] / GiB:.3g} GiB + teacher clone targets {acts['teacher'] / GiB:.3g} "
                    f"GiB" + (" (gradient checkpointing)" if grad_checkpointing else ""))

    # The loss: its (chunk x V) transient, gradient buffers, the teacher's final hidden states and head.
    width = s.d_s if head_generated else s.d_t  # a factored head gives the loss (h P^T): d_T wide
    grad_h = n * width * 4
    grad_w = s.vocab * s.d_s * 4 if head_generated else 0
    t_hidden = n * s.d_t * a if kl else 0
    # the teacher's head: cast to fp32 once per forward when stored lower (fp32), gathered whole when sharded
    head_copy = (s.vocab * s.d_t * (4 if fp32 else tb)
                 if (kl or not head_generated) and (sharded or (fp32 and tb < 4)) else 0)
    chunk_b = _chunk_bytes(s, n, chunk, precision, kl, head_generated)
    if not fp32 and tb == 4 and (kl or not head_generated):
        chunk_b += s.vocab * s.d_t * 2  # autocast casts an fp32 teacher head to bf16 for each chunk's product
    loss = Part("loss", grad_h + grad_w + t_hidden + head_copy + chunk_b,
                f"chunks of {min(chunk, n)} tokens x {s.vocab:,} ({chunk_b / MiB:.0f} MiB), gradient buffers "
                f"{(grad_h + grad_w) / MiB:.0f} MiB" + (f", teacher head {'gathered' if sharded else 'in fp32'} "
                                                        f"{head_copy / MiB:.0f} MiB" if head_copy else ""))
    # glibc on Linux (CPU): allocations below the dynamic mmap threshold (up to 32 MiB: most activations,
    # moments, gradients) come from the heap, whose holes between steps are kept resident and only partly
    # reused; measured (benchmarks/plan_accuracy.py) at 0.5-1.0x the activations + generated weights of a step
    if heap_slack is None:
        heap_slack = device == "cpu" and cpu_heap_slack_applies()
    slack = Part("allocator slack (glibc heap)", int(CPU_HEAP_SLACK * (act_part.bytes + gen.bytes)),
                 f"{CPU_HEAP_SLACK:g} x (activations + generated weights); MALLOC_MMAP_THRESHOLD_=131072 removes it")
    extra = [slack] if heap_slack else []

    phases: dict[str, list[Part]] = {}
    phases["loss"] = [runtime, teacher, trainables(grads=False), gen, act_part, loss, *extra]
    if split:
        phases["loss"].insert(3, gathered_params)

    # Backward start: chunks, the teacher's hidden states and head copy are gone; the head's gradient is
    # scaled (a second V x d_S) and sent back through H_T (fetched in fp32 when stored lower).
    fetch = not reused and head_generated and (tb < 4 or sharded)  # else W_T itself was saved
    back_loss = grad_h * 2 + grad_w * 2 + (s.vocab * s.d_t * 4 if fetch else 0)
    gen_back = gen if reused else Part(gen.name, live_el * per_el, "without the head (freed)")
    phases["backward"] = [runtime, teacher, trainables(grads=False), gen_back, act_part,
                          Part("loss", back_loss, "head/hidden gradients and their scaled copies"), *extra]
    if split:
        phases["backward"].insert(3, gathered_grads)

    # The optimizer step (gradients and both moments; AdamW is fused on CUDA, per tensor on CPU). With
    # accumulation the step's leaves and their gradients live until `train_step` returns.
    opt = [runtime, teacher, trainables(grads=True)]
    if reused:
        largest = max(s.role_outs[r] for r in ROLES) * s.d_t * 4 if (tb < 4 or sharded) else 0
        opt.append(Part("generated student weights", (gen_el + head_el) * (8 if fp32 else 10),
                        "leaves and their gradients, until the step ends"))
        opt.append(Part("transient", largest, "one teacher matrix fetched in fp32 (gradients sent back)"))
    phases["optimizer"] = [*opt, *extra]
    if split:
        phases["optimizer"].insert(3, reduce)

    # The end: held-out evaluation (no grad: generated weights, clone targets, the loss's chunks) and the
    # checkpoint (safetensors copies the projections while writing).
    eval_b = 0
    if evaluates:
        eval_loss = head_copy + t_hidden + _chunk_bytes(s, n, chunk, precision, kl, head_generated, grad=False)
        eval_b = (gen_el + head_el) * gb + eval_loss + acts["teacher"] + 2 * n * s.d_t * a
    phases["end"] = [runtime, teacher, trainables(grads=False),
                     Part("evaluation / checkpoint", max(eval_b, trainable * 4),
                          "held-out forward" if eval_b > trainable * 4 else "checkpoint serialisation copy"),
                     *extra]
    if sharded:  # built on the meta device; each process reads only its own shards (`load_empty_teacher`)
        phases["load"] = [runtime, Part("teacher weights", teacher_held, "each process reads its own shards")]
    return phases


def _total(parts: list[Part]) -> int:
    return sum(p.bytes for p in parts)


# Options of `lrc distill` that change nothing `lrc plan` models (memory, FLOPs, shape, time): accepted by
# `lrc plan` (a distill command line or run.yaml plans as it is) but not listed in its --help.
NOT_PLANNED = frozenset({
    "data", "text_field", "num_proc", "streaming", "chat_template", "train_on", "out", "init", "calib_batches", "lr",
    "schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip", "seed",
    "ce_weight", "kl_temperature", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints",
    "wandb", "cache_dir"})


# ---------------------------------------------------------------------------------------------- plan
def plan_from_config(teacher_config, cfg: RunConfig, *, nproc: int = 1, device: str | None = None,
                     device_tflops: float | None = None, mfu: float = DEFAULT_MFU,
                     teacher_dtype: str | None = None, heap_slack: bool | None = None) -> Plan:
    """The plan of `lrc distill` with `cfg` for a teacher with this config. device: "cpu" / "cuda" (default:
    resolved from cfg.device as distill does); teacher_dtype: the storage dtype when already known;
    heap_slack: count glibc's heap slack (default: on CPU under glibc unless MALLOC_MMAP_THRESHOLD_ is set)."""
    from lrc.config import validate

    validate(cfg)
    if cfg.method not in MODELLED_METHODS:
        raise UserError(f"lrc plan models --method {', '.join(MODELLED_METHODS)} only (got {cfg.method})")
    from lrc.sizing import check_shape, describe, kept_layers, resolve_target, student_layers

    cfg, _ = resolve_target(cfg, teacher_config)
    if cfg.hidden_size is None:
        raise UserError("--hidden-size is required: the student's hidden size, a positive integer at most the "
                        "teacher's (or --target-params N)")
    check_shape(cfg, teacher_config)
    if nproc < 1:
        raise UserError(f"--nproc must be a positive integer (got {nproc})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1] (got {mfu})")
    if device_tflops is not None and not device_tflops > 0:
        raise UserError(f"--device-tflops must be positive (got {device_tflops})")
    device = "cuda" if (device or resolve_device(cfg.device)).startswith("cuda") else "cpu"
    precision = resolve_precision(cfg.precision, torch.device(device))
    dtype = teacher_dtype or teacher_dtype_name(teacher_config, cfg.teacher_dtype)

    n_layers = student_layers(cfg, teacher_config.num_hidden_layers)
    # which layers --layers keeps is measured at run time; any K of them have the same parameters
    kept = kept_layers(cfg, teacher_config.num_hidden_layers) or (
        tuple(range(n_layers)) if n_layers < teacher_config.num_hidden_layers else None)
    teacher_count, student_count, tied = _param_counts(teacher_config, cfg.hidden_size, cfg.rms_norm_eps,
                                                       cfg.ffn_size, kept)
    shape = shape_of(teacher_config, cfg.hidden_size, tied, cfg.ffn_size, n_layers)
    sharded = cfg.parallel == "fsdp" and nproc > 1
    tokens = cfg.batch_size * cfg.seq_len
    # under checkpointing (projections not sharded) every micro-batch generates again: nothing reused
    reuse = 1 if cfg.grad_checkpointing and not sharded else cfg.grad_accum
    roles = choose_roles(shape, tokens, reuse, sharded)
    weights = cfg.loss_weights()
    terms = set(weights.clone_terms())
    kl = weights.kl != 0.0
    chunk = cfg.chunk_size
    if chunk <= 0:
        from lrc.losses import auto_chunk_size

        chunk = auto_chunk_size(shape.vocab)
    n_train = trainable_params(shape)

    def phases_with(grad_checkpointing: bool, shard_trainables: bool = True) -> dict[str, list[Part]]:
        return memory_phases(
            shape, teacher_params=teacher_count, teacher_bytes_per_param=DTYPE_BYTES[dtype], trainable=n_train,
            roles=roles, precision=precision, batch=cfg.batch_size, seq_len=cfg.seq_len, grad_accum=cfg.grad_accum,
            chunk=chunk, kl=kl, terms=terms, grad_checkpointing=grad_checkpointing, nproc=nproc, sharded=sharded,
            device=device, evaluates=cfg.val_fraction > 0 or bool(cfg.val_data), heap_slack=heap_slack,
            shard_trainables=shard_trainables)

    phases = phases_with(cfg.grad_checkpointing)
    totals = {k: _total(v) for k, v in phases.items()}
    peak_phase = max(totals, key=lambda k: totals[k])
    other = phases_with(not cfg.grad_checkpointing)
    acts = {
        "without_checkpointing": sum(activation_bytes(shape, cfg.batch_size, cfg.seq_len, precision, roles, terms,
                                                      False).values()),
        "with_checkpointing": sum(activation_bytes(shape, cfg.batch_size, cfg.seq_len, precision, roles, terms,
                                                   True).values()),
    }
    projected = len(terms & {"attn_out", "ffn_out"})
    flops = flops_per_token(shape, roles, tokens, reuse, cfg.seq_len, kl=kl, projected_terms=projected,
                            gate_up_terms=tuple(sorted(terms & {"gate", "up"})))
    per_token = sum(flops.values())
    tps = device_tflops * 1e12 * mfu / per_token if device_tflops else None
    per_step = tokens * cfg.grad_accum * nproc
    budgets = [b for b in (cfg.max_tokens, None if cfg.max_steps is None else cfg.max_steps * per_step)
               if b is not None]
    budget = min(budgets) if budgets else None
    notes = []
    if sharded:
        whole = max(_total(v) for v in phases_with(cfg.grad_checkpointing, shard_trainables=False).values())
        notes.append(f"fsdp: the layer projections, their gradients and AdamW state are sharded too (peak "
                     f"{whole / GiB:.2f} GiB per process if they were not); each process reads only its own "
                     "shards of the teacher from its safetensors files (host memory: about one teacher per node)")
    if precision == "fp32" and DTYPE_BYTES[dtype] < 4:
        notes.append(f"{dtype} teacher under fp32: each teacher matrix is cast to fp32 only while it is used")
    return Plan(
        teacher=str(cfg.teacher), family=family_for(teacher_config).model_type, shape=shape,
        teacher_params=teacher_count, student_params=student_count, trainable_params=n_train,
        student_shape=describe(cfg, teacher_config),
        teacher_dtype=dtype, precision=precision, device=device, nproc=nproc, parallel=cfg.parallel,
        sharded=sharded, batch_size=cfg.batch_size, seq_len=cfg.seq_len, grad_accum=cfg.grad_accum,
        chunk_size=chunk, grad_checkpointing=cfg.grad_checkpointing, roles=roles, memory=phases[peak_phase],
        peak_bytes=totals[peak_phase], peak_phase=peak_phase, phases=totals, activations=acts,
        peak_other_checkpointing=max(_total(v) for v in other.values()), flops=flops, flops_per_token=per_token,
        device_tflops=device_tflops, mfu=mfu, tokens_per_s=tps, notes=notes, budget_tokens=budget,
        hours=budget / (tps * nproc) / 3600 if budget is not None and tps else None,
    )


def require_teacher(cfg: RunConfig) -> str:
    if not cfg.teacher:
        raise UserError("--teacher is required: a Hugging Face model directory or hub id")
    return cfg.teacher


def plan_run(cfg: RunConfig, **kw) -> Plan:
    """`plan_from_config` for cfg.teacher, reading its config.json only."""
    from lrc.loading import load_teacher_config

    return plan_from_config(load_teacher_config(require_teacher(cfg), cfg.trust_remote_code), cfg, **kw)


# ---------------------------------------------------------------------------------------------- output
def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def _count_str(n: float) -> str:
    """A count for people: 1.24B, 18.9B, 350M, 50.2K (never an exponent)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 1000 * scale or unit == "B" else f"{n / scale:,.0f}{unit}"
    return f"{n:.0f}"


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} minutes" if hours < 1 else f"{hours:.1f} hours" if hours < 48 else \
        f"{hours / 24:.1f} days"


def format_plan(plan: Plan) -> str:
    s = plan.shape
    factored = [r for r, m in plan.roles.items() if m == "factored"]
    lines = [
        f"teacher {plan.teacher} ({plan.family}, hidden {s.d_t}, FFN {s.ffn}, {s.teacher_layers} layers, "
        f"vocab {s.vocab:,}"
        f"{', tied' if s.tied else ''}): {_count_str(plan.teacher_params)} parameters in {plan.teacher_dtype}",
        f"student: {plan.student_shape}; {plan.student_params:,} parameters exported "
        f"({plan.student_share:.1%} of the teacher); {plan.trainable_params:,} trainable while distilling",
        f"run: {plan.nproc} process(es) x {plan.device}, {plan.parallel}"
        f"{' (teacher sharded)' if plan.sharded else ''}, precision {plan.precision}, micro-batch "
        f"{plan.batch_size} x {plan.seq_len} tokens, grad accumulation {plan.grad_accum}; factored: "
        f"{', '.join(factored) if factored else 'none'}",
        "",
        f"memory per process, at its peak ({plan.peak_phase}):",
    ]
    width = max(len(p.name) for p in plan.memory)
    for p in plan.memory:
        lines.append(f"  {p.name:<{width}}  {_gib(p.bytes):>11}   {p.note}")
    lines.append(f"  {'total':<{width}}  {_gib(plan.peak_bytes):>11}")
    other = "with" if not plan.grad_checkpointing else "without"
    lines.append(f"  activations {_gib(plan.activations['without_checkpointing'])} without gradient checkpointing, "
                 f"{_gib(plan.activations['with_checkpointing'])} with; peak {other} --grad-checkpointing: "
                 f"{_gib(plan.peak_other_checkpointing)}")
    lines.append("  phases: " + ", ".join(f"{k} {_gib(v)}" for k, v in plan.phases.items()))
    lines += ["", f"FLOPs per trained token: {plan.flops_per_token / 1e9:.3g} GFLOP"]
    for k, v in plan.flops.items():
        lines.append(f"  {k:<48} {v / 1e9:10.3g} GFLOP")
    if plan.tokens_per_s is not None:
        lines.append(f"throughput at {plan.device_tflops:g} TFLOP/s peak and {plan.mfu:.0%} utilisation (assumed): "
                     f"{plan.tokens_per_s:,.0f} tokens/s per process"
                     + (f", {plan.tokens_per_s * plan.nproc:,.0f} in all" if plan.nproc > 1 else ""))
        if plan.hours is not None:
            lines.append(f"time for {_count_str(plan.budget_tokens or 0)} tokens (the budget): {_duration(plan.hours)}")
    else:
        lines.append("tokens/s: pass --device-tflops (the device's peak dense TFLOP/s) for an estimate")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict())


def startup_summary(teacher_config, cfg: RunConfig, nproc: int, device: str, teacher_dtype: str) -> str:
    """The plan line `lrc distill` prints at start-up ("" for a method the plan does not model; never raises:
    a forecast must not stop a run)."""
    if cfg.method not in MODELLED_METHODS:
        return ""
    try:
        p = plan_from_config(teacher_config, cfg, nproc=nproc, device=device, teacher_dtype=teacher_dtype)
    except Exception as e:  # noqa: BLE001
        return f"plan: unavailable ({type(e).__name__}: {e})"
    unit, div = ("GiB", GiB) if p.peak_bytes >= GiB else ("MiB", MiB)
    parts = ", ".join(f"{q.name} {q.bytes / div:.{2 if unit == 'GiB' else 0}f}" for q in p.memory
                      if q.bytes >= 0.01 * p.peak_bytes)
    return (f"plan: peak about {p.peak_bytes / div:.{2 if unit == 'GiB' else 0}f} {unit} per process at the "
            f"{p.peak_phase} ({parts} {unit}); {p.flops_per_token / 1e9:.3g} GFLOP per token; student "
            f"{p.student_shape}, {p.student_params:,} parameters ({p.student_share:.1%} of the teacher); "
            "`lrc plan` for details")
