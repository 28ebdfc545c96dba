"""Recovery by distillation: the chunked KL is the KL (value and gradient), the teacher is untouched, the
sampled teacher cache is unbiased, a KD step never holds a full logits tensor, resume is exact, and bad
teachers or data fail with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, random_ids, tiny_model, tiny_tokenizer
from helpers import pattern_text

from minillm.api import prune
from minillm.calibration.data import CalibrationSet
from minillm.errors import UsageError
from minillm.recover import RecoverConfig, recover
from minillm.recover.data import IGNORE, load_examples
from minillm.recover.distill import TokenLoss, kl_sum, output_head, sampled_kl_sum
from minillm.recover.teacher import teacher_rows
from minillm.recover.teacher_cache import sample_rows


def _batch(n: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    """Random ids with one right-padded row and a masked prompt, so the target mask matters."""
    ids = random_ids(n, seq, seed=4)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[1, :3] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _direct_kl(student, teacher, batch, temperature: float, with_ce: bool = False) -> torch.Tensor:
    """The textbook computation: full logits of both models (one forward each), mean KL over target
    tokens, plus the mean CE when asked."""
    keep = batch["labels"][:, 1:] != IGNORE
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    p = torch.softmax(t / temperature, -1)
    kl = (p * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))).sum()
    loss = kl * temperature**2 / keep.sum()
    if with_ce:
        loss = loss + torch.nn.functional.cross_entropy(s, batch["labels"][:, 1:][keep])
    return loss


def _pair(family: str = "llama-mha-tied"):
    return tiny_model(family, seed=0).double(), tiny_model(family, seed=1).double().requires_grad_(False)


def _kd(student, teacher, batch, chunk: int, temperature: float = 1.0, loss: str = "kd") -> torch.Tensor:
    objective = TokenLoss(student, loss, temperature, chunk_size=chunk)
    objective.teacher_head = output_head(teacher)
    rows = teacher_rows(teacher, batch, batch["input_ids"].device)
    return objective(batch["input_ids"], batch["attention_mask"], batch["labels"], teacher_rows=rows)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_unchunked_and_direct(temperature: float) -> None:
    student, teacher = _pair()
    batch = _batch()
    with torch.no_grad():
        values = [_kd(student, teacher, batch, chunk, temperature) for chunk in (1, 5, 10_000)]
        direct = _direct_kl(student, teacher, batch, temperature)
    assert direct > 1e-3  # two different random models: a real divergence
    for value in values:
        assert abs(float(value) - float(direct)) < 1e-8
    # the training path (custom autograd, gradients computed per chunk) gives the same value
    trained = _kd(student.requires_grad_(True), teacher, batch, 5, temperature)
    assert abs(float(trained.detach()) - float(direct)) < 1e-8


@pytest.mark.parametrize("loss", ["kd", "kd+ce"])
@pytest.mark.parametrize("family", ["llama-mha-tied", "opt"])
def test_student_gradient_matches_direct_implementation(loss: str, family: str) -> None:
    """Every student weight's gradient, tied embeddings included (the head's gradient meets the
    embedding's). float64 throughout, except that transformers' Llama RMSNorm computes in float32: its
    rounding of a different-but-equal gradient sum allows ~1e-7 relative there; OPT is float64 end to end."""
    student, teacher = _pair(family)
    student.requires_grad_(True)
    batch = _batch()
    _kd(student, teacher, batch, chunk=4, loss=loss).backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    _direct_kl(student, teacher, batch, 1.0, with_ce=loss == "kd+ce").backward()
    assert len(chunked) > 5
    tolerance = {"atol": 1e-12, "rtol": 1e-9} if family == "opt" else {"atol": 1e-10, "rtol": 1e-6}
    for name, param in student.named_parameters():
        assert param.grad.abs().max() > 0, name
        torch.testing.assert_close(chunked[name], param.grad, **tolerance, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_sampled_cache_kl_is_unbiased() -> None:
    """Mean of the sampled estimate over many independent draws → the exact KL (and its gradient), for
    sampling the teacher itself (α=1) and a flattened importance proposal (α=0.5); top-k is biased."""
    generator = torch.Generator().manual_seed(0)
    rows, vocab, draws, k = 3, 40, 20_000, 8
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64, requires_grad=True)
    exact = kl_sum(student, teacher, 1.0)
    (exact_grad,) = torch.autograd.grad(exact, student)
    for alpha in (1.0, 0.5):
        drawn = sample_rows(teacher.repeat(draws, 1), k, 1.0, alpha, generator)  # draws × rows, independent
        proposal = torch.softmax(alpha * torch.log_softmax(teacher, -1), -1).repeat(draws, 1)
        picked = proposal.gather(-1, drawn["ids"].long())
        torch.testing.assert_close(drawn["weights"].double() * k * picked, drawn["probs"].double())
        per_row = (-(drawn["weights"].double() * torch.log_softmax(student.repeat(draws, 1), -1).gather(
            -1, drawn["ids"].long())).sum(-1) - drawn["entropy"].double())
        estimates = per_row.view(draws, rows).sum(-1)  # one estimate of kl_sum per draw
        mean, sem = estimates.mean(), estimates.std() / draws**0.5
        assert abs(float(mean) - float(exact)) < 4 * float(sem), (alpha, float(mean), float(exact))
        (grad,) = torch.autograd.grad(mean, student)
        assert (grad - exact_grad).abs().max() < 0.02 * exact_grad.abs().max(), alpha
        value = sampled_kl_sum(student, drawn["ids"][:rows], drawn["weights"][:rows].double(),
                               drawn["entropy"][:rows].double(), 1.0)
        torch.testing.assert_close(value, estimates[0])  # the training-side estimator is this one
    top = teacher.topk(k, dim=-1)  # a renormalised top-8 cache fails the same test
    top_p = torch.softmax(top.values, -1)
    entropy = -(torch.softmax(teacher, -1) * torch.log_softmax(teacher, -1)).sum()
    biased = -(top_p * torch.log_softmax(student, -1).gather(-1, top.indices)).sum() - entropy
    assert abs(float(biased) - float(exact)) > 4 * float(sem)  # the bar the sampled estimate passes


def _profile_peak(step) -> int:
    """Peak growth of allocated CPU bytes during ``step()``, from torch.profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_kd_step_never_holds_full_float32_logits() -> None:
    """Vocabulary 32,768 and 8 × 64 tokens: one model's float32 logits are 66 MB. A chunked KD
    forward+backward (16 tokens a chunk) peaks below that; the same step unchunked peaks far above."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=32768, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    student = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (8, 64), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    logits_bytes = 8 * 63 * config.vocab_size * 4

    def step(chunk: int):
        def run() -> None:
            _kd(student, teacher, batch, chunk).backward()
        return run

    step(16)()  # warm-up: lazily created buffers and .grad tensors exist before measuring
    chunked = _profile_peak(step(16))
    unchunked = _profile_peak(step(10_000))
    print(f"peak: chunked {chunked / 2**20:.1f} MiB, unchunked {unchunked / 2**20:.1f} MiB, "
          f"one logits tensor {logits_bytes / 2**20:.1f} MiB")
    assert chunked < 0.5 * logits_bytes
    assert unchunked > 2 * logits_bytes  # the measurement does see full logits when they exist


# --- end to end through recover() ---------------------------------------------------------------------


def _pattern_text(path: Path, words: int = 1200) -> Path:
    return pattern_text(path, VOCAB, words)


@pytest.fixture(scope="module")
def dense_and_pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dense tiny model saved as a folder, and a uniform prune of it (its minillm.json names the folder)."""
    root = tmp_path_factory.mktemp("distill")
    dense = root / "dense"
    tiny_model("llama").save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    # no compensation: the refit (prune's default) leaves the tiny student almost equal to its teacher on
    # these 4 windows, and the tests need a student that still has something to learn from it
    prune(str(dense), ratio=0.3, calib=calibration, spsa_steps=1, out=root / "pruned", device_map=None,
          compensation="none")
    return dense, root / "pruned"


