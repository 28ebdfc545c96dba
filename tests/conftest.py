"""Tiny models of every supported family, built from configs in-test (no network, no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch

VOCAB = 128


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, intermediate_size=96)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, intermediate_size=96, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2, intermediate_size=96)
    if family == "qwen3":
        return tf.Qwen3Config(**common, num_key_value_heads=2, intermediate_size=96, head_dim=16)
    if family == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            ffn_dim=96, max_position_embeddings=256, word_embed_proj_dim=64)
    if family == "llama-mha-tied":
        return tf.LlamaConfig(**common, num_key_value_heads=4, intermediate_size=96, tie_word_embeddings=True)
    if family in MATRIX:
        row = MATRIX[family]
        return tf.AutoConfig.for_model(row.model_type, **{**common, **GQA, **row.overrides})
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt"]

GQA = dict(num_key_value_heads=2, intermediate_size=96, head_dim=16, pad_token_id=0, bos_token_id=1,
           eos_token_id=2)
SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])


class Family(NamedTuple):
    """A row of the family matrix: ``model_type``, config overrides on top of ``common`` + ``GQA`` (4 query
    heads over 2 kv heads, head_dim 16, 96 MLP channels), and whether a uniform cut of it reloads with
    vanilla ``from_pretrained`` (else the config cannot express it and the export carries remote code)."""

    model_type: str
    overrides: dict
    vanilla: bool = True


#: The family matrix; tests/test_family_matrix.py runs every row. Adding a family is one row. The five
#: families served first keep their own configs above (their rows only name them).
MATRIX: dict[str, Family] = {
    "llama": Family("llama", {}),
    "mistral": Family("mistral", {}),
    "qwen2": Family("qwen2", {}),
    "qwen3": Family("qwen3", {}),
    "opt": Family("opt", {}, vanilla=False),  # no head_dim: fewer heads need the per-layer path
    "gemma": Family("gemma", {}),
    "gemma2": Family("gemma2", SLIDING),
    "gemma3": Family("gemma3_text", SLIDING),
    # like Gemma-3-270M: one kv head, so only query heads can go; 3 of 4 would break hidden_size % heads,
    # so a uniform plan keeps an expressible head count (the budget moves to MLP channels): stock config
    "gemma3-1kv": Family("gemma3_text", dict(SLIDING, num_key_value_heads=1)),
    "phi3": Family("phi3", {}),
    "phi": Family("phi", dict(qk_layernorm=True), vanilla=False),  # qk norms sized hidden // heads
    "granite": Family("granite", dict(embedding_multiplier=2.0, attention_multiplier=0.5,
                                      residual_multiplier=0.5, logits_scaling=2.0)),
    "olmo2": Family("olmo2", {}),
    "olmo3": Family("olmo3", SLIDING),
    "smollm3": Family("smollm3", dict(no_rope_layers=[1, 0])),
    "cohere": Family("cohere", dict(use_qk_norm=True)),
    "cohere2": Family("cohere2", SLIDING),
    "stablelm": Family("stablelm", dict(use_qkv_bias=True), vanilla=False),  # head_dim = hidden // heads
    "starcoder2": Family("starcoder2", dict(use_bias=True, sliding_window=None)),
    # head_dim derives from hidden // heads: a uniform plan keeps every head (stock config), global ones don't
    "gpt_neox": Family("gpt_neox", dict(num_key_value_heads=None, head_dim=None)),
    "ministral": Family("ministral", SLIDING),
    "exaone4": Family("exaone4", dict(SLIDING, sliding_window_pattern=2)),
    "glm4": Family("glm4", {}),
    "internlm3": Family("internlm3", {}),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # test-only: library code takes explicit generators
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # random biases, so bias handling is exercised (they init to zero)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model.eval()


def random_ids(n: int = 4, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=generator)


def tiny_tokenizer():
    """A real fast tokenizer (word-level over a small vocabulary), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def write_text(path: Path, words: int = 3000, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (words,), generator=generator).tolist()
    lines = [" ".join(f"w{i - 3}" for i in ids[k : k + 20]) for k in range(0, words, 20)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    return write_text(tmp_path / "calib.txt")
