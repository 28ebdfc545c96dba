"""The sequential executor: a walk reproduces the dense forward, modify-then-advance feeds the modified
block's outputs on, mixed attention kinds get their own inputs, SPSA and the block-local backward equal
their whole-model counterparts; nothing is left behind (hooks, ``.grad``)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import offloaded

from minillm.arch import adapter_for
from minillm.calibration.blocks import BlockBatch
from minillm.calibration.data import CalibrationSet
from minillm.calibration.forward import mean_loss
from minillm.calibration.hooks import count_hooks
from minillm.calibration.sequential import Block, Sequential
from minillm.calibration.spsa import SpsaConfig, estimate_gradient


def calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(6, 16, seed=1), batch_size=4)


def layer_inputs(model: torch.nn.Module, index: int, calib: CalibrationSet) -> list[torch.Tensor]:
    """What decoder layer ``index`` receives in a plain forward pass (the oracle)."""
    seen: list[torch.Tensor] = []
    layer = adapter_for(model.config).decoder_layers(model)[index]
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            for ids in calib.batches():
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen


def no_grads(model: torch.nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_a_walk_without_changes_reproduces_the_dense_forward(family: str) -> None:
    model = tiny_model(family)
    calib = calibration()
    run = Sequential(model, adapter_for(model.config), calib)
    walk = run.run(lambda block: block.index, to_end=True)
    assert walk.results == {0: 0, 1: 1}
    assert walk.outputs is not None
    assert run.loss(walk.outputs) == pytest.approx(mean_loss(model, calib), rel=1e-6)
    assert count_hooks(model) == 0 and no_grads(model)


def test_the_walk_stops_after_the_last_chosen_block() -> None:
    model = tiny_model("llama")
    calib = calibration()
    seen: list[int] = []
    walk = Sequential(model, adapter_for(model.config), calib).run(lambda b: seen.append(b.index), layers=[0])
    assert seen == [0] and walk.outputs is None


@pytest.mark.parametrize("where", ["resident", "offloaded"])
def test_modify_then_advance_feeds_the_modified_block_to_the_next(tmp_path: Path, where: str) -> None:
    dense = tiny_model("llama")
    model = offloaded(dense, tmp_path / "ckpt") if where == "offloaded" else copy.deepcopy(dense)
    calib = calibration()
    adapter = adapter_for(model.config)
    hooks = count_hooks(model)

    def per_block(block: Block) -> list[torch.Tensor]:
        before = block.forward()  # a block may run its batches any number of times
        with torch.no_grad():
            adapter.attention(block.layer).o.weight.zero_()
        seen = before if block.index == 0 else block.inputs
        return [b.hidden.clone() for b in seen]

    walk = Sequential(model, adapter, calib).run(per_block)
    oracle = copy.deepcopy(dense)
    with torch.no_grad():
        adapter.attention(adapter.decoder_layers(oracle)[0]).o.weight.zero_()
    expected = layer_inputs(oracle, 1, calib)
    for got, want in zip(walk.results[1], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    unmodified = layer_inputs(dense, 1, calib)
    for got, want in zip(walk.results[0], unmodified, strict=True):  # block 0 ran before the change
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert count_hooks(model) == hooks
    assert no_grads(model)


@pytest.mark.parametrize("where", ["resident", "offloaded"])
def test_unloaded_drops_all_but_the_kept_weights_and_loads_them_again(tmp_path: Path, where: str) -> None:
    """Inside ``Block.unloaded(keep)`` an offloaded block holds only ``keep``'s weights (the others are
    back on ``meta``); a change to a kept weight survives, the others come back as they were, and the
    block computes what it did before (plus the change). In memory nothing moves."""
    dense = tiny_model("llama")
    model = offloaded(dense, tmp_path / "ckpt") if where == "offloaded" else copy.deepcopy(dense)
    adapter = adapter_for(model.config)
    hooks = count_hooks(model)

    def per_block(block: Block) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        o, q = adapter.attention(block.layer).o, adapter.attention(block.layer).q
        before = [b.hidden for b in block.forward()]
        with block.unloaded(keep=[o]):
            assert o.weight.device.type == "cpu"
            assert q.weight.device.type == ("meta" if where == "offloaded" else "cpu")
            with torch.no_grad():
                o.weight.mul_(0.5)
        assert q.weight.device.type == "cpu"
        return before, [b.hidden for b in block.forward()]

    walk = Sequential(model, adapter, calibration()).run(per_block, layers=[0])
    oracle = copy.deepcopy(dense)
    layer = adapter.decoder_layers(oracle)[0]
    with torch.no_grad():
        adapter.attention(layer).o.weight.mul_(0.5)
    before, after = walk.results[0]
    for got, want in zip(before, layer_inputs(dense, 1, calibration()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(after, layer_inputs(oracle, 1, calibration()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert count_hooks(model) == hooks


def test_forward_hooks_inside_a_block_see_its_calibration_inputs() -> None:
    """XᵀX of o_proj's inputs, accumulated through a context-managed hook inside the per-block function,
    equals the one a dense forward sees."""
    model = tiny_model("llama")
    calib = calibration()
    adapter = adapter_for(model.config)

    @contextmanager
    def gram(module: torch.nn.Module, into: list[torch.Tensor]) -> Iterator[None]:
        def hook(m: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            into[0] += x.T @ x

        handle = module.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def per_block(block: Block) -> torch.Tensor:
        o = adapter.attention(block.layer).o
        total = [torch.zeros(o.in_features, o.in_features, dtype=torch.float64)]
        with gram(o, total):
            block.forward(advance=True)
        return total[0]

    walk = Sequential(model, adapter, calib).run(per_block)
    for index in (0, 1):
        o = adapter.attention(adapter.decoder_layers(model)[index]).o
        expected = [torch.zeros(o.in_features, o.in_features, dtype=torch.float64)]
        with gram(o, expected), torch.no_grad():
            for ids in calib.batches():
                model(input_ids=ids, use_cache=False)
        torch.testing.assert_close(walk.results[index], expected[0], rtol=1e-9, atol=1e-9)
    assert count_hooks(model) == 0


def test_mixed_attention_kinds_get_their_own_masks() -> None:
    """Qwen3 with a sliding window on layer 1 only: the window mask differs from the full one, so a walk
    that reused layer 0's mask for layer 1 would give another loss."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=96, head_dim=16,
                            max_position_embeddings=256, use_sliding_window=True, sliding_window=4,
                            max_window_layers=1)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert config.layer_types == ["full_attention", "sliding_attention"]
    calib = calibration()
    run = Sequential(model, adapter_for(model.config), calib)
    batches = run.inputs()
    assert set(batches[0].per_kind) == {"full_attention", "sliding_attention"}
    walk = run.run(to_end=True)
    assert walk.outputs is not None
    assert run.loss(walk.outputs) == pytest.approx(mean_loss(model, calib), rel=1e-6)


