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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from minillm.compensation import COMPENSATIONS
from minillm.errors import UsageError
from minillm.plan import ALLOCATIONS

if TYPE_CHECKING:
    from minillm.recipe import Recipe

FORWARD = "forward"  # the reference "method": one plain forward pass over the calibration set


@dataclass
class MethodScores:
    """A method's group scores and what getting them cost."""

    method: str
    scores: dict[int, Any]
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


def score_method(model: nn.Module, recipe: Recipe, calibration: Any, layers: list[int]) -> MethodScores:
    """Score with ``recipe``'s criterion (or run the plain-forward reference), measuring peak memory and
    time; seed, SPSA and criterion options come from the recipe as in ``prune``."""
    from minillm.api import score_model
    from minillm.calibration.forward import mean_loss
    from minillm.calibration.spsa import SpsaConfig
    from minillm.memory import measure
    from minillm.scoring import ScoreResult

    method = recipe.criterion
    with measure(reset=True) as used:
        if method == FORWARD:
            mean_loss(model, calibration)
            result = ScoreResult(scores={}, forward_passes=1)
        else:
            spsa = SpsaConfig(steps=recipe.spsa_steps, eps=recipe.spsa_eps, seed=recipe.seed)
            result = score_model(model, method, calibration, layers, recipe.seed, spsa,
                                 recipe.criterion_options)
    seconds = used.seconds
    peak = used.cuda_peak_bytes if used.cuda_peak_bytes is not None else used.peak_rss_bytes
    return MethodScores(
        method,
        result.scores,
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
    save_file(tensors, str(path.with_suffix(".safetensors")))
    meta = {k: v for k, v in asdict(scores).items() if k != "scores"}
    path.with_suffix(".json").write_text(json.dumps(meta))


def _load_scores(path: Path) -> MethodScores:
    from safetensors.torch import load_file

    from minillm.plan import LayerScores

    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    scores = {
        i: LayerScores(tensors[f"{i}.heads"], tensors[f"{i}.kv_heads"], tensors[f"{i}.channels"])
        for i in layers
    }
    return MethodScores(scores=scores, **meta)


def worker(spec_path: str) -> None:
    """Entry of the per-method subprocess: load, score, write scores + measurements next to the spec."""
    from safetensors.torch import load_file

    from minillm.calibration.data import CalibrationSet
    from minillm.loading import load_model
    from minillm.recipe import Recipe

    spec = json.loads(Path(spec_path).read_text())
    recipe = Recipe.from_dict(spec["recipe"], source="compare worker")
    model = load_model(recipe.model, device_map=recipe.device_map, dtype=recipe.dtype,
                       trust_remote_code=recipe.trust_remote_code)
    calibration = CalibrationSet(load_file(spec["calibration"])["input_ids"], recipe.batch_size)
    scores = score_method(model, recipe, calibration, spec["layers"])
    _save_scores(scores, Path(spec["out"]))


def _score_isolated(spec: dict[str, Any], workdir: Path) -> MethodScores:
    method = spec["recipe"]["criterion"]
    out = workdir / f"scores-{method}"
    spec_path = workdir / f"spec-{method}.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    run = subprocess.run(
        [sys.executable, "-m", "minillm.compare", "--worker", str(spec_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"scoring with {method!r} failed in its subprocess:\n{tail}")
    return _load_scores(out)


# -------------------------------------------------------------------------------------- the API
def compare(
    model: str | nn.Module | None = None,
    recipe: Recipe | None = None,
    *,
    methods: list[str],
    ratios: list[float] = (0.2,),  # type: ignore[assignment]
    allocations: list[str] = ("uniform", "global"),  # type: ignore[assignment]
    eval_ppl: str | None = None,
    eval_windows: int | None = None,
    tasks: str | list[str] | None = None,
    tasks_dir: str | None = None,
    data_dir: str | None = None,
    limit: int | float | None = None,
    tokenizer: Any = None,
    isolate: bool | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **overrides: Any,
) -> CompareResult:
    """Score ``model`` with every method once, then plan, prune and evaluate every (ratio, allocation,
    compensation); the ``compensation`` override may name several modes (a list or a comma list).

    The settings shared by every cell are a :class:`~minillm.recipe.Recipe` (``recipe``, with its
    fields as keyword ``overrides`` on top, as :func:`minillm.api.prune` takes them); each cell of the
    matrix is that recipe with the method as ``criterion``, the ratio, allocation and compensation,
    planned and cut by the same functions as ``prune`` (:func:`minillm.api.plan_for`,
    :func:`minillm.api.cut_as`).
    """
    from minillm.arch import adapter_for
    from minillm.calibration.data import calibration_set, evaluation_windows
    from minillm.groups import count_parameters, prunable_layers
    from minillm.recipe import Recipe
    from minillm.scoring import CRITERIA
    from minillm.search_data import check_search_data, held_out_set

    if isinstance(model, str):
        overrides["model"] = model
    modes = overrides.pop("compensation", None)  # an axis of the matrix: one mode or several
    base = (recipe or Recipe()).merged(overrides, source="compare()")
    model = base.model if model is None else model
    if model is None:
        raise UsageError("no model to compare: pass --model (hub id, folder or .gguf) or set `model:` in the "
                         "recipe")
    check_search_data(base.search, base.architecture, base.search_data, base.search_data_samples)
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
    modes = base.compensation if modes is None else modes
    compensations = [c.strip() for c in (modes.split(",") if isinstance(modes, str) else modes) if c.strip()]
    for mode in compensations or [""]:
        if mode not in COMPENSATIONS:
            raise UsageError(f"--compensation takes a comma list of {', '.join(COMPENSATIONS)} "
                             f"(got {mode!r})")
    cells = {(m, r, a, c): base.merged({"criterion": m, "ratio": r, "allocation": a, "compensation": c},
                                       source="compare()")
             for m in methods for r in ratios for a in allocations for c in compensations}
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UsageError(f"--out {str(out_dir)!r} is a file; give a folder path")
    if out_dir is not None:
        from minillm.option_checks import check_loading
        from minillm.output_guard import check_no_overlap

        check_no_overlap(out_dir, (model if isinstance(model, str) else None, base.calib, base.search_data,
                                   eval_ppl, tasks_dir, data_dir))
        check_loading(base.device_map, seed=base.seed)
    path = model if isinstance(model, str) else None
    isolate = path is not None if isolate is None else isolate
    if isolate and path is None:
        raise UsageError("isolated scoring (a fresh process per method) needs the model as a path or hub id")
    if isinstance(model, str):
        from minillm.loading import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model, base.trust_remote_code)
        model = load_model(model, device_map=base.device_map, dtype=base.dtype,
                           trust_remote_code=base.trust_remote_code, seq_len=base.seq_len)
    if tokenizer is None:
        raise UsageError("a tokenizer is needed to read calibration text; pass tokenizer=…")
    adapter = adapter_for(model.config)
    layers = prunable_layers(len(adapter.decoder_layers(model)), base.skip_first, base.skip_last)
    calibration = calibration_set(tokenizer, base.calib, base.calib_samples, base.seq_len, base.seed,
                                  base.batch_size)
    held_out = held_out_set(tokenizer, base.model_dump(), calibration, base.calib)  # --search --search-data
    windows = evaluation_windows(tokenizer, eval_ppl, base.seq_len) if eval_ppl else None
    if windows is not None and eval_windows:
        windows = windows[:eval_windows]

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
        for done, method in enumerate([FORWARD, *methods]):
            report("scoring", done, len(methods) + 1)
            scoring = base.merged({"criterion": method, "model": path}, source="compare()")
            if isolate:
                spec = {"recipe": scoring.to_dict(), "layers": layers,
                        "calibration": str(workdir / "calibration.safetensors")}
                all_scores[method] = _score_isolated(spec, workdir)
            else:
                all_scores[method] = score_method(model, scoring, calibration, layers)
        report("scoring", len(methods) + 1, len(methods) + 1)
    dense_params = count_parameters(model)
    batch_size = base.batch_size
    dense_ppl = _evaluate(model, tokenizer, windows, None, batch_size, {})[0] if windows is not None else None
    reference = all_scores[FORWARD]
    rows = []
    for done, ((method, ratio, allocation, mode), cell) in enumerate(cells.items()):
        scores = all_scores[method]
        pruned = copy.deepcopy(model)
        _prune_copy(pruned, adapter, scores, cell, calibration, held_out)
        ppl, accuracy = _evaluate(
            pruned,
            tokenizer,
            windows,
            tasks,
            batch_size,
            {"tasks_dir": tasks_dir, "data_dir": data_dir, "limit": limit, "seed": base.seed},
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
        report("prune + evaluate", done + 1, len(cells))
    shared = ("calib", "calib_samples", "seq_len", "batch_size", "eval_ppl", "eval_windows", "spsa_steps",
              "spsa_eps", "seed", "head_mode", "structures", "compensation", "damping")
    protocol = {  # the base recipe's settings every cell shared, in the order the report prints them
        **{key: getattr(base, key, None) for key in shared},
        "compensation": ",".join(compensations),
        "eval_ppl": eval_ppl,
        "eval_windows": None if windows is None else int(windows.shape[0]),
        "layers": f"{layers[0]}-{layers[-1]}",
        "isolated": isolate,
        "memory": "CUDA max allocated" if torch.cuda.is_available() else "peak RSS (VmHWM) during scoring",
    }
    result = CompareResult(rows, dense_params, dense_ppl, reference.peak_bytes, reference.seconds, protocol)
    if out_dir is not None:
        from minillm.compare.report import write_outputs

        result.files = write_outputs(result, Path(out_dir))
    return result


def _prune_copy(model: nn.Module, adapter: Any, scores: MethodScores, cell: Recipe, calibration: Any,
                held_out: Any = None) -> None:
    """Plan and cut ``model`` (a copy) for one matrix cell, by the functions ``prune`` uses."""
    from minillm.api import cut_as, plan_for
    from minillm.scoring import ScoreResult

    plan = plan_for(model, ScoreResult(scores=scores.scores), cell, calibration=calibration,
                    held_out=held_out)
    cut_as(cell, model, adapter, plan, calibration)


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

