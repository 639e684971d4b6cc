"""Heal's math and plumbing: the losses, LoRA merge-back exactness, trainable selection, the resumable step loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecompress.errors import MoeCompressError
from moecompress.model.tiny import build_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.distill_ces import coarse_kl, resumable_adam, teacher_targets
from moecompress.passes.heal import (
    HealConfig,
    HiddenStore,
    available_kinds,
    check_trainables,
    clearly_lower,
    distill_loss,
    guard_keeps,
    lr_factor,
    lora_init,
    merge_lora,
    normalized_mse,
    select_trainables,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _routers(model) -> list[str]:
    view = describe_model(model)
    return [f"{view.layers_name}.{i}.{b.block_name}.{b.router_name}" for i, b in view.blocks.items()]


# -- the math -----------------------------------------------------------------------------------------


def test_normalized_mse_is_zero_on_target_and_scale_free():
    gen = torch.Generator().manual_seed(0)
    y, x = torch.randn(4, 8, 16, generator=gen), torch.randn(4, 8, 16, generator=gen)
    assert normalized_mse(y, y) == 0
    torch.testing.assert_close(normalized_mse(3 * x, 3 * y), normalized_mse(x, y))
    torch.testing.assert_close(normalized_mse(x, y), (x - y).pow(2).sum() / y.pow(2).sum())


def test_lora_starts_as_a_no_op_and_merge_is_b_times_a():
    w = torch.randn(3, 6, 5)
    a, b = lora_init(w.shape, 2, torch.Generator().manual_seed(0))
    assert a.shape == (3, 2, 5) and b.shape == (3, 6, 2)
    assert torch.equal(merge_lora(w, a, b), w)
    b = torch.randn_like(b)
    for e in range(3):
        torch.testing.assert_close(merge_lora(w, a, b)[e], w[e] + b[e] @ a[e])


def test_distill_loss_at_temperature_one_is_the_mean_coarse_kl():
    gen = torch.Generator().manual_seed(1)
    t, s = torch.randn(10, 30, generator=gen), torch.randn(10, 30, generator=gen)
    torch.testing.assert_close(distill_loss(teacher_targets(t, 30), s, 1.0), coarse_kl(teacher_targets(t, 30), s).mean())
    # At temperature T the targets come from logits / T and the loss is scaled by T^2.
    full = (F.log_softmax(t / 2, -1).exp() * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(distill_loss(teacher_targets(t / 2, 30), s, 2.0), full, rtol=1e-5, atol=1e-6)


def test_resumed_adam_equals_an_uninterrupted_run():
    target = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))

    def loss_of(w):
        return lambda rows: (target[rows] - w).pow(2).mean()

    w1 = torch.zeros(4, requires_grad=True)
    full = resumable_adam([w1], loss_of(w1), 12, 5, 20, 0.05, seed=3)
    saved = {}
    w2 = torch.zeros(4, requires_grad=True)

    def save(step, opt, losses):
        if step == 8:
            saved.update(w=w2.detach().clone(), opt=opt.state_dict(), losses=list(losses))

    resumable_adam([w2], loss_of(w2), 12, 5, 8, 0.05, seed=3, after_step=save)
    w3 = saved["w"].clone().requires_grad_(True)
    resumed = resumable_adam([w3], loss_of(w3), 12, 5, 20, 0.05, seed=3, start_step=8,
                             optimizer_state=saved["opt"], losses=saved["losses"])
    assert resumed == full
    assert torch.equal(w3.detach(), w1.detach())


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resumed_adam_follows_the_schedule_exactly(schedule):
    target = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    scale = lambda step: lr_factor(step, 20, schedule)  # noqa: E731 - a function of the step only

    def run(w, steps, **kw):
        return resumable_adam([w], lambda rows: (target[rows] - w).pow(2).mean(), 12, 5, steps, 0.05, seed=3, lr_scale=scale, **kw)

    w1 = torch.zeros(4, requires_grad=True)
    full = run(w1, 20)
    saved = {}
    w2 = torch.zeros(4, requires_grad=True)
    run(w2, 8, after_step=lambda step, opt, losses: saved.update(w=w2.detach().clone(), opt=opt.state_dict(), losses=list(losses)))
    w3 = saved["w"].clone().requires_grad_(True)
    assert run(w3, 20, start_step=8, optimizer_state=saved["opt"], losses=saved["losses"]) == full
    assert torch.equal(w3.detach(), w1.detach())
    w4 = torch.zeros(4, requires_grad=True)
    plain = resumable_adam([w4], lambda rows: (target[rows] - w4).pow(2).mean(), 12, 5, 20, 0.05, seed=3)
    assert (plain == full) == (schedule == "constant")  # the schedule really changes the steps


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, "cosine") for s in range(100)]
    assert factors[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]  # linear warmup over 5% of the steps
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # then never increases
    assert factors[-1] < 1e-3
    # a half cosine over the 95 decay steps: point-symmetric about its middle (f(5 + k) + f(100 - k) = 1)
    assert all(abs(lr_factor(5 + k, 100, "cosine") + lr_factor(100 - k, 100, "cosine") - 1) < 1e-12 for k in range(96))
    assert {lr_factor(s, 100, "constant") for s in range(100)} == {1.0}


def test_clearly_lower_asks_for_a_decrease_beyond_the_noise_of_the_paired_differences():
    before = torch.tensor([1.0, 1.2, 0.9, 1.1, 1.0, 1.3])
    assert clearly_lower(before, before - 0.05, 2.0)  # every sequence a bit lower: no noise at all
    noisy = before - torch.tensor([0.3, -0.2, 0.25, -0.15, 0.2, -0.1])  # mean decrease 0.05, spread 0.23
    assert clearly_lower(before, noisy, 0.0) and not clearly_lower(before, noisy, 2.0)
    assert not clearly_lower(before, before, 0.0)  # unchanged is not better
    assert not clearly_lower(before, before + 0.01, 0.0)
    assert clearly_lower(torch.tensor([1.0]), torch.tensor([0.9]), 2.0)  # one sequence: the decrease alone
    assert clearly_lower(torch.zeros(0), torch.zeros(0), 2.0)  # nothing to check


def test_the_guard_needs_both_the_calibration_and_the_teacher_sampled_kl_to_drop():
    before = torch.tensor([0.10, 0.12, 0.09, 0.11])
    better, worse = (before, before * 0.9), (before, before * 1.02)
    assert guard_keeps(better, better, 2.0)
    assert not guard_keeps(better, worse, 2.0)  # calibration better, the teacher's own text worse
    assert not guard_keeps(worse, better, 2.0)
    assert guard_keeps(better, (torch.zeros(0), torch.zeros(0)), 2.0)  # no guard samples: calibration only


def test_config_refuses_bad_values():
    for bad in (dict(mode="sideways"), dict(train=("lora", "embeddings")), dict(steps=0), dict(lr=0.0), dict(lora_rank=0),
                dict(holdout_fraction=0.9), dict(temperature=-1.0), dict(guard_samples=-1), dict(guard_z=-0.5),
                dict(schedule="linear")):
        with pytest.raises(MoeCompressError):
            HealConfig(**bad).validate()
    HealConfig().validate()


# -- model plumbing -----------------------------------------------------------------------------------


def test_lora_merge_back_reproduces_the_adapter_models_logits_exactly():
    model = build_tiny_model("qwen3_moe", seed=0)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(4))
    before = model(input_ids=ids).logits
    tr = select_trainables(model, _routers(model), ("lora",), 4, torch.Generator().manual_seed(0), prefix="model.layers.")
    assert tr.kinds == {"lora": 6} and not tr.direct  # gate_up_proj and down_proj of 3 layers
    with torch.no_grad():
        for a, b in tr.lora.values():
            b.normal_(0, 0.05)
    adapted = tr(input_ids=ids).logits
    assert (adapted - before).abs().max() > 1e-3  # the adapters do change the model
    tr.merge()
    merged = model(input_ids=ids).logits
    assert torch.equal(merged, adapted)


def test_selection_picks_only_the_requested_kinds_and_never_the_embeddings():
    model = build_tiny_model("qwen3_moe", seed=0)
    tr = select_trainables(model, _routers(model), ("routers", "norms"), 4, torch.Generator(), prefix="model.layers.")
    names = set(tr.direct)
    assert any(n.endswith("mlp.gate.weight") for n in names) and any("layernorm" in n for n in names)
    assert not any("embed" in n or "lm_head" in n or n == "model.norm.weight" for n in names)
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    assert available_kinds(model, _routers(model)) == {"routers", "norms", "lora"}
    with pytest.raises(MoeCompressError, match="compressed experts"):
        check_trainables({"routers", "norms", "lora"}, ("ces",), "the student")


def test_hidden_store_round_trips_rows(tmp_path):
    store = HiddenStore(tmp_path, (5, 3, 4))
    data = torch.randn(5, 3, 4)
    store.write("teacher", 1, [(0, data[:2]), (2, data[2:])])
    assert store.exists("teacher", 1) and not store.exists("student", 1)
    assert torch.equal(store.read("teacher", 1, torch.tensor([4, 0])), data[[4, 0]])
    store.delete_before(2)
    assert not store.exists("teacher", 1)


def test_the_adapters_train_at_their_own_learning_rate():
    """--lora-lr: Adam moves each adapter entry by at most ~lora_lr per step, the direct tensors by ~lr."""
    model = build_tiny_model("qwen3_moe", seed=0)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(4))
    tr = select_trainables(model, _routers(model), ("routers", "lora"), 4, torch.Generator().manual_seed(0), prefix="model.layers.")
    routers0 = {n: p.detach().clone() for n, p in tr.direct.items()}
    groups = tr.param_groups(1e-2, 1e-5)
    assert [g["lr"] for g in groups] == [1e-2, 1e-5]
    assert [t for g in groups for t in g["params"]] == tr.parameters()  # the order checkpoints rely on
    resumable_adam(groups, lambda rows: tr(input_ids=ids[rows]).logits.pow(2).mean(), 2, 2, 5, 1.0, seed=0)
    lora_b_move = max(float(b.abs().max()) for _a, b in tr.lora.values())
    router_move = max(float((p - routers0[n]).abs().max()) for n, p in tr.direct.items())
    assert 0 < lora_b_move <= 5 * 1e-5 * 1.01  # B starts at 0
    assert router_move > 5 * 1e-5 * 10
    assert tr.param_groups(1e-2, None)[1]["lr"] == 1e-2  # default: the adapters share --lr


def test_routers_and_norms_train_at_their_own_learning_rates():
    """--router-lr / --norm-lr: each kind's tensors form their own Adam group (order = ``parameters``, which
    checkpoints rely on); without them everything direct shares --lr in one group, as before."""
    model = build_tiny_model("qwen3_moe", seed=0)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(4))
    tr = select_trainables(model, _routers(model), ("routers", "norms"), 4, torch.Generator().manual_seed(0), prefix="model.layers.")
    assert set(tr.direct_kind.values()) == {"routers", "norms"}
    assert len(tr.param_groups(1e-2, None)) == 1 and tr.param_groups(1e-2, None, {"routers": None})[0]["lr"] == 1e-2
    kind_lr = {"routers": 1e-5, "norms": None}
    groups = tr.param_groups(1e-2, None, kind_lr)
    assert sorted(g["lr"] for g in groups) == [1e-5, 1e-2]
    assert [t for g in groups for t in g["params"]] == tr.parameters(1e-2, kind_lr)
    before = {n: p.detach().clone() for n, p in tr.direct.items()}
    resumable_adam(groups, lambda rows: tr(input_ids=ids[rows]).logits.pow(2).mean(), 2, 2, 5, 1.0, seed=0)
    move = {k: max(float((p - before[n]).abs().max()) for n, p in tr.direct.items() if tr.direct_kind[n] == k)
            for k in ("routers", "norms")}
    assert 0 < move["routers"] <= 5 * 1e-5 * 1.01
    assert move["norms"] > 5 * 1e-5 * 10
    with pytest.raises(MoeCompressError, match="--router-lr"):
        HealConfig(router_lr=0.0).validate()