def test_activations_kept_on_another_device_give_the_same_walk() -> None:
    model = tiny_model("qwen3")
    calib = calibration()
    adapter = adapter_for(model.config)
    here = Sequential(model, adapter, calib).run(to_end=True).outputs
    there = Sequential(model, adapter, calib, activations_device="cpu").run(to_end=True).outputs
    assert here is not None and there is not None
    for a, b in zip(here, there, strict=True):
        torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)


def test_full_loss_spsa_equals_the_whole_model_estimate() -> None:
    model = tiny_model("llama")
    calib = calibration()
    adapter = adapter_for(model.config)
    config = SpsaConfig(steps=3, eps=1e-3, seed=0)
    layers = adapter.decoder_layers(model)
    starts = [0, len(adapter.prunable_linears(layers[0]))]

    def params_of(index: int, layer: torch.nn.Module) -> list[tuple[int, torch.Tensor]]:
        return [(starts[index] + k, lin.weight) for k, lin in enumerate(adapter.prunable_linears(layer))]

    dense = copy.deepcopy(model)  # each estimate leaves the weights a few ulps off
    streamed = Sequential(model, adapter, calib).spsa(params_of, config)
    layers = adapter.decoder_layers(dense)
    weights = [lin.weight for layer in layers for lin in adapter.prunable_linears(layer)]
    whole = estimate_gradient(weights, lambda: mean_loss(dense, calib), config)
    assert streamed.coefficients == pytest.approx(whole.coefficients, rel=1e-6, abs=1e-9)
    assert count_hooks(model) == 0 and no_grads(model)


class _QProbe:
    """Differentiates q_proj's weight of every block; keeps the summed gradient."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.grads: dict[int, torch.Tensor] = {}

    @contextmanager
    def attach(self, index: int, layer: torch.nn.Module, batch: BlockBatch) -> Iterator[list[torch.Tensor]]:
        weight = self.adapter.attention(layer).q.weight
        weight.requires_grad_(True)
        try:
            yield [weight]
        finally:
            weight.requires_grad_(False)

    def receive(self, index: int, batch: BlockBatch, gradients: Sequence[torch.Tensor]) -> None:
        self.grads[index] = self.grads.get(index, 0) + gradients[0]

    def finish(self, index: int, layer: torch.nn.Module) -> None:
        pass


def test_block_local_backward_equals_back_propagation() -> None:
    model = tiny_model("llama")
    calib = calibration()
    adapter = adapter_for(model.config)
    probe = _QProbe(adapter)
    Sequential(model, adapter, calib).backward(probe)
    assert no_grads(model) and count_hooks(model) == 0
    reference = copy.deepcopy(model)
    for ids in calib.batches():
        out = reference(input_ids=ids, labels=ids, use_cache=False)
        (out.loss * (ids.numel() - ids.shape[0])).backward()
    for index, layer in enumerate(adapter.decoder_layers(reference)):
        torch.testing.assert_close(probe.grads[index], adapter.attention(layer).q.weight.grad,
                                   rtol=1e-4, atol=1e-6)
