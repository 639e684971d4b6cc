"""moecompress.heal: heals a tiny pruned model (KL to the teacher drops), output contract, determinism,
resume after a kill, end-to-end mode, exact-router and compressed-experts students, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizer_util import save_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import moecompress
from moecompress.api.experts import StatsSource, merge_job, prune_job
from moecompress.api.heal import HealOptions, heal
from moecompress.errors import MoeCompressError
from moecompress.model.tiny import build_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes import distill_ces
from moecompress.passes.merge import MergeConfig
from moecompress.passes.prune import PruneConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _text(start: int, stop: int) -> str:
    return " ".join(f"the experts route token {i} and def f(x): return x * {i}." for i in range(start, stop))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny qwen3_moe teacher (sharper experts and logits, so removing experts matters), its pruned and
    exact-merged students, and a calibration text file."""
    root = tmp_path_factory.mktemp("heal")
    model = build_tiny_model("qwen3_moe", seed=0)
    for block in describe_model(model).blocks.values():
        for e in range(block.num_experts):
            for proj in ("gate", "up", "down"):
                block.experts.set(e, proj, block.experts.get(e, proj) * 4)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    model.save_pretrained(str(root / "teacher"))
    save_tiny_tokenizer(root / "teacher")
    (root / "calib.txt").write_text(_text(0, 300))
    source = StatsSource(calib=str(root / "calib.txt"), nsamples=8, seqlen=32, batch_size=8)
    prune_job(root / "teacher", root / "pruned", PruneConfig("frequency", num_experts=2), source)
    merge_job(root / "teacher", root / "merged-exact", MergeConfig(2, router="exact"), source)
    return root


