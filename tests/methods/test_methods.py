"""Baseline methods (kd, scratch, prune-kd): right trainable parameters, right losses, teacher untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_teacher, packed_batch

from lrc.config import RunConfig
from lrc.methods.direct import FREE_CE_WEIGHT, FREE_MIN_LR_RATIO, Direct, method_defaults
from lrc.methods.registry import METHODS, build_method
from lrc.model.clone import LowRankClone
from lrc.student.baselines import pruned_student, random_student


def _cfg(method, **kw):
    return RunConfig(teacher="unused", hidden_size=40, method=method, **kw)


@pytest.mark.parametrize("method", ["kd", "scratch", "prune-kd"])
def test_baselines_train_only_the_student_and_leave_the_teacher(method):
    teacher = make_teacher("llama", False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids, pos = packed_batch()
    model, _ = build_method(_cfg(method), teacher, calibration=lambda: [{"input_ids": ids, "position_ids": pos}])
    assert isinstance(model, Direct)
    teacher_ids = {id(p) for p in teacher.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not any(id(p) in teacher_ids for p in trainable)
    # same architecture as the LRC student
    assert model.model.config.hidden_size == 40
    assert model.model.config.head_dim == LowRankClone(teacher, 40).student_config().head_dim
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    out = model(ids, position_ids=pos)
    out.loss.backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    if method == "scratch":
        assert out.terms["kl"] == 0 and out.loss.item() == pytest.approx(out.terms["ce"].item())
    else:
        assert out.terms["kl"] > 0
        assert "clone" not in out.terms  # clone terms only with --keep-clone-terms
        assert out.loss.item() == pytest.approx(out.terms["ce"].item() + out.terms["kl"].item(), rel=1e-5)


def test_prune_kd_starts_from_the_selected_channels():
    teacher = make_teacher("qwen2", True)
    ids, pos = packed_batch()
    student, kept = pruned_student(teacher, 40, [{"input_ids": ids, "position_ids": pos}])
    assert len(kept) == 40 and kept == sorted(set(kept))
    keep = torch.tensor(kept)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:, keep])
    for i in range(teacher.config.num_hidden_layers):
        p = f"model.layers.{i}."
        assert torch.equal(s[p + "self_attn.q_proj.weight"], t[p + "self_attn.q_proj.weight"][:, keep])
        assert torch.equal(s[p + "self_attn.q_proj.bias"], t[p + "self_attn.q_proj.bias"])
        assert torch.equal(s[p + "self_attn.o_proj.weight"], t[p + "self_attn.o_proj.weight"][keep])
        assert torch.equal(s[p + "mlp.down_proj.weight"], t[p + "mlp.down_proj.weight"][keep])
        assert torch.equal(s[p + "input_layernorm.weight"], t[p + "input_layernorm.weight"][keep])
    # the kept channels are the most energetic ones of the residual stream
    from lrc.student.init import residual_second_moment

    energy = residual_second_moment(LowRankClone(teacher, 40), [{"input_ids": ids, "position_ids": pos}]).diagonal()
    assert energy[keep].min() >= energy[[i for i in range(64) if i not in kept]].max()


def test_lrc_ablations_switch_terms_off():
    teacher = make_teacher("llama", False)
    ids, pos = packed_batch()
    model, _ = build_method(_cfg("lrc", clone_gate=0.0, clone_up=0.0, clone_ffn_out=0.0, kl_weight=0.0), teacher)
    terms = model(ids, position_ids=pos).terms
    assert "clone/q" in terms and not {"clone/gate", "clone/up", "clone/ffn_out"} & set(terms)
    assert terms["kl"] == 0


def test_held_out_batches_in_lockstep_for_a_sharded_teacher():
    from lrc.distributed.processes import DistInfo
    from lrc.train.heldout import eval_batches

    # 7 sequences, 2 ranks, batches of 2: rank 0 has 4 sequences (2 batches), rank 1 has 3 (2 batches),
    # with 5 sequences rank 1 has 2 (1 batch) and must run one more, uncounted, forward in lockstep.
    r0, r1 = DistInfo(rank=0, world_size=2), DistInfo(rank=1, world_size=2)
    assert eval_batches(7, 2, 10, r0) == [([0, 2], True), ([4, 6], True)]
    assert eval_batches(7, 2, 10, r1) == [([1, 3], True), ([5], True)]
    assert eval_batches(5, 2, 10, r1) == [([1, 3], True)]
    assert eval_batches(5, 2, 10, r1, lockstep=True) == [([1, 3], True), ([0, 2], False)]
    assert len(eval_batches(5, 2, 10, r0, lockstep=True)) == 2
    assert eval_batches(100, 2, 1, r1, lockstep=True) == [([1, 3], True)]  # max_batches caps both ranks


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("accum, checkpointing, ffn_size", [(1, False, None), (2, False, None), (2, True, None),
                                                          (2, True, 24)])
def test_sharded_projections_train_like_whole_ones(one_rank_group, accum, checkpointing, ffn_size):
    """Each layer's FSDP2 unit (one rank here: torchrun tests cover two) gathers its projections where the
    layer runs (again in its recomputation under checkpointing), and every gradient reaches the shards: the
    generated weights', the clone targets' mapped through P_o / P_down / Q, over all micro-batches."""
    from lrc.data.batch import next_token_labels
    from lrc.distributed.fsdp import gathered, is_sharded
    from lrc.distributed.processes import DistInfo
    from lrc.train.trainer import train_step

    teacher = make_teacher("llama", False)
    runs = []
    for shard in (False, True):
        torch.manual_seed(0)
        method, _ = build_method(_cfg("lrc", grad_checkpointing=checkpointing, ffn_size=ffn_size), teacher)
        if shard:
            assert "layer projections sharded" in method.shard_trainables(torch.device("cpu"))
            assert is_sharded(method.clone.layers[0].o) and not is_sharded(method.clone.embed)
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
        logged = []
        for step in range(3):
            micro = []
            for s in range(accum):
                ids, pos = packed_batch(seed=10 * step + s)
                micro.append({"input_ids": ids, "position_ids": pos, "labels": next_token_labels(ids, pos)})
            r = train_step(method, micro, opt, device=torch.device("cpu"), precision="fp32", info=DistInfo(),
                           grad_clip=0.05)  # small enough to clip: the norm scales the update
            logged += [r.loss, r.grad_norm, r.terms["clone"]]
        with torch.no_grad():
            held_out = method(*packed_batch(seed=99)).loss.item()
        weights = {k: gathered(v).clone() for k, v in method.trainable_state_dict().items()}
        runs.append((logged, held_out, weights))
    (a, held_a, wa), (b, held_b, wb) = runs
    assert b == pytest.approx(a, rel=1e-5)
    assert held_b == pytest.approx(held_a, rel=1e-5)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wb[k], wa[k], rtol=1e-4, atol=1e-6), k


def _uneven_batch(rows: int = 8, seq: int = 24, seed: int = 5) -> dict:
    """Packed rows with assistant-only targets of very uneven length (1 to seq-2 tokens) and right padding on
    some rows: micro-batches of these hold very different numbers of KL, CE and clone tokens."""
    from lrc.data.batch import IGNORE_INDEX, next_token_labels

    g = torch.Generator().manual_seed(seed)
    ids, pos = packed_batch(batch=rows, seq=seq, seed=seed)
    attn = torch.ones(rows, seq, dtype=torch.long)
    loss_mask = torch.zeros(rows, seq, dtype=torch.bool)
    for r in range(rows):
        valid = seq - (int(torch.randint(0, seq // 2, (1,), generator=g)) if r % 3 == 0 else 0)
        attn[r, valid:] = 0
        n = 1 if r % 2 else int(torch.randint(2, valid - 1, (1,), generator=g))
        start = int(torch.randint(0, valid - n, (1,), generator=g))
        loss_mask[r, start:start + n] = True
    labels = next_token_labels(ids, pos, attn)
    labels[~loss_mask] = IGNORE_INDEX
    return {"input_ids": ids, "position_ids": pos, "attention_mask": attn, "labels": labels, "loss_mask": loss_mask}


@pytest.mark.parametrize("method_name", ["lrc", "kd"])
def test_a_step_is_token_weighted_whatever_the_micro_batch_split(method_name):
    """--grad-accum 4 --batch-size 2 == --batch-size 8: every term (CE, KL, clone) is a mean over the step's
    tokens, not a mean of micro-batch means (which weighs a micro-batch of one target token like a full one)."""
    from lrc.distributed.processes import DistInfo
    from lrc.train.trainer import train_step

    teacher = make_teacher("llama", False)
    batch = _uneven_batch()
    results = []
    for accum in (1, 4):
        torch.manual_seed(0)
        method, _ = build_method(_cfg(method_name), teacher)
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
        rows = 8 // accum
        micro = [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(accum)]
        r = train_step(method, micro, opt, device=torch.device("cpu"), precision="fp32", info=DistInfo())
        with torch.no_grad():
            after = method(*packed_batch(seed=99)).loss.item()
        results.append((r, after))
    (one, after_one), (four, after_four) = results
    assert set(four.terms) == set(one.terms) and "kl" in one.terms
    for k, v in one.terms.items():
        assert four.terms[k] == pytest.approx(v, rel=1e-5), k
    assert four.loss == pytest.approx(one.loss, rel=1e-5)
    assert four.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    assert after_four == pytest.approx(after_one, rel=1e-5)


@pytest.mark.parametrize("init", ["pca", "refit"])
def test_kd_from_lrcs_start_is_lrcs_initial_student_multiplied_out(init):
    # Catches a kd student that ignores --init (random weights) or starts from another calibration than LRC's.
    teacher = make_teacher("qwen2", True)
    ids, pos = packed_batch()
    batches = lambda: [{"input_ids": ids, "position_ids": pos}]  # noqa: E731
    assert METHODS["kd"].needs_calibration(_cfg("kd", init=init))
    kd, info = build_method(_cfg("kd", init=init), teacher, calibration=batches)
    lrc, _ = build_method(_cfg("lrc", init=init), teacher, calibration=batches)
    assert isinstance(kd, Direct) and info  # what pca (and refit) measured, for the start-up summary
    want = lrc.student_model().state_dict()
    got = kd.student_model().state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    # the free student trains every weight, the teacher still gives the KL
    out = kd(ids, position_ids=pos)
    assert out.terms["kl"] > 0


def test_kd_with_random_init_is_the_random_student():
    teacher = make_teacher("llama", False)
    assert not METHODS["kd"].needs_calibration(_cfg("kd", init="random"))
    kd, _ = build_method(_cfg("kd", init="random", seed=3), teacher, calibration=None)
    want = random_student(teacher, 40, 3).state_dict()
    for name, value in kd.student_model().state_dict().items():
        assert torch.equal(value, want[name]), name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sharded_projections_are_whole_one_layer_at_a_time(one_rank_group, monkeypatch, checkpointing):
    """Under fsdp each layer's projections are gathered while that layer runs and resharded (their gradients
    reduce-scattered) after its backward: counted on FSDP2's own unshard/reshard of the layer units during a
    training step of a 4-layer student, every layer is gathered, never more than one at a time (two while
    the backward of one layer hands over to the next one's gather, with FSDP2's prefetch)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from lrc.distributed.processes import DistInfo
    from lrc.train.trainer import train_step

    teacher = make_teacher("llama", False, num_hidden_layers=4)
    method, _ = build_method(_cfg("lrc", grad_checkpointing=checkpointing), teacher)
    method.shard_trainables(torch.device("cpu"))
    units = {id(u._get_fsdp_state()._fsdp_param_group): i for i, u in enumerate(method.clone.layers)}
    whole: set[int] = set()
    most, gathered_layers = [0], set()
    unshard, reshard = FSDPParamGroup.unshard, FSDPParamGroup.reshard

    def counting_unshard(group, *a, **kw):
        out = unshard(group, *a, **kw)
        if id(group) in units:
            whole.add(units[id(group)])
            gathered_layers.add(units[id(group)])
            most[0] = max(most[0], len(whole))
        return out

    def counting_reshard(group, *a, **kw):
        whole.discard(units.get(id(group), -1))
        return reshard(group, *a, **kw)

    monkeypatch.setattr(FSDPParamGroup, "unshard", counting_unshard)
    monkeypatch.setattr(FSDPParamGroup, "reshard", counting_reshard)
    ids, pos = packed_batch()
    from lrc.data.batch import next_token_labels

    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    train_step(method, [{"input_ids": ids, "position_ids": pos, "labels": next_token_labels(ids, pos)}], opt,
               device=torch.device("cpu"), precision="fp32", info=DistInfo())
    assert gathered_layers == {0, 1, 2, 3}
    assert not whole  # all resharded after the step
    assert 1 <= most[0] <= 2


def test_kd_from_lrcs_start_weighs_ce_by_its_own_default_unless_given():
    plain = RunConfig()
    assert FREE_CE_WEIGHT != plain.loss.ce and FREE_MIN_LR_RATIO != plain.optim.min_lr_ratio  # else checks nothing
    for start in (_cfg("kd"), _cfg("kd", init="pca")):  # the default method and init, and pca
        cfg = method_defaults(start, set())
        assert cfg.loss.ce == FREE_CE_WEIGHT and cfg.optim.min_lr_ratio == FREE_MIN_LR_RATIO
    given = method_defaults(_cfg("kd", ce_weight=1.0, min_lr_ratio=0.0), {"ce_weight", "min_lr_ratio"})
    assert given.loss.ce == 1.0 and given.optim.min_lr_ratio == 0.0  # given: kept
    for other in (_cfg("lrc"), _cfg("kd", init="random"), _cfg("prune-kd"), _cfg("scratch")):
        cfg = method_defaults(other, set())
        assert cfg.loss.ce == other.loss.ce and cfg.optim.min_lr_ratio == other.optim.min_lr_ratio
