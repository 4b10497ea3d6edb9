"""A student narrower in its FFN (`--ffn-size`), shallower (`--layers`, `--drop-layers`) or sized by a
parameter target (`--target-params`): exactness at full size, channel selection and layer choice against
closed forms, export == in-training student for every combination and family, exact parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_teacher, packed_batch
from transformers import AutoModelForCausalLM

from lrc.config import RunConfig
from lrc.errors import UserError
from lrc.methods.lrc import LRC
from lrc.methods.registry import build_method
from lrc.model.clone import LowRankClone
from lrc.model.export import build_student_model, export_student
from lrc.model.losses import LossWeights
from lrc.model.meta import meta_model, parameter_count
from lrc.plan.estimate import plan_from_config
from lrc.student.baselines import pruned_student
from lrc.student.init import init_identity, init_pca
from lrc.student.select import choose_layers, ffn_channel_energy, layer_importance, select_ffn_channels
from lrc.student.shape import check_shape, param_counter, parse_target, resolve_target, solve

FAMILIES = [("llama", False), ("llama", True), ("mistral", False), ("mistral", True), ("qwen2", False),
            ("qwen2", True), ("qwen3", False), ("qwen3", True)]
ids_of = lambda f, t: f"{f}-{'tied' if t else 'untied'}"  # noqa: E731


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def logits(model, ids, pos):
    return model(input_ids=ids, position_ids=pos, use_cache=False).logits


def without_layers(teacher, dropped):
    """The teacher with whole layers removed (what a depth-pruned identity clone must equal)."""
    t = copy.deepcopy(teacher)
    keep = [i for i in range(t.config.num_hidden_layers) if i not in dropped]
    t.model.layers = torch.nn.ModuleList(t.model.layers[i] for i in keep)
    for j, layer in enumerate(t.model.layers):
        layer.self_attn.layer_idx = j
    t.config.num_hidden_layers = len(keep)
    if getattr(t.config, "layer_types", None) is not None:
        t.config.layer_types = [t.config.layer_types[i] for i in keep]
    return t


def with_channels(teacher, channels):
    """The teacher whose every FFN keeps only `channels[i]` of layer i (rows of gate/up, columns of down)."""
    t = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer, keep in zip(t.model.layers, channels, strict=True):
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj"):
                lin = getattr(mlp, name)
                lin.weight = torch.nn.Parameter(lin.weight[keep].clone())
            mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, keep].clone())
    return t


# ---------------------------------------------------------------------------------------- exactness
def test_ffn_projection_at_full_size_reproduces_teacher(teacher):
    """M = d_ff_T with Q = I (and every other projection I): the student is the teacher, and every clone
    term, gate/up compared through Q, vanishes."""
    clone = LowRankClone(teacher, teacher.config.hidden_size, ffn_size=teacher.config.intermediate_size)
    init_identity(clone)
    assert all(layer.ffn is not None for layer in clone.layers)
    ids, pos = packed_batch()
    assert (clone.student_logits(ids, pos) - logits(teacher, ids, pos)).abs().max() <= 1e-5
    out = LRC(clone)(ids, position_ids=pos)
    for k, v in out.terms.items():
        if k.startswith("clone") or k == "kl":
            assert abs(v.item()) < 1e-8, k


def test_a_permuted_ffn_is_exact_and_its_clone_terms_are_compared_through_q():
    """Q a permutation of the teacher's channels (M = d_ff_T): still the teacher exactly (a permutation commutes
    with act(gate) * up), and the gate/up clone terms vanish only because the teacher's side goes through Q."""
    teacher = make_teacher("qwen2", True)
    clone = LowRankClone(teacher, 64, ffn_size=96)
    init_identity(clone)
    with torch.no_grad():
        for i, layer in enumerate(clone.layers):
            layer.ffn.copy_(torch.eye(96)[:, torch.randperm(96, generator=torch.Generator().manual_seed(i))])
    ids, pos = packed_batch()
    assert (clone.student_logits(ids, pos) - logits(teacher, ids, pos)).abs().max() <= 1e-5
    terms = LRC(clone)(ids, position_ids=pos).terms
    assert terms["clone/gate"].item() < 1e-10 and terms["clone/up"].item() < 1e-10


