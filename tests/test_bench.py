"""bench: interleaved timings, ratios from medians, decode really uses the KV cache, CLI and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from minillm.errors import UsageError
from minillm.speed import SpeedCase, benchmark, decode, markdown, parse_ints, prefill, ratios


def test_decode_extends_the_cache_and_matches_greedy_generate():
    model = tiny_model("llama")
    ids = random_ids(2, 12)
    _, cache, token = prefill(model, ids)
    assert cache.get_seq_length() == 12
    decode(model, cache, token, 5)
    assert cache.get_seq_length() == 12 + 5  # one cached position per decode step
    # the same loop, collecting tokens, equals transformers' greedy generate
    _, cache, token = prefill(model, ids)
    tokens = [token]
    with torch.inference_mode():
        for _ in range(4):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    assert torch.equal(torch.cat(tokens, 1), generated[:, 12:])


def test_benchmark_rows_and_ratios_come_from_the_medians():
    models = {"dense": tiny_model("llama"), "pruned": tiny_model("llama-mha-tied")}
    cases = [SpeedCase(1, 8, 2), SpeedCase(2, 8, 2)]
    calls = []
    rows = benchmark(models, cases, repeats=3, warmup=1, progress=lambda t, d, n: calls.append((d, n)))
    assert len(rows) == 4 and calls[-1] == (16, 16)
    for row in rows:
        assert len(row.prefill_all) == 3 and row.prefill_seconds == sorted(row.prefill_all)[1]
        assert row.prefill_tokens_per_s == pytest.approx(row.batch_size * 8 / row.prefill_seconds)
        assert row.decode_tokens_per_s == pytest.approx(row.batch_size * 2 / row.decode_seconds)
        assert row.params == sum(p.numel() for p in models[row.model].parameters())
    by = {(r.model, r.batch_size): r for r in rows}
    for x in ratios(rows, "dense"):
        assert x["prefill_latency_ratio"] == pytest.approx(
            by[("pruned", x["batch_size"])].prefill_seconds / by[("dense", x["batch_size"])].prefill_seconds
        )
    assert "prefill latency × (IQR)" in markdown(rows, "dense")
    for x in ratios(rows, "dense"):  # the spread: IQR of the paired per-repeat ratios, around the median's
        pre = by[("pruned", x["batch_size"])].prefill_all
        ref = by[("dense", x["batch_size"])].prefill_all
        paired = [a / b for a, b in zip(pre, ref, strict=True)]
        low, high = x["prefill_latency_ratio_iqr"]
        assert min(paired) <= low <= high <= max(paired)


def test_pin_threads_pins_and_states_the_cpus():
    import os

    from minillm.speed import pin_threads

    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        count, cpus = pin_threads(1)
        assert count == 1 == torch.get_num_threads() and os.sched_getaffinity(0) == set(cpus)
        assert len(cpus) == 1
        with pytest.raises(UsageError, match="--threads"):
            pin_threads(0)
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


def test_parse_ints_rejects_bad_lists():
    assert parse_ints("1, 4", "--batch-sizes") == [1, 4]
    for bad in ("", "a,b", "0"):
        with pytest.raises(UsageError, match="--batch-sizes"):
            parse_ints(bad, "--batch-sizes")


def test_bench_cli_compare_to(tmp_path):
    from minillm.cli import app, register_commands

    register_commands()
    for name, family in (("dense", "llama"), ("small", "llama-mha-tied")):
        tiny_model(family).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    args = [
        "bench",
        str(tmp_path / "small"),
        "--compare-to",
        str(tmp_path / "dense"),
        "--batch-sizes",
        "1",
        "--prompt-lens",
        "8",
        "--new-tokens",
        "2",
        "--repeats",
        "2",
        "--json",
        str(tmp_path / "b.json"),
    ]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "latency vs dense" in out.output and "threads pinned to CPUs" in out.output
    payload = json.loads((tmp_path / "b.json").read_text())
    assert payload["reference"] == str(tmp_path / "dense") and len(payload["ratios"]) == 1
    bad = CliRunner().invoke(app, ["bench", str(tmp_path / "small"), "--batch-sizes", "x"])
    assert bad.exit_code == 2 and "--batch-sizes" in bad.output