def _options(root: Path, **kw) -> HealOptions:
    # guard_samples=0: these tests check the training itself on template text; the tiny teacher is random, so
    # its own samples are noise unrelated to that text (the guard on teacher samples is tested below); guard_z=0:
    # with 2 held-back sequences a noise margin means little, the decrease alone decides (the old rule).
    base = dict(teacher=str(root / "teacher"), calib=str(root / "calib.txt"), nsamples=16, seqlen=32, steps=30, lr=1e-2,
                batch_size=4, checkpoint_every=5, guard_samples=0, guard_z=0.0)
    return HealOptions(**{**base, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _kl_to_teacher(root: Path, folder: Path) -> float:
    """Mean KL(teacher || model) per token on text never used for calibration."""
    tok = AutoTokenizer.from_pretrained(str(root / "teacher"))
    ids = torch.tensor(tok(_text(1000, 1040))["input_ids"][:256]).reshape(8, 32)
    with torch.no_grad():
        t = F.log_softmax(AutoModelForCausalLM.from_pretrained(str(root / "teacher"))(input_ids=ids).logits, -1)
        s = F.log_softmax(AutoModelForCausalLM.from_pretrained(str(folder))(input_ids=ids).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.fixture(scope="module")
def healed(root):
    result = heal(root / "pruned", root / "healed", _options(root))
    return result


def test_heal_lowers_the_kl_to_the_teacher_on_unseen_text(root, healed):
    before, after = _kl_to_teacher(root, root / "pruned"), _kl_to_teacher(root, root / "healed")
    assert before > 0.05  # pruning really changed the model
    assert after < 0.8 * before
    records = healed.summary["records"]
    assert len(records) == 3 and all(r["kept"] and r["heldout_after"] < r["heldout_before"] for r in records)
    guard = healed.summary["model_guard"]
    assert guard["kept"] and guard["kl_healed"] < 0.5 * guard["kl_student"]
    assert healed.summary["train_tokens"] == 3 * 30 * 4 * 32


def test_output_is_a_plain_checkpoint_like_the_student(root, healed):
    out = root / "healed"
    assert not (root / "healed.moecompress-heal-work").exists()  # removed after success
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((root / "pruned" / "config.json").read_text()) and "quantization_config" not in config
    assert (out / "kept_experts.json").read_bytes() == (root / "pruned" / "kept_experts.json").read_bytes()
    assert "moecompress heal" in (out / "report.md").read_text()
    student = {}
    for f in (root / "pruned").glob("*.safetensors"):
        student.update(load_file(str(f)))
    healed_t = {}
    for f in out.glob("*.safetensors"):
        healed_t.update(load_file(str(f)))
    assert student.keys() == healed_t.keys()
    for name in student:
        same = torch.equal(student[name], healed_t[name])
        if "embed_tokens" in name or "lm_head" in name or "self_attn.q_proj" in name:
            assert same, name  # never trained
        if name.endswith("mlp.gate.weight") or ".experts.0.down_proj" in name:
            assert not same, name  # routers and LoRA-merged experts changed
    AutoModelForCausalLM.from_pretrained(str(out))


def test_same_inputs_and_seed_give_the_same_bytes(root, healed, tmp_path):
    heal(root / "pruned", tmp_path / "again", _options(root))
    assert _files(tmp_path / "again") == _files(root / "healed")


class Killer:
    """A progress callback that dies at a given (layer, step) and records what ran."""

    def __init__(self, layer: int | str | None, step: int | None):
        self.at = layer if isinstance(layer, str) else f"heal layer {layer}/3"
        self.step, self.label, self.seen = step, "", []

    def relabel(self, label: str) -> None:
        self.label = label

    def __call__(self, done: int, total: int) -> None:
        self.seen.append((self.label, done))
        if self.label == self.at and done == self.step:
            raise KeyboardInterrupt


def test_resume_after_a_kill_equals_an_uninterrupted_run(root, healed, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        heal(root / "pruned", out, _options(root), progress=Killer(2, 13))
    assert not out.exists() and (tmp_path / "resumed.moecompress-heal-work").is_dir()
    again = Killer(None, None)
    heal(root / "pruned", out, _options(root), progress=again)
    labels = {label for label, _ in again.seen}
    assert "heal layer 1/3" not in labels  # layer 1 was finished before the kill: not trained again
    assert again.seen[0] == ("heal layer 2/3", 11)  # continued after the checkpoint at step 10
    assert _files(out) == _files(root / "healed")
    assert not (tmp_path / "resumed.moecompress-heal-work").exists()


def test_a_different_command_starts_the_work_folder_over(root, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        heal(root / "pruned", out, _options(root, steps=6), progress=Killer(2, 3))
    other = Killer(None, None)
    heal(root / "pruned", out, _options(root, steps=6, lr=5e-3), progress=other)
    assert other.seen[0] == ("heal layer 1/3", 1)


def test_a_layer_that_gets_worse_keeps_its_weights(root, tmp_path):
    result = heal(root / "pruned", tmp_path / "bad", _options(root, lr=1e3, steps=5))
    assert not any(r["kept"] for r in result.summary["records"])
    guard = result.summary["model_guard"]
    assert guard["kl_healed"] == guard["kl_student"] and not guard["kept"]
    student, out = {}, {}
    for f in (root / "pruned").glob("*.safetensors"):
        student.update(load_file(str(f)))
    for f in (tmp_path / "bad").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert all(torch.equal(student[k], out[k]) for k in student)


def test_end_to_end_mode_lowers_the_kl(root, tmp_path):
    result = heal(root / "pruned", tmp_path / "e2e", _options(root, mode="end-to-end", steps=40))
    (r,) = result.summary["records"]
    assert r["kept"] and r["heldout_after"] < r["heldout_before"]
    assert _kl_to_teacher(root, tmp_path / "e2e") < _kl_to_teacher(root, root / "pruned")


def test_end_to_end_resumes_from_its_checkpoint(root, tmp_path):
    opts = _options(root, mode="end-to-end", steps=12)
    heal(root / "pruned", tmp_path / "straight", opts)
    with pytest.raises(KeyboardInterrupt):
        heal(root / "pruned", tmp_path / "resumed", opts, progress=Killer("heal end-to-end", 8))
    again = Killer(None, None)
    heal(root / "pruned", tmp_path / "resumed", opts, progress=again)
    assert again.seen[0] == ("heal end-to-end", 6)  # after the checkpoint at step 5
    assert _files(tmp_path / "resumed") == _files(tmp_path / "straight")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("mode, lr", [("blockwise", 1e-2), ("end-to-end", 3e-2)])
def test_a_heal_that_only_fits_the_calibration_text_is_not_kept(root, tmp_path, mode, lr):
    """Healing on narrow template text lowers the held-back calibration KL but raises the KL on text
    sampled from the teacher: the guard (default z) writes the student unchanged (sampling is seeded: same bytes)."""
    opts = _options(root, mode=mode, lr=lr, guard_samples=8, guard_z=HealOptions().guard_z, steps=40)
    result = heal(root / "pruned", tmp_path / "a", opts)
    g = result.summary["model_guard"]
    assert g["kl_healed"] < 0.8 * g["kl_student"]  # the calibration text alone would have accepted it
    assert g["kl_healed_sampled"] > g["kl_student_sampled"]  # ... the teacher's own distribution got worse
    assert not g["kept"]
    student, out = _tensors(root / "pruned"), _tensors(tmp_path / "a")
    assert student.keys() == out.keys() and all(torch.equal(student[k], out[k]) for k in student)
    assert "teacher-sampled" in (tmp_path / "a" / "report.md").read_text()
    heal(root / "pruned", tmp_path / "b", opts)
    assert _files(tmp_path / "b") == _files(tmp_path / "a")


def test_a_heal_on_the_teachers_own_samples_passes_the_guard(root, tmp_path):
    opts = _options(root, mode="end-to-end", calib="sample", guard_samples=8, guard_z=HealOptions().guard_z, steps=40)
    result = heal(root / "pruned", tmp_path / "s", opts)
    g = result.summary["model_guard"]
    assert g["kept"] and g["kl_healed_sampled"] < g["kl_student_sampled"] - 2 * g["se_sampled"]
    assert not torch.equal(_tensors(root / "pruned")["model.layers.0.mlp.gate.weight"],
                           _tensors(tmp_path / "s")["model.layers.0.mlp.gate.weight"])


def test_end_to_end_is_refused_up_front_when_it_does_not_fit(root, tmp_path, monkeypatch):
    monkeypatch.setattr(distill_ces, "available_memory_bytes", lambda: 1024)
    with pytest.raises(MoeCompressError, match="whole student"):
        heal(root / "pruned", tmp_path / "e2e", _options(root, mode="end-to-end"))
    assert not (tmp_path / "e2e").exists() and not (tmp_path / "e2e.moecompress-heal-work").exists()
    heal(root / "pruned", tmp_path / "bw", _options(root, steps=2))  # blockwise needs one layer: not refused


def test_exact_router_merge_stays_a_loadable_native_checkpoint(root, tmp_path):
    out = tmp_path / "healed-exact"
    heal(root / "merged-exact", out, _options(root, steps=10))
    src = json.loads((root / "merged-exact" / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "config.json").read_text())["quantization_config"] == src
    assert moecompress is not None  # registered: the exact router's expert -> group map is rebuilt at load
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()
    assert _kl_to_teacher(root, out) < _kl_to_teacher(root, root / "merged-exact")


@pytest.fixture(scope="module")
def ce_student(root):
    from moecompress.api.compress_experts import compress_experts_job
    from moecompress.passes.compressed_experts import CompressExpertsConfig

    ids = torch.randint(3, 200, (8, 32), generator=torch.Generator().manual_seed(8))
    compress_experts_job(root / "teacher", root / "ce", CompressExpertsConfig(n_ce=1, fit_steps=0), ids, {"source": "test"})
    return root / "ce"


def test_lora_trains_inside_compressed_experts_blocks(root, ce_student, tmp_path):
    """The block computes its experts through ExpertsView, whose slices keep the autograd graph: a loss
    reaches the expert weights and the LoRA adapters put in their place, and healing with LoRA moves the
    experts of the compressed-experts student (the adapters merged into the written weights)."""
    from moecompress.passes.heal import select_trainables

    model = AutoModelForCausalLM.from_pretrained(str(ce_student))
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert experts and all(m.gate_up_proj.grad is not None and m.gate_up_proj.grad.abs().sum() > 0 for m in experts)
    assert all(m.down_proj.grad is not None and m.down_proj.grad.abs().sum() > 0 for m in experts)
    trainables = select_trainables(model, [], ("lora",), 4, torch.Generator().manual_seed(0), prefix="model.layers.")
    assert len(trainables.lora) == 2 * len(experts)  # gate_up_proj and down_proj of every compressed-experts block
    trainables(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).logits.pow(2).mean().backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for _a, b in trainables.lora.values())

    result = heal(ce_student, tmp_path / "lora", _options(root, train="lora", steps=10))
    assert all(r["trained"] == {"lora": 2} for r in result.summary["records"])
    kept = [r for r in result.summary["records"] if r["kept"]]
    assert kept and all(r["heldout_after"] < r["heldout_before"] for r in kept)

    def experts_of(folder):
        return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items() if "mlp.experts." in k}

    before, after = experts_of(ce_student), experts_of(tmp_path / "lora")
    assert before.keys() == after.keys()
    changed = {k.split(".mlp.")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{r['layer']}" for r in kept}  # exactly the kept layers' experts moved
    default = heal(ce_student, tmp_path / "default", _options(root, steps=2))
    assert all({"ces", "lora"} <= set(r["trained"]) for r in default.summary["records"])
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora"))


def test_compressed_experts_ces_train(root, ce_student, tmp_path):
    result = heal(ce_student, tmp_path / "ce-healed", _options(root, train="ces,routers", steps=20))
    assert all(r["trained"] == {"ces": 1, "routers": 1} for r in result.summary["records"])
    ces = {k: v for f in (tmp_path / "ce-healed").glob("*.safetensors") for k, v in load_file(str(f)).items() if k.endswith(".ces")}
    assert len(ces) == 3 and any(not torch.equal(v, torch.ones_like(v)) for v in ces.values())
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "ce-healed"))


def test_dry_run_writes_nothing(root, tmp_path):
    result = heal(root / "pruned", tmp_path / "dry", _options(root), dry_run=True)
    assert result.dry_run and not (tmp_path / "dry").exists() and not (tmp_path / "dry.moecompress-heal-work").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(teacher=None), "--teacher is required"),
    (dict(train="ces"), "no compressed experts"),
    (dict(train="lora,embeddings"), "--train"),
    (dict(mode="sideways"), "--mode"),
    (dict(guard_samples=-1), "--guard-samples"),
    (dict(guard_z=-1.0), "--guard-z"),
    (dict(schedule="linear"), "--schedule"),
])
def test_bad_requests_are_refused_before_any_work(root, tmp_path, kw, match):
    with pytest.raises(MoeCompressError, match=match):
        heal(root / "pruned", tmp_path / "x", _options(root, **kw))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.moecompress-heal-work").exists()