def test_kept_layers_reproduce_the_teacher_without_the_others(teacher):
    ids, pos = packed_batch()
    full = LowRankClone(teacher, teacher.config.hidden_size, kept_layers=(0, 1))  # all layers: the teacher
    init_identity(full)
    assert (full.student_logits(ids, pos) - logits(teacher, ids, pos)).abs().max() <= 1e-5
    clone = LowRankClone(teacher, teacher.config.hidden_size, kept_layers=(1,))
    init_identity(clone)  # layer 0 of the student carries teacher layer 1's weights and gains
    assert (clone.student_logits(ids, pos) - logits(without_layers(teacher, {0}), ids, pos)).abs().max() <= 1e-5


def test_clone_terms_of_a_kept_layer_are_compared_with_its_teacher_layer():
    """Teacher layer 0 made a no-op: its layer 1 then sees what the student's only layer (kept: 1) sees, so
    every clone term vanishes exactly when student layer 0 is compared with teacher layer 1."""
    teacher = make_teacher("qwen3", False)
    with torch.no_grad():
        teacher.model.layers[0].self_attn.o_proj.weight.zero_()
        teacher.model.layers[0].mlp.down_proj.weight.zero_()
    clone = LowRankClone(teacher, 64, kept_layers=(1,))
    init_identity(clone)
    ids, pos = packed_batch()
    terms = LRC(clone)(ids, position_ids=pos).terms
    assert {k for k in terms if k.startswith("clone/")} == {f"clone/{t}" for t in LossWeights().clone_terms()}
    assert all(abs(v.item()) < 1e-10 for k, v in terms.items() if k.startswith("clone")), terms


def test_selected_ffn_channels_equal_the_teacher_without_the_others():
    """A selection Q commutes with act(gate) * up: at full hidden width the student with M selected channels
    is the teacher with the other channels cut out of gate/up/down. The selection keeps the channels of most
    output energy E[h_j^2] ||W_down[:, j]||^2."""
    teacher = make_teacher("llama", False, mlp_bias=False)
    ids, pos = packed_batch()
    clone = LowRankClone(teacher, 64, ffn_size=40)
    full = LowRankClone(teacher, 64)
    init_identity(full)  # every other projection I, the teacher's gains
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if not name.startswith("teacher.") and not name.endswith(".ffn"):
                p.copy_(full.get_parameter(name))
    info = select_ffn_channels(clone, [{"input_ids": ids, "position_ids": pos}])
    energy = ffn_channel_energy(clone, [{"input_ids": ids, "position_ids": pos}])
    channels = []
    for layer, e in zip(clone.layers, energy, strict=True):
        keep = layer.ffn.argmax(0)  # the channel each column selects
        assert torch.equal(layer.ffn.sum(0), torch.ones(40)) and keep.tolist() == sorted(keep.tolist())
        assert e[keep].min() >= e[[j for j in range(96) if j not in keep]].max()
        channels.append(keep)
    assert 40 / 96 < info["ffn_energy_kept"] < 1.0
    want = logits(with_channels(teacher, channels), ids, pos)
    assert (clone.student_logits(ids, pos) - want).abs().max() <= 1e-5


