"""``compare``: prune one model with several criteria and put the results side by side.

Why it is shaped like this: a criterion's scores do not depend on the ratio, the allocation or the
compensation, so each method is scored **once** and every (ratio, allocation, compensation) cut is made
from those scores. Scoring runs in
a fresh subprocess per method (``isolate=True``, the default for a model given by path) so that on CPU
each method's peak resident memory is its own; the peak is reset after the model is loaded
(``/proc/self/clear_refs``) and read back as ``VmHWM``, so it is the peak *during scoring*, model
included. On CUDA it is ``torch.cuda.max_memory_allocated`` over scoring. A ``forward`` reference
(one plain forward pass over the same calibration set, measured the same way) gives the
"× forward" column. Every method reads the same calibration windows, tokenised once by the parent.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.compensation import COMPENSATIONS
from minillm.defaults import DEFAULT_COMPENSATION, DEFAULT_DAMPING, DEFAULT_HEAD_MODE
from minillm.errors import UsageError
from minillm.plan import ALLOCATIONS

FORWARD = "forward"  # the reference "method": one plain forward pass over the calibration set


@dataclass
class MethodScores:
    """A method's group scores and what getting them cost."""

    method: str
    scores: dict[int, Any]
    compensation: dict[str, torch.Tensor]
    forward_passes: int
    backward_passes: int
    seconds: float
    peak_bytes: int | None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareRow:
    method: str
    ratio: float
    allocation: str
    achieved_ratio: float
    params: int
    perplexity: float | None
    peak_bytes: int | None
    peak_vs_forward: float | None
    scoring_seconds: float
    forward_passes: int
    backward_passes: int
    accuracy: dict[str, float] = field(default_factory=dict)
    compensation: str | None = None  # None: a compare.json written before compensation was an axis


@dataclass
class CompareResult:
    rows: list[CompareRow]
    dense_params: int
    dense_perplexity: float | None
    forward_peak_bytes: int | None
    forward_seconds: float | None
    protocol: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareResult:
        """Read back a ``compare.json`` (to re-plot or re-check a finished run without re-running it)."""
        return cls(
            rows=[CompareRow(**row) for row in data["rows"]],
            dense_params=data["dense_params"],
            dense_perplexity=data.get("dense_perplexity"),
            forward_peak_bytes=data.get("forward_peak_bytes"),
            forward_seconds=data.get("forward_seconds"),
            protocol=data.get("protocol", {}),
        )


def score_method(
    model: nn.Module,
    method: str,
    calibration: Any,
    layers: list[int],
    seed: int,
    spsa: Any,
    options: dict[str, Any],
) -> MethodScores:
    """Score with one criterion (or run the plain-forward reference), measuring peak memory and time."""
    from minillm.api import score_model
    from minillm.calibration.forward import mean_loss
    from minillm.memory import measure
    from minillm.scoring import ScoreResult

    with measure(reset=True) as used:
        if method == FORWARD:
            mean_loss(model, calibration)
            result = ScoreResult(scores={}, forward_passes=1)
        else:
            result = score_model(model, method, calibration, layers, seed, spsa, options)
    seconds = used.seconds
    peak = used.cuda_peak_bytes if used.cuda_peak_bytes is not None else used.peak_rss_bytes
    return MethodScores(
        method,
        result.scores,
        result.compensation,
        result.forward_passes,
        result.backward_passes,
        seconds,
        peak,
        {k: v for k, v in result.notes.items() if isinstance(v, (int, float, str))},
    )


