"""minillm's uniform exports run in llama.cpp (issue 17): llama.cpp's own converter (``convert_hf_to_gguf.py``
of the llama-cpp-python sdist that tools/bench_llamacpp.py builds) accepts width-, hidden- and depth-pruned
exports, and llama.cpp computes the same logits as transformers on the same ids.

Slow and optional: skipped unless ``llama_cpp`` imports and the vendored converter is unpacked (run
``tools/bench_llamacpp.py`` once, or point ``MINILLM_LLAMA_CPP_DIR`` at a llama.cpp checkout).
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, random_ids, tiny_config

from minillm.api import prune
from minillm.calibration.data import CalibrationSet

TOOL = Path(__file__).resolve().parents[1] / "tools/bench_llamacpp.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sentencepiece_model(folder: Path) -> None:
    """A small real tokenizer.model: the converter needs a vocabulary it knows (ids are fed directly)."""
    spm = pytest.importorskip("sentencepiece")
    text = [f"w{i} w{(7 * i) % 100} w{(3 * i) % 50}" for i in range(2000)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buffer, vocab_size=VOCAB - 28,
                                   model_type="bpe", minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("structures", ["attn,mlp", "attn,mlp,hidden", "layers"])
def test_uniform_export_converts_and_matches_in_llama_cpp(tmp_path: Path, structures: str) -> None:
    pytest.importorskip("llama_cpp")
    tool = _tool()
    llama_dir = Path(os.environ["MINILLM_LLAMA_CPP_DIR"]) if "MINILLM_LLAMA_CPP_DIR" in os.environ \
        else tool.unpacked_llama_cpp()
    if llama_dir is None or not (llama_dir / "convert_hf_to_gguf.py").exists():
        pytest.skip("llama.cpp's converter not unpacked: run tools/bench_llamacpp.py once")
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(0)  # test-only
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    result = prune(model, ratio=0.25, calib=CalibrationSet(random_ids(4, 16, seed=1), batch_size=2),
                   structures=structures, spsa_steps=2, out=tmp_path / "out")
    out = tmp_path / "out"
    _sentencepiece_model(out)
    gguf = tmp_path / "model-f32.gguf"
    error = tool.convert(str(out), gguf, "f32", llama_dir)
    assert error is None, error

    ids = random_ids(1, 24, seed=3)
    with torch.no_grad():
        expected = result.model(ids).logits[0].numpy()
    engine = tool.llama(gguf, 32, 1, logits_all=True)
    engine.eval(ids[0].tolist())
    got = np.asarray(engine.scores[: ids.shape[1]])
    assert got.shape == expected.shape
    # llama.cpp keeps its KV cache in float16 by default: ~1e-4 differences on logits of size ~0.1
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    cut = result.model.config  # the axis really was cut (4 layers, hidden 64, 4 heads before)
    assert {"attn,mlp": cut.num_attention_heads < 4, "attn,mlp,hidden": cut.hidden_size < 64,
            "layers": cut.num_hidden_layers < 4}[structures]