def test_a_teacher_of_another_vocabulary_or_architecture_is_refused(root, tmp_path):
    from moecompress.model.tiny import save_tiny_model

    save_tiny_model("qwen3_moe", tmp_path / "vocab", vocab_size=300)
    save_tiny_model("mixtral", tmp_path / "arch")
    with pytest.raises(MoeCompressError, match="vocab_size"):
        heal(root / "pruned", tmp_path / "x", _options(root, teacher=str(tmp_path / "vocab")))
    with pytest.raises(MoeCompressError, match="model_type"):
        heal(root / "pruned", tmp_path / "x", _options(root, teacher=str(tmp_path / "arch")))
    with pytest.raises(MoeCompressError, match="teacher itself"):
        heal(root / "pruned", root / "teacher", _options(root), overwrite=True)


def test_heal_then_quantize(root, healed, tmp_path):
    """Heal works before quantization: the healed checkpoint quantizes and loads like any dense one."""
    result = moecompress.quantize(root / "healed", tmp_path / "q", moecompress.QuantizeOptions(bits=4, method="rtn", group_size=32))
    assert result.out.is_dir()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_a_work_dir_without_our_marker_is_never_emptied(tmp_path):
    """--work-dir pointing at a user's folder (even one holding a key.json) is refused, its files intact;
    only a folder carrying the heal marker is reused, restarted or removed."""
    from moecompress.api.heal import WORK_MARKER, open_work_dir, remove_work_dir

    users = tmp_path / "mine"
    users.mkdir()
    (users / "key.json").write_text('{"key": "x"}')
    with pytest.raises(MoeCompressError, match="is not a heal work folder"):
        open_work_dir(users, "run-1")
    assert (users / "key.json").read_text() == '{"key": "x"}'
    remove_work_dir(users)
    assert users.exists()

    work = open_work_dir(tmp_path / "work", "run-1")
    (work / "state").write_text("step 5")
    assert open_work_dir(work, "run-1") == work and (work / "state").exists()  # resume
    assert open_work_dir(work, "run-2") == work and not (work / "state").exists()  # another run: restart
    assert (work / WORK_MARKER).exists()
    remove_work_dir(work)
    assert not work.exists()
