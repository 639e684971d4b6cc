"""End-to-end distillation of ces: the coarse KL, the step loop, and the job (only ces change, KL drops, seeded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moecompress  # noqa: F401  (registers the quantizer)
from moecompress.errors import MoeCompressError
from moecompress.model.tiny import build_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes import distill_ces
from moecompress.api.compress_experts import compress_experts_job
from moecompress.passes.compressed_experts import CompressExpertsConfig
from moecompress.passes.distill_ces import adam_steps, coarse_kl, split_sequences, teacher_targets


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- the math -----------------------------------------------------------------------------------------


def _full_kl(p_logits, q_logits):
    p = F.log_softmax(p_logits, -1)
    return (p.exp() * (p - F.log_softmax(q_logits, -1))).sum(-1)


def test_coarse_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(20, 50, generator=gen) * 3, torch.randn(20, 50, generator=gen) * 3
    full = _full_kl(teacher, student)
    torch.testing.assert_close(coarse_kl(teacher_targets(teacher, 50), student), full, rtol=1e-5, atol=1e-6)
    coarse = coarse_kl(teacher_targets(teacher, 5), student)
    assert (coarse <= full + 1e-6).all() and (coarse >= -1e-6).all()
    assert coarse_kl(teacher_targets(teacher, 5), teacher).abs().max() < 1e-5  # student = teacher: no loss


def test_adam_steps_lowers_a_quadratic_and_is_seeded():
    target = 2.0 + 0.1 * torch.randn(16, 3, generator=torch.Generator().manual_seed(1))  # minimum near w = 2

    def run(seed):
        w = torch.zeros(3, requires_grad=True)
        losses = adam_steps([w], lambda rows: (target[rows] - w).pow(2).mean(), 16, 4, 60, 0.1, seed)
        return w.detach(), losses

    (w1, l1), (w2, l2), (w3, _) = run(0), run(0), run(1)
    assert l1[-1] < 0.1 * l1[0]
    assert torch.equal(w1, w2) and l1 == l2
    assert not torch.equal(w1, w3)  # the seed drives the minibatch order


def test_split_sequences_holds_back_at_least_one():
    train, held = split_sequences(5, 0.1, seed=0)
    assert held.numel() == 1 and train.numel() == 4
    assert sorted(torch.cat([train, held]).tolist()) == list(range(5))


# -- the job ------------------------------------------------------------------------------------------


CALIB = torch.randint(3, 256, (32, 32), generator=torch.Generator().manual_seed(8))


def _cfg(steps: int, seed: int = 0) -> CompressExpertsConfig:
    return CompressExpertsConfig(
        n_ce=1, fit_steps=0, distill_steps=steps, distill_lr=1e-2, distill_batch_size=8, holdout_fraction=0.25, seed=seed
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny qwen3_moe with sharper experts and logits, so that dropping an expert changes the next-token distribution."""
    model = build_tiny_model("qwen3_moe", seed=0)
    for block in describe_model(model).blocks.values():
        for e in range(block.num_experts):
            for proj in ("gate", "up", "down"):
                block.experts.set(e, proj, block.experts.get(e, proj) * 4)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    folder = tmp_path_factory.mktemp("distill") / "src"
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def runs(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_runs")
    out = {}
    for name, cfg in (("plain", _cfg(0)), ("distilled", _cfg(40)), ("again", _cfg(40))):
        _, cpass = compress_experts_job(source, root / name, cfg, CALIB, {"source": "test"})
        tensors = {}
        for f in sorted((root / name).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        out[name] = (cpass, tensors)
    return out


def test_distillation_lowers_kl_on_heldback_calibration_sequences(runs):
    cpass, _ = runs["distilled"]
    d = cpass.distill
    assert d.steps == 40 and len(d.losses) == 40 and d.heldout_sequences == 8 and d.train_sequences == 24
    assert d.kl_train_before > 0.1  # the compression really changes the distributions
    assert d.kl_train_after < d.kl_train_before
    assert d.kl_heldout_after < d.kl_heldout_before
    assert runs["plain"][0].distill is None


def test_only_ces_change(runs):
    _, plain = runs["plain"]
    _, distilled = runs["distilled"]
    assert plain.keys() == distilled.keys()
    ces = [k for k in plain if k.endswith(".ces")]
    assert len(ces) == 3
    for k in plain:
        if k in ces:
            assert not torch.equal(plain[k], distilled[k]), k
            assert torch.equal(plain[k], torch.ones_like(plain[k]))  # fit_steps = 0: the layer-wise pass left them at ones
        else:
            assert torch.equal(plain[k], distilled[k]), k  # bit-identical


def test_distillation_is_deterministic_with_the_seed(runs):
    (a, ta), (b, tb) = runs["distilled"], runs["again"]
    assert a.distill.losses == b.distill.losses
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_refused_up_front_when_the_whole_model_does_not_fit(source, tmp_path, monkeypatch):
    monkeypatch.setattr(distill_ces, "available_memory_bytes", lambda: 1024)
    with pytest.raises(MoeCompressError, match="whole model"):
        compress_experts_job(source, tmp_path / "out", _cfg(5), CALIB, {"source": "test"})
    assert not (tmp_path / "out").exists()
    compress_experts_job(source, tmp_path / "ok", _cfg(0), CALIB, {"source": "test"})  # no distillation: no check


def test_config_rejects_bad_distillation_settings():
    with pytest.raises(MoeCompressError, match="--distill-steps must be >= 0"):
        _cfg(-1).validate()
    with pytest.raises(MoeCompressError, match="--distill-lr"):
        CompressExpertsConfig(distill_lr=0).validate()
    with pytest.raises(MoeCompressError, match="--n-ce"):
        CompressExpertsConfig(n_ce=0, distill_steps=3).validate()