# ------------------------------------------------------------------------------------ subprocess
def _save_scores(scores: MethodScores, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for layer, s in scores.scores.items():
        tensors[f"{layer}.heads"], tensors[f"{layer}.kv_heads"] = (
            s.heads.contiguous(),
            s.kv_heads.contiguous(),
        )
        tensors[f"{layer}.channels"] = s.channels.contiguous()
    for key, value in scores.compensation.items():
        tensors[f"comp.{key}"] = value.contiguous()
    save_file(tensors, str(path.with_suffix(".safetensors")))
    meta = {k: v for k, v in asdict(scores).items() if k not in ("scores", "compensation")}
    path.with_suffix(".json").write_text(json.dumps(meta))


def _load_scores(path: Path) -> MethodScores:
    from safetensors.torch import load_file

    from minillm.plan import LayerScores

    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    layers = sorted({int(k.split(".")[0]) for k in tensors if not k.startswith("comp.")})
    scores = {
        i: LayerScores(tensors[f"{i}.heads"], tensors[f"{i}.kv_heads"], tensors[f"{i}.channels"])
        for i in layers
    }
    compensation = {k[5:]: v for k, v in tensors.items() if k.startswith("comp.")}
    return MethodScores(scores=scores, compensation=compensation, **meta)


def _worker(spec_path: str) -> None:
    """Entry of the per-method subprocess: load, score, write scores + measurements next to the spec."""
    from safetensors.torch import load_file

    from minillm.calibration.data import CalibrationSet
    from minillm.calibration.spsa import SpsaConfig
    from minillm.loading import load_model

    spec = json.loads(Path(spec_path).read_text())
    model = load_model(spec["model"], device_map=spec["device_map"], dtype=spec["dtype"],
                       trust_remote_code=spec.get("trust_remote_code", False))
    calibration = CalibrationSet(load_file(spec["calibration"])["input_ids"], spec["batch_size"])
    spsa = SpsaConfig(**spec["spsa"])
    scores = score_method(
        model, spec["method"], calibration, spec["layers"], spec["seed"], spsa, spec["options"]
    )
    _save_scores(scores, Path(spec["out"]))


def _score_isolated(spec: dict[str, Any], workdir: Path) -> MethodScores:
    out = workdir / f"scores-{spec['method']}"
    spec_path = workdir / f"spec-{spec['method']}.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    run = subprocess.run(
        [sys.executable, "-m", "minillm.compare", "--worker", str(spec_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"scoring with {spec['method']!r} failed in its subprocess:\n{tail}")
    return _load_scores(out)


# -------------------------------------------------------------------------------------- the API
def compare(
    model: str | nn.Module,
    *,
    methods: list[str],
    ratios: list[float] = (0.2,),  # type: ignore[assignment]
    allocations: list[str] = ("uniform", "global"),  # type: ignore[assignment]
    calib: str = "wikitext2",
    calib_samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 8,
    eval_ppl: str | None = None,
    eval_windows: int | None = None,
    tasks: str | list[str] | None = None,
    tasks_dir: str | None = None,
    data_dir: str | None = None,
    limit: int | float | None = None,
    head_mode: str = DEFAULT_HEAD_MODE,
    structures: str = "both",
    skip_first: int = 0,
    skip_last: int = 0,
    seed: int = 0,
    spsa_steps: int = 16,
    spsa_eps: float = 1e-3,
    criterion_options: dict[str, Any] | None = None,
    compensation: str | list[str] = DEFAULT_COMPENSATION,
    damping: float = DEFAULT_DAMPING,
    tokenizer: Any = None,
    device_map: str | None = "auto",
    dtype: str = "auto",
    isolate: bool | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    trust_remote_code: bool = False,
) -> CompareResult:
    """Score ``model`` with every method once, then plan, prune and evaluate every (ratio, allocation,
    compensation); ``compensation`` is one mode or several (a list, or a comma-separated string)."""
    from minillm.api import count_parameters, plan_from_scores
    from minillm.arch import adapter_for
    from minillm.calibration.data import calibration_set, evaluation_windows
    from minillm.calibration.spsa import SpsaConfig
    from minillm.groups import prunable_layers
    from minillm.scoring import CRITERIA

    methods = [m.strip() for m in methods if m.strip()]
    if not methods:
        raise UsageError("--methods is empty; e.g. --methods fms,taylor-gate,wanda-sp")
    for method in methods:
        CRITERIA.get(method)  # did-you-mean error before any work
    for ratio in ratios:
        if not 0.0 < ratio < 1.0:
            raise UsageError(f"every --ratio must be strictly between 0 and 1 (got {ratio})")
    for allocation in allocations:
        if allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation takes a comma list of {', '.join(ALLOCATIONS)} "
                             f"(got {allocation!r})")
    compensations = [c.strip() for c in (compensation.split(",") if isinstance(compensation, str)
                                         else compensation) if c.strip()]
    for mode in compensations or [""]:
        if mode not in COMPENSATIONS:
            raise UsageError(f"--compensation takes a comma list of {', '.join(COMPENSATIONS)} "
                             f"(got {mode!r})")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UsageError(f"--out {str(out_dir)!r} is a file; give a folder path")
    if out_dir is not None:
        from minillm.option_checks import check_loading
        from minillm.output_guard import check_no_overlap

        check_no_overlap(out_dir, (model if isinstance(model, str) else None, calib, eval_ppl, tasks_dir,
                                   data_dir))
        check_loading(device_map, seed=seed)
    path = model if isinstance(model, str) else None
    isolate = path is not None if isolate is None else isolate
    if isolate and path is None:
        raise UsageError("isolated scoring (a fresh process per method) needs the model as a path or hub id")
    if isinstance(model, str):
        from minillm.loading import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model, trust_remote_code)
        model = load_model(model, device_map=device_map, dtype=dtype, trust_remote_code=trust_remote_code,
                           seq_len=seq_len)
    if tokenizer is None:
        raise UsageError("a tokenizer is needed to read calibration text; pass tokenizer=…")
    adapter = adapter_for(model.config)
    layers = prunable_layers(len(adapter.decoder_layers(model)), skip_first, skip_last)
    calibration = calibration_set(tokenizer, calib, calib_samples, seq_len, seed, batch_size)
    windows = evaluation_windows(tokenizer, eval_ppl, seq_len) if eval_ppl else None
    if windows is not None and eval_windows:
        windows = windows[:eval_windows]
    spsa = SpsaConfig(steps=spsa_steps, eps=spsa_eps, seed=seed)
    options = dict(criterion_options or {})

    def report(task: str, done: int, total: int) -> None:
        if progress is not None:
            progress(task, done, total)

    all_scores: dict[str, MethodScores] = {}
    with tempfile.TemporaryDirectory(prefix="minillm-compare-") as tmp:
        workdir = Path(tmp)
        if isolate:
            from safetensors.torch import save_file

            save_file(
                {"input_ids": calibration.input_ids.contiguous()}, str(workdir / "calibration.safetensors")
            )
            base = {
                "model": path,
                "device_map": device_map,
                "trust_remote_code": trust_remote_code,
                "dtype": dtype,
                "batch_size": batch_size,
                "calibration": str(workdir / "calibration.safetensors"),
                "layers": layers,
                "seed": seed,
                "spsa": {"steps": spsa_steps, "eps": spsa_eps, "seed": seed},
                "options": options,
            }
        for done, method in enumerate([FORWARD, *methods]):
            report("scoring", done, len(methods) + 1)
            if isolate:
                all_scores[method] = _score_isolated({**base, "method": method}, workdir)
            else:
                all_scores[method] = score_method(model, method, calibration, layers, seed, spsa, options)
        report("scoring", len(methods) + 1, len(methods) + 1)
    dense_params = count_parameters(model)
    dense_ppl = _evaluate(model, tokenizer, windows, None, batch_size, {})[0] if windows is not None else None
    reference = all_scores[FORWARD]
    rows = []
    jobs = [(m, r, a, c) for m in methods for r in ratios for a in allocations for c in compensations]
    for done, (method, ratio, allocation, mode) in enumerate(jobs):
        scores = all_scores[method]
        pruned = copy.deepcopy(model)
        _prune_copy(pruned, adapter, scores, ratio, allocation, head_mode, structures, plan_from_scores,
                    calibration, method, mode, damping)
        ppl, accuracy = _evaluate(
            pruned,
            tokenizer,
            windows,
            tasks,
            batch_size,
            {"tasks_dir": tasks_dir, "data_dir": data_dir, "limit": limit, "seed": seed},
        )
        params = count_parameters(pruned)
        del pruned
        ratio_vs = (
            scores.peak_bytes / reference.peak_bytes if scores.peak_bytes and reference.peak_bytes else None
        )
        rows.append(
            CompareRow(
                method,
                ratio,
                allocation,
                1 - params / dense_params,
                params,
                ppl,
                scores.peak_bytes,
                ratio_vs,
                scores.seconds,
                scores.forward_passes,
                scores.backward_passes,
                accuracy,
                mode,
            )
        )
        report("prune + evaluate", done + 1, len(jobs))
    protocol = {
        "calib": calib,
        "calib_samples": calib_samples,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "eval_ppl": eval_ppl,
        "eval_windows": None if windows is None else int(windows.shape[0]),
        "spsa_steps": spsa_steps,
        "spsa_eps": spsa_eps,
        "seed": seed,
        "head_mode": head_mode,
        "structures": structures,
        "compensation": ",".join(compensations),
        "damping": damping,
        "layers": f"{layers[0]}-{layers[-1]}",
        "isolated": isolate,
        "memory": "CUDA max allocated" if torch.cuda.is_available() else "peak RSS (VmHWM) during scoring",
    }
    result = CompareResult(rows, dense_params, dense_ppl, reference.peak_bytes, reference.seconds, protocol)
    if out_dir is not None:
        from minillm.compare.report import write_outputs

        result.files = write_outputs(result, Path(out_dir))
    return result


