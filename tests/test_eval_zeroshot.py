"""minillm eval: real lm-eval tasks end to end on tiny local task files, offline; --compare-to; bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer, write_text

from minillm.errors import UsageError
from minillm.evaluate.zeroshot import evaluate_tasks

PIQA = [{"goal": f"w{i} w{i + 1} w{i + 2}", "sol1": f"w{i + 3} w{i + 4}", "sol2": f"w{i + 9}", "label": i % 2}
        for i in range(8)]


def _zeroshot_dir(folder: Path) -> Path:
    """A handful of rows per task, with the Hugging Face datasets' fields (as ../shared/data/zeroshot)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        "piqa": PIQA,
        "boolq": [{"question": f"w{i} w2", "answer": bool(i % 2), "passage": f"w{i} w5 w6"}
                  for i in range(6)],
        "hellaswag": [{"activity_label": f"w{i}", "ctx_a": "w1 w2.", "ctx_b": "w3", "ctx": "w1 w2. w3",
                       "endings": ["w4 [title] w5", "w6", "w7 w8", "w9"], "label": str(i % 4)}
                      for i in range(5)],
        "winogrande_xl": [{"sentence": f"w{i} w2 _ w3 w4", "option1": "w5", "option2": "w6",
                           "answer": "1" if i % 2 else "2"} for i in range(5)],
    }
    for name, items in rows.items():
        (folder / f"{name}.validation.jsonl").write_text("\n".join(json.dumps(r) for r in items) + "\n")
    return folder


def _loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)[0]
    return sum(float(logprobs[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


def test_local_tasks_run_end_to_end_and_match_a_hand_computed_accuracy(tmp_path: Path) -> None:
    data = _zeroshot_dir(tmp_path / "zeroshot")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    result = evaluate_tasks(model, tokenizer, "piqa,boolq,hellaswag,winogrande", data_dir=data, limit=5)
    assert set(result.scores) == {"piqa", "boolq", "hellaswag", "winogrande"}
    for score in result.scores.values():
        assert 0.0 <= score.value <= 1.0 and score.samples == 5
    assert result.scores["piqa"].metric == "acc_norm" and result.scores["winogrande"].metric == "acc"
    assert math.isclose(result.mean, sum(s.value for s in result.scores.values()) / 4)
    assert "piqa" in result.table and "acc_norm" in result.table
    # lm-eval's PIQA accuracy is what scoring each solution by hand gives
    hits = [
        max((0, 1), key=lambda k: _loglikelihood(model, tokenizer, f"Question: {row['goal']}\nAnswer:",
                                                  " " + row[f"sol{k + 1}"])) == row["label"]
        for row in PIQA[:5]
    ]
    assert math.isclose(result.all_metrics["piqa"]["acc,none"], sum(hits) / 5)


def test_unknown_task_and_bad_folders_give_one_clear_line(tmp_path: Path) -> None:
    data = _zeroshot_dir(tmp_path / "zeroshot")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(UsageError, match=r"unknown lm-eval task 'piqaa'\. Did you mean 'piqa'"):
        evaluate_tasks(model, tokenizer, "piqaa", data_dir=data)
    with pytest.raises(UsageError, match=r"--data-dir .* is not a folder"):
        evaluate_tasks(model, tokenizer, "piqa", data_dir=tmp_path / "missing")
    with pytest.raises(UsageError, match="--limit must be positive"):
        evaluate_tasks(model, tokenizer, "piqa", data_dir=data, limit=0)


def test_cli_eval_tasks_ppl_compare_and_json(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from minillm.cli import app, register_commands

    data = _zeroshot_dir(tmp_path / "zeroshot")
    text = write_text(tmp_path / "test.txt", words=600)
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"model{seed}"
        tiny_model("llama", seed=seed).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    # a user's own task folder (lm-eval's include_path): a plain json-backed YAML
    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "mytask.yaml").write_text(
        "task: mytask\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data / 'piqa.validation.jsonl'}\noutput_type: multiple_choice\n"
        "validation_split: validation\ndoc_to_text: '{{goal}}'\ndoc_to_target: label\n"
        "doc_to_choice: '{{[sol1, sol2]}}'\nmetric_list:\n  - metric: acc\n"
    )
    register_commands()
    out = tmp_path / "eval.json"
    args = ["eval", folders[0], "--tasks", "piqa,winogrande", "--data-dir", str(data), "--limit", "4",
            "--ppl", str(text), "--seq-len", "32", "--compare-to", folders[1], "--json", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    payload = json.loads(out.read_text())
    assert payload["perplexity"]["windows"] > 0 and payload["perplexity"]["perplexity"] > 1
    assert set(payload["zeroshot"]["tasks"]) == {"piqa", "winogrande"}
    assert payload["reference"]["model"] == folders[1]
    ref = payload["reference"]["zeroshot"]["tasks"]["piqa"]["value"]
    if ref:
        assert math.isclose(payload["retained"]["piqa"], payload["zeroshot"]["tasks"]["piqa"]["value"] / ref)
    ppl, ref_ppl = payload["perplexity"]["perplexity"], payload["reference"]["perplexity"]["perplexity"]
    assert math.isclose(payload["retained"]["perplexity"], ref_ppl / ppl)
    assert "retained" in run.output and "zero-shot mean" in run.output
    run = CliRunner().invoke(app, ["eval", folders[0], "--tasks", "mytask", "--tasks-dir", str(tasks_dir),
                                   "--limit", "3"])
    assert run.exit_code == 0, run.output
    assert "mytask" in run.output
    run = CliRunner().invoke(app, ["eval", folders[0], "--tasks", "boolqq", "--data-dir", str(data)])
    assert run.exit_code == 2 and "Did you mean 'boolq'" in run.output
    run = CliRunner().invoke(app, ["eval", folders[0]])
    assert run.exit_code == 2 and "--ppl" in run.output and "--tasks" in run.output
