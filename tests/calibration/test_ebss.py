"""EBSS on a tiny random Qwen3-MoE: balanced, deterministic, and its pure math pieces."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moecompress.calibration.ebss import (
    _RoutingRecorder,
    balance_sigma,
    counts_cv,
    ebss_generate,
    expert_load_cv,
    find_experts_modules,
    routing_counts,
)
from moecompress.calibration.sources import load_calibration
from moecompress.errors import CalibrationError

NSAMPLES, SEQLEN = 8, 32


def _tiny_qwen3_moe(router_bias: float) -> nn.Module:
    cfg = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Qwen3MoeTopKRouter":
                # A shared offset on experts 0 and 1 aligns them with the mean hidden state: unguided text
                # then overloads them, which EBSS has to steer around.
                module.weight[:2] += router_bias
    return model


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny decode steps run fastest on one thread; two threads on a busy 2-core machine run 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return _tiny_qwen3_moe(router_bias=0.1)


def _ancestral_samples(model, nsamples, seqlen, seed):
    """Plain sampling from the model's distribution: random first token, then multinomial with a KV cache."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (nsamples, 1), generator=gen)
    seq, cache = ids, None
    with torch.no_grad():
        for _ in range(seqlen - 1):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            ids = torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1, generator=gen)
            seq = torch.cat([seq, ids], dim=1)
    return seq


# -------------------------------------------------------------------------------------------------- EBSS


def _reference_ebss(model, first_token, seqlen, beam_width, tau, top_m):
    """Algorithm 1 without KV cache or batching: every candidate re-read from scratch by a full forward."""
    recorder = _RoutingRecorder(model)

    def read(tokens):  # -> (next-token log-probs [V], usage [L, E]) of a whole sequence
        with recorder.attached(), torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
        return torch.log_softmax(logits, -1), recorder.take().sum(0)

    beams = [([first_token], 0.0)]  # (tokens, cumulative log-likelihood RS)
    for step in range(1, seqlen):
        candidates = []
        for tokens, rs in beams:
            logprobs, _ = read(tokens)
            top_logp, top_tok = logprobs.topk(top_m)
            for logp, tok in zip(top_logp.tolist(), top_tok.tolist()):
                _, usage = read(tokens + [tok])
                score = -(rs + logp) / (step + 1) + balance_sigma(usage).item() / tau
                candidates.append((score, tokens + [tok], rs + logp))
        candidates.sort(key=lambda c: c[0])
        beams = [(tokens, rs) for _, tokens, rs in candidates[:beam_width]]
    return beams[0][0]




def test_ebss_is_more_balanced_than_ancestral_sampling(model):
    calib = load_calibration("self", None, nsamples=NSAMPLES, seqlen=SEQLEN, seed=0, model=model)
    assert calib.input_ids.shape == (NSAMPLES, SEQLEN) and calib.input_ids.dtype == torch.long
    ebss_cv = expert_load_cv(model, calib.input_ids)
    plain_cv = expert_load_cv(model, _ancestral_samples(model, NSAMPLES, SEQLEN, seed=0))
    assert plain_cv > 0.3  # the biased router really is unbalanced under plain sampling
    assert ebss_cv < 0.5 * plain_cv


def test_ebss_matches_a_cache_free_reference_of_algorithm_1(model):
    calib = ebss_generate(model, 2, 8, seed=3, beam_width=3, tau=0.05, top_m=3)
    for row in calib.input_ids:
        expected = _reference_ebss(model, int(row[0]), 8, beam_width=3, tau=0.05, top_m=3)
        assert row.tolist() == expected


def test_ebss_is_deterministic_for_a_seed(model):
    first = ebss_generate(model, 3, 16, seed=5)
    again = ebss_generate(model, 3, 16, seed=5)
    other = ebss_generate(model, 3, 16, seed=6)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_ebss_rows_do_not_depend_on_batching_or_sample_count(model):
    # First tokens are drawn up front and samples never interact, so sample i is the same whatever the
    # number of samples asked or how many decode together.
    one_by_one = ebss_generate(model, 6, 12, seed=1, samples_per_batch=1)
    default = ebss_generate(model, 6, 12, seed=1)  # two batches of 4 and 2
    fewer = ebss_generate(model, 2, 12, seed=1)
    assert torch.equal(one_by_one.input_ids, default.input_ids)
    assert torch.equal(fewer.input_ids, default.input_ids[:2])


