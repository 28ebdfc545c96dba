"""Load a causal LM and its tokenizer from a hub id, a local folder or a GGUF file.

Loading goes through ``AutoModelForCausalLM.from_pretrained`` with an accelerate ``device_map`` (``auto``
by default) and optional ``max_memory``, so the same call works on a laptop CPU and on GPUs. GGUF files
are dequantised by transformers (needs the ``gguf`` package) into a plain model of the requested dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from minillm.errors import UsageError

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> Any:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def read_json_mapping(path: Path, remedy: str) -> dict[str, Any]:
    """A JSON file that must hold a mapping (config.json, minillm.json); anything else is one line ending
    with ``remedy``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{str(path)!r} is not valid JSON ({exc}); {remedy}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} is not a JSON mapping; {remedy}")
    return data


def _split_gguf(source: str) -> tuple[str, str | None]:
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UsageError(f"GGUF file {source!r} does not exist")
        return str(path.parent), path.name
    return source, None


def _check_local(folder: str, gguf_file: str | None, source: str) -> None:
    """A path-like source that does not exist is a user error, not a hub lookup."""
    looks_local = folder.startswith((".", "/", "~"))
    if gguf_file is None and looks_local and not Path(folder).expanduser().exists():
        raise UsageError(
            f"model folder {source!r} does not exist; pass an existing folder, a .gguf file or a hub id"
        )
    path = Path(folder).expanduser()
    if gguf_file is None and path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(
            f"{source!r} has no config.json, so it is not a model folder; pass a Hugging Face model folder, "
            "a .gguf file or a hub id"
        )


REMOTE_CODE_HINT = "pass --trust-remote-code to run it (only for folders from someone you trust)"


def check_remote_code(source: str, trust_remote_code: bool = False) -> None:
    """Refuse a local folder that brings its own model code unless the user asked for it.

    Mirrors transformers' ``trust_remote_code``: nothing in the folder (not even a ``minillm.json``
    saying "minillm made me") can grant trust, since whoever hands out the folder controls every file.
    """
    folder, gguf_file = _split_gguf(source)
    config = Path(folder).expanduser() / "config.json"
    if trust_remote_code or gguf_file is not None or not config.is_file():
        return
    data = read_json_mapping(config, "the folder is not a usable model")
    if data.get("auto_map") or data.get("minillm_layer_shapes"):
        code = sorted(p.name for p in Path(folder).expanduser().glob("*.py")) or ["auto_map"]
        raise UsageError(
            f"{source!r} ships its own model code ({', '.join(code)}; minillm's per-layer exports do); "
            f"{REMOTE_CODE_HINT}"
        )


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder, gguf_file = _split_gguf(source)
    _check_local(folder, gguf_file, source)
    check_remote_code(source, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UsageError(
            f"cannot load a tokenizer from {source!r}: {_first_line(exc)} "
            "(pass a local model folder, a .gguf file, or a hub id while online)"
        ) from exc


def _plain_copy_of_gguf_model(model: Any) -> Any:
    """A plain (non-quantised) model holding the dequantised GGUF weights.

    transformers marks a GGUF-loaded model as quantised, and such a model refuses ``save_pretrained``;
    the weights are ordinary tensors after dequantisation, so rebuild the stock class around them.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    device = model.get_input_embeddings().weight.device
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    return plain.to(device)


def load_model(source: str, device_map: str | dict | None = "auto", max_memory: str | dict | None = None,
               dtype: str = "auto", trust_remote_code: bool = False, offload_dir: str | None = None,
               seq_len: int | None = None) -> Any:
    """The model in eval mode; per-layer-width minillm exports need ``trust_remote_code=True``.

    ``seq_len`` (the windows the caller will run) is checked against the model's positions before
    any weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from minillm.option_checks import check_seq_len, parse_max_memory

    folder, gguf_file = _split_gguf(source)
    _check_local(folder, gguf_file, source)
    check_remote_code(source, trust_remote_code)
    memory = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if gguf_file is not None and torch_dtype == "auto":
        torch_dtype = torch.float32  # dequantised weights: store them in full precision unless told
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UsageError(f"cannot load a model config from {source!r}: {_first_line(exc)}") from exc
    check_seq_len(seq_len, getattr(config, "max_position_embeddings", None))
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=gguf_file,
        dtype=torch_dtype,
        device_map=device_map,
        max_memory=memory,
        offload_folder=offload_dir,
        trust_remote_code=trust_remote_code,
    )
    if gguf_file is not None:
        model = _plain_copy_of_gguf_model(model)
    model.eval()
    return model

