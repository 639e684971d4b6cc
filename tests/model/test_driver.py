"""run_layerwise: equals a full forward, holds one layer at a time, propagates what passes change."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.model.driver import LayerContext, batches_of, capture_layer_inputs, run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import TINY_CONFIGS, save_tiny_model

FAMILIES = list(TINY_CONFIGS)
TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(family, sharded) -> checkpoint folder, each written once per module."""
    cache: dict = {}

    def get(family: str, sharded: bool = False):
        if (family, sharded) not in cache:
            folder = tmp_path_factory.mktemp(f"drv_{family}_{'sharded' if sharded else 'single'}")
            save_tiny_model(family, folder, seed=0, max_shard_size="50KB" if sharded else None)
            cache[family, sharded] = folder
        return cache[family, sharded]

    return get


def _ids(n: int = 5, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(0))


def _reference(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _devices(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


class _Recorder:
    """A LayerPass that checks, while layer i is processed, where every decoder layer's weights are."""

    def __init__(self, lm: LayerwiseModel, reference_inputs: list[torch.Tensor] | None = None):
        self.lm, self.reference_inputs = lm, reference_inputs
        self.seen: list[int] = []
        self.processed: list[int] = []

    def attach(self, ctx: LayerContext) -> list:
        for j, layer in enumerate(self.lm.layers):
            want = {"cpu"} if j == ctx.index else {"meta"}
            assert _devices(layer) == want, f"while processing layer {ctx.index}, layer {j} is on {_devices(layer)}"
        assert ctx.layer is self.lm.layers[ctx.index]
        assert (ctx.block is None) == (ctx.index not in self.lm.view.moe_layers)
        if self.reference_inputs is not None:
            got = torch.cat(ctx.inputs)
            assert (got - self.reference_inputs[ctx.index]).abs().max() < TOL
        self.seen.append(ctx.index)
        return []

    def process(self, ctx: LayerContext) -> bool:
        self.processed.append(ctx.index)
        return False


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_equals_a_full_forward(saved, family, sharded):
    folder = saved(family, sharded)
    assert (folder / "model.safetensors.index.json").exists() == sharded
    ids = _ids()
    ref_model = _reference(folder)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, output_hidden_states=True)
    lm = LayerwiseModel(folder)
    # hidden_states[i] is the input of decoder layer i (the last entry is after the final norm).
    recorder = _Recorder(lm, reference_inputs=list(ref.hidden_states[:-1]))
    result = run_layerwise(lm, ids, passes=[recorder], batch_size=2, compute_logits=True)
    assert recorder.seen == recorder.processed == [0, 1, 2]
    assert [h.shape[0] for h in result.hidden] == [2, 2, 1]
    logits = torch.cat(result.logits)
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max() < TOL
    # The driver's hidden states are taken before the final norm.
    final = torch.cat(result.hidden)
    assert (ref_model.model.norm(final) - ref.hidden_states[-1]).abs().max() < TOL
    assert (final - ref.hidden_states[-1]).abs().max() > 1e-2
    assert _devices(lm.model) == {"meta"}  # everything released at the end


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_processed_layer_is_materialised(saved, family):
    lm = LayerwiseModel(saved(family))
    recorder = _Recorder(lm)
    embed = lm.model.get_input_embeddings()

    class _OuterReleased:
        def attach(self, ctx):
            # Without compute_logits the embeddings and head are released before the first layer.
            assert _devices(embed) == {"meta"}
            assert _devices(lm.model.get_output_embeddings()) == {"meta"}
            return []

        def process(self, ctx):
            return False

    result = run_layerwise(lm, _ids(3), passes=[recorder, _OuterReleased()])
    assert recorder.seen == [0, 1, 2]
    assert result.logits is None
    assert _devices(lm.model) == {"meta"}


class _ZeroDownOfOneExpert:
    """A pass that changes layer `index` (expert 0's down projection := 0) and says so."""

    def __init__(self, index: int):
        self.index = index
        self.hooked_tokens = 0

    def attach(self, ctx):
        if ctx.index != self.index:
            return []

        def count(module, args):
            self.hooked_tokens += args[0].shape[0]

        return [ctx.block.experts.module.register_forward_pre_hook(count)]

    def process(self, ctx) -> bool:
        if ctx.index != self.index:
            return False
        ex = ctx.block.experts
        ex.set(0, "down", torch.zeros_like(ex.get(0, "down")))
        if ex.has_bias:
            ex.set_bias(0, "down", torch.zeros_like(ex.get_bias(0, "down")))
        return True


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_changes_made_by_a_pass_reach_the_next_layers(saved, family):
    folder = saved(family)
    ids = _ids(4)
    lm = LayerwiseModel(folder)
    layer = lm.view.moe_layers[0]
    zero = _ZeroDownOfOneExpert(layer)
    done, progress = [], []

    def on_done(ctx):
        # outputs handed on are those of the changed layer (re-run after process)
        assert ctx.outputs is not None and len(ctx.outputs) == 2
        done.append((ctx.index, [o.clone() for o in ctx.outputs]))

    result = run_layerwise(
        lm, ids, passes=[zero], batch_size=2, compute_logits=True, on_layer_done=on_done, progress=lambda i, n: progress.append((i, n))
    )
    assert [i for i, _ in done] == [0, 1, 2]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert zero.hooked_tokens == ids.numel()  # hooks saw every calibration token once (then removed)

    ref_model = _reference(folder)
    experts = ref_model.model.layers[layer].mlp.experts
    with torch.no_grad():
        unchanged = ref_model(input_ids=ids).logits
        experts.down_proj[0].zero_()
        if getattr(experts, "down_proj_bias", None) is not None:
            experts.down_proj_bias[0].zero_()
        changed = ref_model(input_ids=ids, output_hidden_states=True)
    logits = torch.cat(result.logits)
    assert (logits - changed.logits).abs().max() < TOL
    assert (logits - unchanged).abs().max() > 1e-3  # the change mattered
    # layer `layer`'s handed-on outputs are the changed model's inputs of the next layer
    assert (torch.cat(done[layer][1]) - changed.hidden_states[layer + 1]).abs().max() < TOL


def test_capture_layer_inputs_restores_the_layers(saved):
    lm = LayerwiseModel(saved("qwen3_moe"))
    originals = list(lm.layers)
    lm.load_outer()
    batches = batches_of(_ids(3), 2)
    hidden, kwargs = capture_layer_inputs(lm, batches)
    assert list(lm.layers) == originals
    assert [h.shape for h in hidden] == [(2, 12, 64), (1, 12, 64)]
    assert len(kwargs) == 3 and all(len(k) == 2 for k in kwargs)
    assert "position_embeddings" in kwargs[0][0]


def test_batches_of_splits_without_dropping_rows():
    ids = _ids(5)
    parts = batches_of(ids, 2)
    assert [p.shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat(parts), ids)


class _StopAtExperts:
    """A pass that only needs what reaches the experts module: it names it as its observation end."""

    def __init__(self):
        self.experts_inputs = 0
        self.after_experts = 0
        self.outputs_at_process: list | None = None

    def attach(self, ctx):
        if ctx.block is None:
            return []

        def before(_m, args):
            self.experts_inputs += args[0].shape[0]

        def after(_m, _args, _out):
            self.after_experts += 1

        return [ctx.block.experts.module.register_forward_pre_hook(before), ctx.block.experts.module.register_forward_hook(after)]

    def observation_end(self, ctx):
        return ctx.block.experts.module if ctx.block is not None else None

    def process(self, ctx) -> bool:
        self.outputs_at_process = ctx.outputs
        return False


def test_an_observation_stops_where_every_pass_has_seen_enough_and_the_outputs_stay_exact(saved):
    folder = saved("qwen3_moe")
    ids = _ids(4)
    with torch.no_grad():
        ref = _reference(folder)(input_ids=ids).logits
    stop = _StopAtExperts()
    result = run_layerwise(LayerwiseModel(folder), ids, passes=[stop], batch_size=2, compute_logits=True)
    assert stop.experts_inputs == ids.numel() * 3  # every layer's experts inputs were seen ...
    assert stop.after_experts == 0  # ... and the experts never ran during the observation
    assert stop.outputs_at_process == []  # the stopped observation made no outputs
    # the layer is re-run for the next layer's inputs even though nothing changed
    assert (torch.cat(result.logits) - ref).abs().max() < TOL


def test_a_pass_without_an_observation_end_gets_the_full_forward(saved):
    lm = LayerwiseModel(saved("qwen3_moe"))
    stop, full = _StopAtExperts(), _Recorder(lm)
    run_layerwise(lm, _ids(4), passes=[stop, full], batch_size=2)
    assert stop.after_experts == 3 * 2  # 3 layers x 2 batches: the experts ran
    assert stop.outputs_at_process is not None and len(stop.outputs_at_process) == 2


def test_a_stop_module_that_never_runs_is_an_error_not_a_silent_skip(saved):
    lm = LayerwiseModel(saved("qwen3_moe"))

    class _StopAtAModuleOutsideTheLayer(_StopAtExperts):
        def observation_end(self, ctx):
            return torch.nn.Linear(1, 1)

    with pytest.raises(RuntimeError, match="never ran"):
        run_layerwise(lm, _ids(2), passes=[_StopAtAModuleOutsideTheLayer()], batch_size=2)


class _ObservesChanges(_StopAtExperts):
    """A pass that must see the layer as the passes before it changed it (as the quantizer after a prune)."""

    observes_changes = True

    def __init__(self):
        super().__init__()
        self.expert0_down_at_attach: list[float] = []

    def attach(self, ctx):
        if ctx.block is not None:
            self.expert0_down_at_attach.append(float(ctx.block.experts.get(0, "down").abs().sum()))
        return super().attach(ctx)


def test_observation_stages_split_before_a_pass_that_observes_changes():
    from moecompress.model.driver import observation_stages

    a, b, c = _StopAtExperts(), _ObservesChanges(), _StopAtExperts()
    assert observation_stages([a, c]) == [[a, c]]
    assert observation_stages([b, a]) == [[b, a]]  # first in the list: nothing before it to wait for
    assert observation_stages([a, b, c]) == [[a], [b, c]]
    assert observation_stages([]) == [[]]


def test_a_pass_that_observes_changes_sees_the_changed_layer_in_the_same_sweep(saved):
    folder = saved("qwen3_moe")
    ids = _ids(4)
    lm = LayerwiseModel(folder)
    layer = lm.view.moe_layers[0]
    zero, later = _ZeroDownOfOneExpert(layer), _ObservesChanges()
    result = run_layerwise(lm, ids, passes=[zero, later], batch_size=2, compute_logits=True)
    assert later.expert0_down_at_attach[layer] == 0.0  # attached after the change ...
    assert later.experts_inputs == ids.numel() * 3  # ... and observed every layer once
    assert zero.hooked_tokens == ids.numel()  # the first stage observed the unchanged layer once
    ref_model = _reference(folder)
    with torch.no_grad():
        ref_model.model.layers[layer].mlp.experts.down_proj[0].zero_()
        changed = ref_model(input_ids=ids).logits
    assert (torch.cat(result.logits) - changed).abs().max() < TOL


def test_a_pass_that_needs_no_observation_names_the_layer_and_no_forward_runs(saved):
    lm = LayerwiseModel(saved("qwen3_moe"))

    class _NeedsNothing(_StopAtExperts):
        def observation_end(self, ctx):
            return ctx.layer

    nothing = _NeedsNothing()
    result = run_layerwise(lm, _ids(4), passes=[nothing], batch_size=2, compute_logits=True)
    assert nothing.experts_inputs == 0 and nothing.outputs_at_process == []
    with torch.no_grad():
        ref = _reference(saved("qwen3_moe"))(input_ids=_ids(4)).logits
    assert (torch.cat(result.logits) - ref).abs().max() < TOL  # the re-run made the outputs


def test_the_final_run_releases_each_input_once_its_output_exists(saved):
    lm = LayerwiseModel(saved("qwen3_moe"))
    lm.load_outer()
    hidden, kwargs = capture_layer_inputs(lm, batches_of(_ids(4), 2))
    ctx = LayerContext(0, lm.load_layer(0), lm.view.blocks.get(0), hidden, kwargs[0], model=lm)
    kept = ctx.run()
    assert all(h is not None for h in ctx.inputs)
    released = ctx.run(release_inputs=True)
    assert ctx.inputs == [None, None]
    assert all(torch.equal(a, b) for a, b in zip(kept, released))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_activations_can_be_kept_in_bfloat16_between_float32_layers(saved, family):
    """storage_dtype=bfloat16 halves the calibration activations; each layer still computes in float32,
    so the result is the float32 run up to one bfloat16 rounding of the hidden states per layer."""
    folder = saved(family)
    ids = _ids(4)
    with torch.no_grad():
        ref = _reference(folder)(input_ids=ids).logits
    seen: list[torch.dtype] = []

    class _Dtypes:
        def attach(self, ctx):
            seen.extend(h.dtype for h in ctx.inputs)
            return [ctx.layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))]

        def process(self, ctx):
            return False

    result = run_layerwise(LayerwiseModel(folder), ids, passes=[_Dtypes()], batch_size=2, compute_logits=True,
                           storage_dtype=torch.bfloat16)
    assert all(h.dtype == torch.bfloat16 for h in result.hidden)
    assert set(seen) == {torch.bfloat16, torch.float32}  # stored in bfloat16, computed in float32
    err = (torch.cat(result.logits) - ref).abs().max()
    assert 0 < err < 0.05 * ref.abs().max()


class _Doubler(torch.nn.Module):
    """A stand-in decoder layer that counts the batches it ran."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, hidden_states, **_kwargs):
        self.calls += 1
        return (hidden_states * 2 + 1,)


def _rerun_worker(rank: int, world: int, port: int, queue) -> None:
    import os

    from moecompress.model.driver import rerun_shared
    from moecompress.parallel import Ranks

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        inputs = [torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(b)) for b in range(5)]
        layer = _Doubler()
        ctx = LayerContext(0, layer, None, list(inputs), [{}] * 5)
        outputs = rerun_shared(ctx, Ranks(rank, world))
        ok = all(torch.equal(o, h * 2 + 1) for o, h in zip(outputs, inputs)) and ctx.inputs == [None] * 5
        queue.put((rank, layer.calls, bool(ok)))
    finally:
        torch.distributed.destroy_process_group()


def test_the_rerun_is_split_across_ranks_and_every_rank_gets_every_output():
    from dist_util import spawn_and_collect

    assert spawn_and_collect(_rerun_worker, 2) == [(0, 3, True), (1, 2, True)]  # batches 0,2,4 / 1,3