def _config(**overrides) -> RecoverConfig:
    settings = dict(method="full", max_steps=6, batch_size=4, grad_accum=1, max_length=16, lr=3e-3,
                    warmup_steps=0, val_size=4, eval_every=0, save_every=0)
    return RecoverConfig(**{**settings, **overrides})


def test_default_teacher_is_the_base_model_and_is_left_untouched(dense_and_pruned, tmp_path: Path) -> None:
    dense, pruned = dense_and_pruned
    assert json.loads((pruned / "minillm.json").read_text())["base_model"] == str(dense)
    data = _pattern_text(tmp_path / "train.txt")
    result = recover(str(pruned), str(data), tmp_path / "out", _config())
    recovery = json.loads((tmp_path / "out" / "minillm.json").read_text())["recovery"]
    assert (recovery["loss"], recovery["teacher"], recovery["method"]) == ("kd", str(dense), "full")
    assert result.log.losses[-1] < result.log.losses[0]
    assert result.log.tokens == 6 * 4 * 16
    # an in-memory teacher: no gradients reach it and its weights do not change
    teacher = tiny_model("llama")
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    recover(str(pruned), str(data), None, _config(save_every=0), teacher=teacher)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())


def test_kd_resume_gives_the_weights_of_an_uninterrupted_run(dense_and_pruned, tmp_path: Path) -> None:
    _, pruned = dense_and_pruned
    data = _pattern_text(tmp_path / "train.txt")
    full = recover(str(pruned), str(data), tmp_path / "full", _config(save_every=3), keep_checkpoints=True)
    ckpt = tmp_path / "full.checkpoints"
    assert [p.name for p in ckpt.iterdir()] == ["step-0000003"]
    resumed = recover(str(pruned), str(data), tmp_path / "resumed", _config(save_every=3),
                      checkpoint_dir=ckpt, resume=True)
    assert resumed.log.resumed_from == 3
    pairs = zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_cached_teacher_trains_and_is_reused(dense_and_pruned, tmp_path: Path) -> None:
    dense, pruned = dense_and_pruned
    data = _pattern_text(tmp_path / "train.txt")
    cache = tmp_path / "cache"
    first = recover(str(pruned), str(data), None, _config(teacher_samples=1024, lr=1e-3), cache_teacher=cache)
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["samples"] == 1024 and meta["teacher"] == str(dense)
    # the sampled loss is noisy per batch; the exact KL to the teacher is what must fall
    from minillm.loading import load_model

    teacher, start = (load_model(str(p), device_map=None, dtype="float32") for p in (dense, pruned))
    ids = torch.tensor([e.input_ids for e in load_examples(tiny_tokenizer(), str(data), 16)[:8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        before, after = (_direct_kl(m, teacher, batch, 1.0) for m in (start, first.model))
    print(f"KL to the teacher: {float(before):.5f} -> {float(after):.5f}")
    assert after < 0.8 * before
    again = recover(str(pruned), str(data), None, _config(teacher_samples=1024, lr=1e-3), cache_teacher=cache,
                    teacher=str(dense))
    assert again.log.losses == first.log.losses  # read back, not recomputed differently
    with pytest.raises(UsageError, match="other training data or settings"):
        recover(str(pruned), str(data), None, _config(teacher_samples=8, lr=1e-3), cache_teacher=cache)


def test_bad_teachers_and_data_fail_with_one_line(dense_and_pruned, tmp_path: Path) -> None:
    import transformers as tf
    from typer.testing import CliRunner

    from minillm.cli import app, register_commands

    _, pruned = dense_and_pruned
    data = _pattern_text(tmp_path / "train.txt")
    other = tmp_path / "other-vocab"
    config = tf.LlamaConfig(vocab_size=VOCAB + 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    register_commands()
    runner = CliRunner()
    base = ["recover", str(pruned), "--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "1",
            "--max-length", "16"]
    run = runner.invoke(app, [*base, "--teacher", str(other)])
    assert run.exit_code == 2 and "vocabulary" in run.output and "differs" in run.output
    run = runner.invoke(app, [*base, "--teacher", str(tmp_path / "nowhere")])
    assert run.exit_code == 2 and "--teacher" in run.output
    with pytest.raises(UsageError, match="--loss kd needs a teacher: pass --teacher"):
        recover(tiny_model("llama"), str(data), None, _config(loss="kd"), tokenizer=tiny_tokenizer())
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4 w5\n")
    with pytest.raises(UsageError, match=r"has [56] tokens and needs at least 32"):
        recover(str(pruned), str(short), None, _config(loss="ce"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UsageError, match=r"empty \(0 tokens"):
        recover(str(pruned), str(empty), None, _config(loss="ce"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


def test_chat_jsonl_goes_through_the_chat_template(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    rows = [{"messages": [{"role": "user", "content": f"w{i} w2"}, {"role": "assistant", "content": "w3"}]}
            for i in range(4)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = load_examples(tokenizer, str(path), max_length=64)
    assert len(examples) == 4
    vocab = tokenizer.get_vocab()
    assert examples[1].input_ids == [vocab[w] for w in ["<s>", "w1", "w2", "</s>", "<s>", "w3", "</s>"]]
    assert examples[1].labels == examples[1].input_ids


def test_block_mode_lowers_every_blocks_reconstruction_error(dense_and_pruned, tmp_path: Path) -> None:
    """--mode blocks on the one executor: each pruned block moves towards its dense counterpart on the
    pruned prefix's hidden states; the export reloads and carries the per-block errors."""
    dense, pruned = dense_and_pruned
    data = _pattern_text(tmp_path / "train.txt")
    config = _config(mode="blocks", block_steps=30, block_samples=8, lr=1e-2)
    result = recover(str(pruned), str(data), tmp_path / "out", config)
    recovery = json.loads((tmp_path / "out" / "minillm.json").read_text())["recovery"]
    errors = recovery["train"]["blocks"]
    assert recovery["method"] == "blocks" and recovery["teacher"] == str(dense)
    assert sorted(errors) == ["0", "1"]
    for index, error in errors.items():
        assert error["after"] < 0.7 * error["before"], (index, error)
    from minillm.loading import load_model

    reloaded = load_model(str(tmp_path / "out"), device_map=None, dtype="float32")
    ids = random_ids(1, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match=r"--mode blocks .* needs --teacher"):
        recover(str(pruned), str(data), None, _config(mode="blocks", loss="ce"))


def test_offloaded_teacher_gives_the_same_loss() -> None:
    """A teacher whose weights accelerate keeps off the compute device (hooks load them per module, the
    parameters sit on ``meta``) gives the same KD loss: its body and head run through the hooks."""
    from accelerate import cpu_offload

    student, teacher = _pair("llama")
    batch = _batch()
    with torch.no_grad():
        expected = _kd(student, teacher, batch, chunk=4)
    offloaded = cpu_offload(tiny_model("llama", seed=1).double(), execution_device=torch.device("cpu"))
    assert offloaded.lm_head.weight.device.type == "meta"
    with torch.no_grad():
        got = _kd(student, offloaded, batch, chunk=4)
    assert abs(float(got) - float(expected)) < 1e-10
