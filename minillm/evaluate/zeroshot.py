"""The lm-eval bridge: zero-shot tasks on an in-memory model through ``lm_eval.simple_evaluate``.

No subprocess and no second copy of the model: the loaded (pruned, recovered …) model is wrapped in
lm-eval's ``HFLM`` and handed to ``simple_evaluate``. Tasks come from one of three places:

* ``data_dir``: minillm's own task YAMLs (``minillm/tasks/``) reading local JSON-lines files, so the
  seven tasks of the pruning literature run with no network;
* ``tasks_dir``: any folder of lm-eval task YAMLs (lm-eval's ``--include_path``), beside the built-ins;
* neither: lm-eval's built-in tasks (they download their datasets from the Hub).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from minillm.errors import UsageError

#: The zero-shot suite of LLM-Pruner / Wanda / MINI-LLM, in their table order.
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
#: The metric each paper table reports for a task (acc_norm where length normalisation is customary).
HEADLINE_METRIC = {
    "boolq": "acc",
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UsageError("zero-shot tasks need lm-eval: pip install 'minillm-prune[eval]'") from None
    return lm_eval


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int | None


@dataclass
class ZeroShotResult:
    """Headline score per task, their unweighted mean, and lm-eval's own results table."""

    scores: dict[str, TaskScore]
    num_fewshot: int
    limit: int | float | None
    table: str = ""
    all_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(s.value for s in self.scores.values()) / len(self.scores) if self.scores else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": {name: asdict(score) for name, score in self.scores.items()},
            "mean": self.mean,
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "all_metrics": self.all_metrics,
        }


def parse_tasks(spec: str | list[str]) -> list[str]:
    """``"boolq, piqa"`` or a list → task names, in order, without duplicates."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if name and name not in out:
            out.append(name)
    if not out:
        raise UsageError("--tasks is empty; e.g. --tasks " + ",".join(PAPER_TASKS))
    return out


def task_manager(
    tasks_dir: str | Path | None = None, data_dir: str | Path | None = None, names: list[str] | None = None
) -> Any:
    """lm-eval's TaskManager over the right task folders (see the module docstring).

    Indexing lm-eval's ~15k built-in task YAMLs takes tens of seconds on a small CPU, so local folders are
    indexed alone first; the built-ins are added only when a requested name is not found locally (and
    never with ``data_dir`` alone: offline, the built-ins could not load their data anyway).
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    from minillm.tasks import TASKS_DIR

    include: list[str] = []
    metadata: dict[str, Any] = {}
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise UsageError(
                f"--data-dir {str(folder)!r} is not a folder; it should hold files like "
                "piqa.validation.jsonl (see ../shared/data/zeroshot)"
            )
        include.append(str(TASKS_DIR))
        metadata["data_dir"] = str(folder.absolute())
    if tasks_dir is not None:
        if not Path(tasks_dir).is_dir():
            raise UsageError(f"--tasks-dir {str(tasks_dir)!r} is not a folder of lm-eval task YAMLs")
        include.append(str(tasks_dir))
    if include:
        local = TaskManager(include_path=include, include_defaults=False, metadata=metadata or None)
        if tasks_dir is None or all(n in local.all_tasks or local.match_tasks([n]) for n in names or []):
            return local
    return TaskManager(include_path=include or None, include_defaults=True, metadata=metadata or None)


def check_tasks(manager: Any, names: list[str]) -> None:
    """Unknown names → one line with lm-eval's nearest names (did you mean …?) and where to look."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known and not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            listing = (
                ", ".join(manager.all_tasks)
                if len(known) <= 40
                else f"{len(known)} tasks; list them with `lm-eval ls tasks`"
            )
            raise UsageError(f"unknown lm-eval task {name!r}.{hint} Available: {listing}")


def headline(task: str, metrics: dict[str, Any]) -> tuple[str, float, float | None]:
    """The reported metric of one task's lm-eval results (``acc_norm,none`` style keys)."""
    values = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "," in k}
    preferred = HEADLINE_METRIC.get(task)
    for metric in (preferred, "acc_norm", "acc", "exact_match", *sorted(values)):
        if metric and metric in values and not metric.endswith("_stderr"):
            stderr = values.get(f"{metric}_stderr")
            return metric, float(values[metric]), float(stderr) if isinstance(stderr, (int, float)) else None
    raise UsageError(f"lm-eval returned no numeric metric for task {task!r}")


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | list[str],
    *,
    tasks_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> ZeroShotResult:
    """Run lm-eval tasks on ``model`` in memory; returns the headline score of every task."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    from minillm.calibration.forward import input_device

    names = parse_tasks(tasks)
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be positive (got {limit})")
    manager = task_manager(tasks_dir, data_dir, names)
    check_tasks(manager, names)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (FileNotFoundError, ConnectionError) as exc:
        raise UsageError(
            f"lm-eval could not load task data ({exc}); for offline runs pass --data-dir with the "
            "local files or --tasks-dir with your own task YAMLs"
        ) from exc
    scores: dict[str, TaskScore] = {}
    for task, metrics in results["results"].items():
        if task not in names and task in results.get("groups", {}):
            continue
        metric, value, stderr = headline(task, metrics)
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        scores[task] = TaskScore(task, metric, value, stderr, samples)
    all_metrics = {
        t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in results["results"].items()
    }
    return ZeroShotResult(scores, num_fewshot, limit, make_table(results), all_metrics)