def test_ebss_never_emits_excluded_tokens_and_reports_progress(model):
    calls = []
    calib = ebss_generate(
        model, 5, 12, seed=0, vocab_exclude=range(0, 200), vocab_limit=250,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert bool(((calib.input_ids >= 200) & (calib.input_ids < 250)).all())
    assert calls == [(4, 5), (5, 5)]
    assert calib.domains == ["self"] * 5
    three_left = ebss_generate(model, 2, 10, seed=0, vocab_exclude=range(3, 256))  # fewer than top_m and beams
    assert bool((three_left.input_ids < 3).all())


def test_ebss_rejects_bad_arguments(model):
    with pytest.raises(CalibrationError, match="nsamples"):
        ebss_generate(model, 0, 8)
    with pytest.raises(CalibrationError, match="seqlen"):
        ebss_generate(model, 1, 1)
    with pytest.raises(CalibrationError, match="samples_per_batch"):
        ebss_generate(model, 1, 8, samples_per_batch=0)
    with pytest.raises(CalibrationError, match="tau"):
        ebss_generate(model, 1, 8, tau=0.0)
    with pytest.raises(CalibrationError, match="whole vocabulary"):
        ebss_generate(model, 1, 8, vocab_exclude=range(256))
    with pytest.raises(CalibrationError, match="positions"):
        load_calibration("self", None, nsamples=1, seqlen=300, model=model)


def test_non_moe_model_is_a_calibration_error():
    with pytest.raises(CalibrationError, match="experts module"):
        expert_load_cv(nn.Linear(4, 4), torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------- routing capture


def test_recorder_reads_routing_from_positional_and_keyword_calls(model):
    (_, experts), *_ = find_experts_modules(model)
    recorder = _RoutingRecorder(model)
    hidden = torch.randn(3, 64)
    index = torch.tensor([[0, 1], [1, 7], [7, 7]])
    weights = torch.full((3, 2), 0.5)
    with recorder.attached(), torch.no_grad():
        experts(hidden, index, weights)
        positional = recorder.latest[0].clone()
        experts(hidden_states=hidden, top_k_index=index, top_k_weights=weights)
        keyword = recorder.latest[0].clone()
    expected = torch.zeros(3, 8)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[1, 7] = 1
    expected[2, 7] = 2
    assert torch.equal(positional, expected) and torch.equal(keyword, expected)
    assert len(find_experts_modules(model)) == 2


def test_routing_counts_ignores_out_of_range_ids():
    counts = routing_counts(torch.tensor([[0, 4], [-1, 2]]), num_experts=4)  # 4 = expert-parallel sentinel
    assert torch.equal(counts, torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]]))


# --------------------------------------------------------------------------------------------- pure math


def test_balance_sigma_is_zero_when_even_one_when_concentrated_and_scale_free():
    even = torch.full((2, 8), 5.0)                  # [L, E]
    one_expert = torch.zeros(2, 8)
    one_expert[:, 3] = 9.0
    skewed = torch.tensor([[4.0, 2, 1, 1], [1, 1, 1, 1]])
    assert balance_sigma(even).item() == pytest.approx(0.0, abs=1e-7)
    assert balance_sigma(one_expert).item() == pytest.approx(1.0)
    assert balance_sigma(skewed).item() == pytest.approx(balance_sigma(10 * skewed).item())
    # Per-layer values are averaged: the balanced second layer halves the first layer's sigma.
    assert balance_sigma(skewed).item() == pytest.approx(balance_sigma(skewed[:1]).item() / 2)
    batched = torch.stack([even, one_expert])       # [..., L, E] broadcasting
    assert balance_sigma(batched).tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert balance_sigma(torch.zeros(1, 4)).item() == 0.0  # no assignment yet: no penalty, no NaN


def test_counts_cv_matches_hand_computation():
    counts = torch.tensor([[2.0, 4.0, 6.0], [5.0, 5.0, 5.0]])
    cv_first = torch.tensor([2.0, 4.0, 6.0]).std(unbiased=False).item() / 4.0
    assert counts_cv(counts) == pytest.approx(cv_first / 2)
    assert counts_cv(torch.zeros(2, 3)) == 0.0