def _prune_copy(
    model: nn.Module,
    adapter: Any,
    scores: MethodScores,
    ratio: float,
    allocation: str,
    head_mode: str,
    structures: str,
    plan_from_scores: Callable,
    calibration: Any,
    method: str,
    compensation: str,
    damping: float,
) -> None:
    """Plan, compensate and cut ``model`` (a copy) exactly as ``prune`` does with the same settings."""
    from minillm.compensation.bias import express_biases, expressible_biases
    from minillm.compensation.layer import CompensationOptions
    from minillm.compensation.sequential import compensate_sequential
    from minillm.scoring import ScoreResult
    from minillm.surgery import apply_plan

    result = ScoreResult(scores=scores.scores, compensation=scores.compensation)
    plan = plan_from_scores(model, result, ratio, allocation, head_mode, structures, calibration=calibration,
                            damping=damping)
    if compensation != "none" or method == "obs":
        options = CompensationOptions(mode=compensation, damping=damping,  # type: ignore[arg-type]
                                      select="obs" if method == "obs" else "plan")
        plan = compensate_sequential(model, adapter, plan, calibration, options).plan
    express_biases(model, adapter, expressible_biases(model, adapter))
    apply_plan(model, adapter, plan)


def _evaluate(
    model: nn.Module,
    tokenizer: Any,
    windows: torch.Tensor | None,
    tasks: Any,
    batch_size: int,
    task_options: dict[str, Any],
) -> tuple[float | None, dict[str, float]]:
    from minillm.evaluate.perplexity import perplexity

    ppl = perplexity(model, windows, batch_size).perplexity if windows is not None else None
    accuracy: dict[str, float] = {}
    if tasks:
        from minillm.evaluate.zeroshot import evaluate_tasks

        result = evaluate_tasks(model, tokenizer, tasks, batch_size=batch_size, **task_options)
        accuracy = {name: score.value for name, score in result.scores.items()}
    if ppl is not None and not math.isfinite(ppl):
        ppl = float("inf")
    return ppl, accuracy


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("internal entry point of minillm compare; use `minillm compare`")
