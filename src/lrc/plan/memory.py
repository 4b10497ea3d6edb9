"""Memory per process of an LRC run, by part and phase.

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

The activation counts follow the autograd graph of the code as written (`activation_bytes`; tests/plan/test_plan.py
checks them against the tensors autograd really saves). Two constants were measured on CPU with
`benchmarks/plan_accuracy.py`, which compares this forecast with the peak RSS of real `lrc distill` runs:
`RUNTIME_BYTES` (what is not a tensor of the run) and `CPU_HEAP_SLACK` (glibc keeps freed heap memory
resident; with MALLOC_MMAP_THRESHOLD_ set, large blocks are mmapped and returned, and there is no slack).
On 40 calibration runs (hidden 256-2048, 2-6 layers, vocabularies 16K-128K, bf16/fp32 teachers, accumulation
1 and 2, fp32) the forecast was within 3% of the measured peak with a fixed mmap threshold and within 8%
with glibc's default, except one small-matrix shape with accumulation where glibc kept 2-3x more (-24%).
GPU memory is not calibrated.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass

from lrc.log import human_count
from lrc.model.families import ROLES
from lrc.plan.shape import Shape

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
PHASES = ("loss", "backward", "optimizer", "end", "load")


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


def activation_bytes(shape: Shape, batch: int, seq_len: int, precision: str, roles: dict[str, str],
                     terms: set[str], grad_checkpointing: bool = False,
                     recompute_targets: bool = False) -> dict[str, int]:
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
    at a time; with `recompute_targets` (LRC's --recompute-targets) so is its teacher layer, for the clone
    targets: the teacher's layer inputs are kept instead of every layer's targets.
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
    if grad_checkpointing and recompute_targets and terms:
        # each kept teacher layer's input (its residual stream, in the compute dtype), and one layer's targets
        teacher_total = n * (s.layers * (4 if precision == "fp32" else 2) * dt + layer_teacher_b)
    else:
        teacher_total = n * s.layers * layer_teacher_b
    return {"student": int(student_total), "teacher": int(teacher_total)}


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

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and \
        "MALLOC_MMAP_THRESHOLD_" not in os.environ


def memory_phases(shape: Shape, *, teacher_params: int, teacher_bytes_per_param: int, trainable: int,
                  roles: dict[str, str], precision: str, batch: int, seq_len: int, grad_accum: int,
                  chunk: int, kl: bool, terms: set[str], grad_checkpointing: bool, nproc: int, sharded: bool,
                  device: str, evaluates: bool = True, heap_slack: bool | None = None,
                  shard_trainables: bool = True, free: bool = False,
                  recompute_targets: bool = False) -> dict[str, list[Part]]:
    """The parts alive in each phase of a run (see the module docstring), per process.

    free: an ordinary student trained weight by weight (kd, prune-kd, scratch): `trainable` is its parameter
    count, nothing is generated (under bf16 autocast its weights are cast once per forward and the copies saved
    for the backward), its layers' activations are those of a generated student, and it is never sharded.
    shard_trainables (under fsdp): the layer projections, their gradients and moments are sharded too (1/nproc
    each, `lrc.distributed.fsdp.shard_projections`), each layer's gathered while it runs (forward, recompute,
    backward) and its gradients reduce-scattered after its backward, so the student is generated per layer in
    every micro-batch; False: the projections whole on every process (fsdp before they were sharded)."""
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
                   f"{human_count(teacher_params)} x {tb} B" + (f", 1/{nproc} per process (fsdp)" if sharded else ""))

    split = sharded and shard_trainables and not free
    layer_part = s.layers * (len(ROLES) * s.d_t * s.d_s + 2 * s.d_s) if split else 0  # the sharded unit
    held_train = math.ceil(layer_part / nproc) + trainable - layer_part

    def trainables(grads: bool):
        per = 12 + (4 if grads else 0)
        return Part("trainables (fp32)", held_train * per, f"{human_count(trainable)} x {per} B: params + AdamW "
                    f"moments" + (" + gradients" if grads else " (gradients not yet allocated)")
                    + (f"; layer projections 1/{nproc} per process (fsdp)" if split else ""))

    # the sharded layer projections, gathered one layer at a time: the running layer's in forward; in backward
    # the running layer's and the next one's (FSDP2 prefetches it), the running layer's whole gradients and
    # their reduce-scatter buffer
    one_layer = layer_part * 4 // max(1, s.layers)
    gathered_params = Part("projections gathered", one_layer, "one layer's, while it runs (fsdp)")
    gathered_grads = Part("projections gathered", one_layer * 4,
                          "2 layers' (one prefetched) + one layer's gradients and reduce-scatter buffer (fsdp)")

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
    per_layer = grad_checkpointing  # `LowRankClone.generate_per_layer`
    if per_layer:
        # each checkpointed layer generates its own weights, in forward and again in its backward recompute,
        # per micro-batch: about one layer's weights and their gradients alive at a time (2 layers' worth)
        per_el = gb
        live_el = math.ceil(gen_el * 2 / max(1, s.layers))
        gen_note = (f"{'fp32' if fp32 else 'bf16'}, generated per layer inside its checkpointed forward "
                    "(about 2 layers alive; regenerated in backward and per micro-batch)")
    elif grad_accum > 1 and not split:
        live_el = gen_el
        # `StepWeights`: fp32 leaves with fp32 gradients, shared by the micro-batches (under fp32 the leaf is
        # the generated tensor itself); under bf16 also the bf16 originals and each micro-batch's bf16 casts
        per_el = 8 if fp32 else 12
        gen_note = f"fp32 leaves + gradients, kept across {grad_accum} micro-batches"
    else:
        live_el = gen_el
        per_el = gb
        gen_note = f"{'fp32' if fp32 else 'bf16'}, generated in the forward" + (
            ", per layer, every micro-batch (fsdp)" if split else "")
    # the whole student's are `gen_el` elements (evaluation generates them all); `live_el` are alive in training
    reused = grad_accum > 1 and not per_layer and not split  # `StepWeights` kept across the micro-batches
    gen = Part("generated student weights", (live_el + head_el) * per_el,
               f"{human_count(live_el + head_el)} elements, {gen_note}"
               + ("" if head_generated else "; head factored"))
    if free:
        reused, head_generated, head_el = False, True, 0
        gen_el = live_el = trainable
        per_el = 0 if fp32 else 2
        gen = Part("student weights in bf16", trainable * per_el, "autocast's copies, saved for the backward")
        gb = per_el  # evaluation casts them alike

    acts = activation_bytes(s, batch, seq_len, precision, roles, terms, grad_checkpointing, recompute_targets)
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

    # The end: held-out evaluation (no grad: generated weights, clone targets, the loss's chunks) and the
    # checkpoint (safetensors copies the projections while writing).
    eval_b = 0
    if evaluates:
        eval_loss = head_copy + t_hidden + _chunk_bytes(s, n, chunk, precision, kl, head_generated, grad=False)
        eval_gen = math.ceil(gen_el / max(1, s.layers)) if split else gen_el  # sharded: one layer at a time
        eval_b = (eval_gen + head_el) * gb + eval_loss + acts["teacher"] + 2 * n * s.d_t * a
    saved = held_train * 4  # under fsdp each process writes its own shards (torch.distributed.checkpoint)
    phases["end"] = [runtime, teacher, trainables(grads=False),
                     Part("evaluation / checkpoint", max(eval_b, saved),
                          "held-out forward" if eval_b > saved else "checkpoint serialisation copy"),
                     *extra]
    if sharded:  # built on the meta device; each process reads only its own shards (`load_empty_teacher`)
        phases["load"] = [runtime, Part("teacher weights", teacher_held, "each process reads its own shards")]
    return phases


def total_bytes(parts: list[Part]) -> int:
    return sum(p.bytes for p in parts)