def test_layer_importance_drops_the_layer_that_changes_nothing():
    teacher = make_teacher("llama", False, num_hidden_layers=3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    ids, pos = packed_batch()
    scores = layer_importance(teacher, [{"input_ids": ids, "position_ids": pos}])
    assert scores[1] == pytest.approx(0.0, abs=1e-9) and min(scores[0], scores[2]) > 1e-3
    assert choose_layers(teacher, [{"input_ids": ids, "position_ids": pos}], 2) == (0, 2)


# ---------------------------------------------------------------------------------------- export
VARIANTS = {"ffn": dict(ffn_size=48), "depth": dict(kept_layers=(1,)), "ffn+depth": dict(ffn_size=56,
                                                                                         kept_layers=(0,))}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family,tied", FAMILIES, ids=[ids_of(f, t) for f, t in FAMILIES])
def test_export_equals_trained_student(tmp_path, family, tied, variant):
    teacher = make_teacher(family, tied)
    shape = VARIANTS[variant]
    clone = LowRankClone(teacher, 40, **shape)
    ids, pos = packed_batch()
    init_pca(clone, [{"input_ids": ids, "position_ids": pos}])
    select_ffn_channels(clone, [{"input_ids": ids, "position_ids": pos}])
    opt = torch.optim.AdamW([p for p in clone.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        LRC(clone)(ids, position_ids=pos).loss.backward()
        opt.step()
    if "ffn_size" in shape:
        assert all(layer.ffn.grad is not None for layer in clone.layers)  # Q is trained

    export_student(clone, tmp_path / "student")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = model.config
    assert cfg.hidden_size == 40 and cfg.tie_word_embeddings == tied
    assert cfg.intermediate_size == shape.get("ffn_size", teacher.config.intermediate_size)
    assert cfg.num_hidden_layers == len(shape.get("kept_layers", (0, 1)))
    assert (logits(model, ids, pos) - clone.student_logits(ids, pos)).abs().max() <= 1e-4


def test_ffn_biases_go_through_q():
    """Llama with mlp_bias: gate/up biases become b Q (M wide), down's stays d_T wide (through P_down); exact at
    full size with Q a permutation, and export == student when narrowed."""
    teacher = make_teacher("llama", False, mlp_bias=True, attention_bias=True)
    ids, pos = packed_batch()
    clone = LowRankClone(teacher, 64, ffn_size=96)
    init_identity(clone)
    with torch.no_grad():
        for layer in clone.layers:
            layer.ffn.copy_(torch.eye(96)[:, torch.randperm(96, generator=torch.Generator().manual_seed(0))])
    assert (clone.student_logits(ids, pos) - logits(teacher, ids, pos)).abs().max() <= 1e-5
    narrow = LowRankClone(teacher, 40, ffn_size=48)
    init_pca(narrow, [{"input_ids": ids, "position_ids": pos}])
    select_ffn_channels(narrow, [{"input_ids": ids, "position_ids": pos}])
    model = build_student_model(narrow)
    assert model.model.layers[0].mlp.gate_proj.bias.shape == (48,)
    assert (logits(model, ids, pos) - narrow.student_logits(ids, pos)).abs().max() <= 1e-4


def test_sliding_window_layer_types_follow_the_kept_layers():
    teacher = make_teacher("qwen2", False, num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                           max_window_layers=1)
    types = teacher.config.layer_types
    assert types[0] != types[1] == types[2]  # the per-layer choice matters
    student = build_student_model(LowRankClone(teacher, 32, kept_layers=(1, 2)))
    assert student.config.layer_types == [types[1], types[2]]


def test_prune_kd_prunes_ffn_and_depth_like_lrc_does():
    teacher = make_teacher("llama", False)
    ids, pos = packed_batch()
    model, kept = pruned_student(teacher, 64, [{"input_ids": ids, "position_ids": pos}], ffn_size=96,
                                 kept_layers=(1,))
    # full hidden width and every channel: the teacher without layer 0
    assert (logits(model, ids, pos) - logits(without_layers(teacher, {0}), ids, pos)).abs().max() <= 1e-5
    small, _ = pruned_student(teacher, 32, [{"input_ids": ids, "position_ids": pos}], ffn_size=48)
    assert small.config.intermediate_size == 48 and small.config.num_hidden_layers == 2


def test_layers_option_records_its_choice_so_the_run_can_be_rebuilt():
    teacher = make_teacher("llama", False, num_hidden_layers=3)
    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    ids, pos = packed_batch()
    cfg = RunConfig(teacher="t", method="lrc", hidden_size=32, ffn_size=48, layers=2, init="pca")
    method, info = build_method(cfg, teacher, calibration=lambda: [{"input_ids": ids, "position_ids": pos}])
    assert cfg.student.drop_layers == "2" and 0 < info["ffn_energy_kept"] <= 1
    rebuilt, _ = build_method(cfg, teacher, calibration=None)  # as `lrc export` / --resume do
    rebuilt.load_trainable_state_dict(method.trainable_state_dict())
    assert torch.equal(rebuilt.clone.student_logits(ids, pos), method.clone.student_logits(ids, pos))
    with pytest.raises(UserError, match="--drop-layers"):
        build_method(RunConfig(teacher="t", hidden_size=32, layers=2), teacher, calibration=None)


# ---------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("family,tied", FAMILIES[::2] + [("llama", True)], ids=lambda v: str(v))
def test_parameter_counter_is_exact(family, tied):
    extra = dict(attention_bias=True, mlp_bias=True) if family == "llama" else {}
    teacher = make_teacher(family, tied, **extra)
    count = param_counter(teacher.config)
    from lrc.model.clone import student_config

    for hidden, ffn, kept in [(64, 96, None), (40, 24, (1,)), (8, 8, (0, 1))]:
        real = parameter_count(meta_model(student_config(teacher, hidden, None, ffn, kept)))
        assert count(hidden, ffn, len(kept or (0, 1))) == real
    assert count(64, 96, 2) == sum(p.numel() for p in teacher.parameters())


def test_solve_reaches_targets_in_round_shapes():
    teacher = make_teacher("llama", False, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                           head_dim=128, num_hidden_layers=8, vocab_size=512)
    count = param_counter(teacher.config)
    full = count(1024, 2816, 8)
    for dims in [("hidden",), ("hidden", "ffn"), ("hidden", "layers"), ("hidden", "ffn", "layers")]:
        for share in (0.5, 0.3):
            sol = solve(teacher.config, int(share * full), dims, count=count)
            # within 2%, or half a step of the hidden size (64 here) when that is coarser
            half_step = (count(sol.hidden + 64, sol.ffn, sol.layers) - sol.params) / 2
            assert abs(sol.params - share * full) <= max(0.02 * share * full, half_step), (dims, share, sol)
            assert sol.hidden % 64 == 0 and sol.ffn % 64 == 0
            assert (sol.ffn < 2816) == ("ffn" in dims) and (sol.layers < 8) == ("layers" in dims)


def test_target_params_options():
    config = make_teacher("llama", False).config
    total = parameter_count(meta_model(config))
    assert parse_target("1.5K", total) == 1500 and parse_target("50%", total) == total // 2
    assert parse_target("2e4", total) == 20000
    for bad in ("big", "-5%", "0", "200%"):
        with pytest.raises(UserError, match="--target-params"):
            parse_target(bad, total)
    cfg, sol = resolve_target(RunConfig(target_params="50%", target_dims="hidden,ffn"), config)
    assert sol is not None and cfg.student.hidden_size == sol.hidden and cfg.student.ffn_size == sol.ffn
    # a resumed run holds the solved values too: accepted; a contradicting explicit value is not
    assert resolve_target(cfg, config)[0] == cfg
    with pytest.raises(UserError, match="--hidden-size 8 and --target-params"):
        resolve_target(RunConfig(target_params="50%", hidden_size=8), config)
    with pytest.raises(UserError, match="--target-dims"):
        resolve_target(RunConfig(target_params="50%", target_dims="heads"), config)
    with pytest.raises(UserError, match="out of reach"):
        resolve_target(RunConfig(target_params="5%", target_dims="layers", hidden_size=64), config)


@pytest.mark.parametrize("options,message", [
    (dict(ffn_size=97), "--ffn-size 97 is out of range"),
    (dict(layers=3), "--layers 3 is out of range"),
    (dict(drop_layers="0,1"), "drops all 2 layers"),
    (dict(drop_layers="5"), "--drop-layers 5 is not a layer"),
    (dict(drop_layers="a,b"), "comma-separated"),
    (dict(layers=2, drop_layers="1"), "contradicts"),
])
def test_bad_shapes_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        check_shape(RunConfig(hidden_size=32, **options), make_teacher("llama", False).config)


def test_plan_counts_and_shows_the_chosen_shape():
    teacher = make_teacher("qwen2", True)
    cfg = RunConfig(teacher="t", method="lrc", hidden_size=32, ffn_size=48, layers=1, batch_size=2, seq_len=24,
                    precision="fp32", device="cpu")
    plan = plan_from_config(teacher.config, cfg, teacher_dtype="float32")
    clone = LowRankClone(teacher, 32, ffn_size=48, kept_layers=(1,))
    assert plan.student_params == sum(p.numel() for p in build_student_model(clone).parameters())
    assert plan.trainable_params == sum(p.numel() for p in clone.parameters() if p.requires_grad)
    assert plan.student_shape.startswith("hidden 32 of 64, FFN 48 of 96, 1 of 2 layers")
    assert {plan.roles[r] for r in ("gate", "up", "down")} == {"generated"}
    assert clone.plan_projections(48) == plan.roles  # the same choice as the clone's own, 2 x 24 tokens
    target = plan_from_config(teacher.config, RunConfig(teacher="t", target_params="50%", batch_size=2, seq_len=24,
                                                        precision="fp32", device="cpu"), teacher_dtype="float32")
    assert target.student_share == pytest.approx(0.5, abs=0.05)
