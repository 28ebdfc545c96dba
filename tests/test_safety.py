"""Safe by default (issue 19): no code runs unasked, no file is lost, every bad input gets one line.

Each test here failed on the code before the issue was fixed: a folder's ``modeling_minillm.py`` ran
under every model-loading command, recipes could delete and overwrite, ``--overwrite`` deleted inputs,
``push`` could leak the token and upload symlinked secrets, killed exports left temp folders forever, and
about 25 bad inputs ended in a traceback.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from conftest import random_ids, tiny_model, tiny_tokenizer, write_text
from typer.testing import CliRunner

from minillm.cli import app, register_commands
from minillm.errors import UsageError

register_commands()
runner = CliRunner()
TOKEN = "hf_SeCrEtT0kenValue1234567890abcdef"
TINY = ["--calib-samples", "4", "--seq-len", "16", "--spsa-steps", "1", "--device-map", "cpu"]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base model, calibration text, and a per-layer export whose modeling file is booby-trapped."""
    from minillm.api import prune
    from minillm.calibration.data import CalibrationSet

    root = tmp_path_factory.mktemp("safety")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    calib = write_text(root / "calib.txt")
    trapped = root / "trapped"
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    prune(str(base), ratio=0.3, allocation="global", calib=calibration,
          spsa_steps=1, out=trapped, device_map=None)
    code = trapped / "modeling_minillm.py"
    assert code.is_file() and (trapped / "minillm.json").is_file()  # both files an attacker controls
    marker = root / "PAYLOAD-RAN"
    code.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + code.read_text())
    return {"root": root, "base": base, "calib": calib, "trapped": trapped, "marker": marker}


def _tree(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with the hash of its bytes (folders: "dir"; links: their target)."""
    result = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            result[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            result[key] = "dir"
        else:
            result[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _one_line_failure(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------- 1. remote code only on request
def _loading_commands(w: dict[str, Path], out: Path) -> dict[str, list[str]]:
    trapped, base, calib = str(w["trapped"]), str(w["base"]), str(w["calib"])
    return {
        "prune": ["prune", "--model", trapped, "--calib", calib, *TINY, "--out", str(out)],
        "eval": ["eval", trapped, "--ppl", calib, "--seq-len", "16"],
        "eval --compare-to": ["eval", base, "--ppl", calib, "--seq-len", "16", "--compare-to", trapped],
        "inspect": ["inspect", trapped],
        "bench": ["bench", trapped, "--batch-sizes", "1", "--prompt-lens", "4", "--new-tokens", "1",
                  "--repeats", "1", "--warmup", "0", "--device", "cpu"],
        "bench --compare-to": ["bench", base, "--compare-to", trapped, "--batch-sizes", "1",
                               "--prompt-lens", "4", "--new-tokens", "1", "--repeats", "1", "--warmup", "0",
                               "--device", "cpu"],
        "recover": ["recover", trapped, "--data", calib, "--out", str(out), "--max-steps", "1"],
        "compare": ["compare", "--model", trapped, "--methods", "magnitude", "--calib", calib,
                    "--calib-samples", "4", "--seq-len", "16", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["prune", "eval", "eval --compare-to", "inspect", "bench",
                                     "bench --compare-to", "recover", "compare"])
def test_model_code_never_runs_without_the_flag(world, tmp_path: Path, command: str) -> None:
    args = _loading_commands(world, tmp_path / "out")[command]
    before = _tree(world["root"])
    result = runner.invoke(app, args)
    _one_line_failure(result, "--trust-remote-code", "modeling_minillm.py")
    assert not world["marker"].exists(), f"{command} ran the folder's code"
    assert not (tmp_path / "out").exists() and _tree(world["root"]) == before


def test_the_flag_runs_it_and_python_api_refuses_too(world, tmp_path: Path) -> None:
    from minillm.inspect import inspect_model
    from minillm.loading import load_model

    with pytest.raises(UsageError, match="--trust-remote-code"):
        load_model(str(world["trapped"]), device_map=None)
    with pytest.raises(UsageError, match="--trust-remote-code"):
        inspect_model(str(world["trapped"]))
    assert not world["marker"].exists()
    result = runner.invoke(app, ["inspect", str(world["trapped"]), "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert world["marker"].read_text() == "ran"  # the payload is real: only the flag let it run
    world["marker"].unlink()


def test_a_recipe_cannot_grant_trust(world, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(world["trapped"]), "trust_remote_code": True,
                                      "calib": str(world["calib"])}))
    result = runner.invoke(app, ["prune", "--recipe", str(recipe), *TINY, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--trust-remote-code" in result.output
    assert "ignoring trust_remote_code" in result.output
    assert not world["marker"].exists()


# --------------------------------------------------------------------- 2. recipes never say where to write
def test_recipe_replay_never_deletes_or_overwrites_outside_out(world, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    (victim / "minillm.json").write_text("{}")  # even a folder that looks like an export
    unrelated = tmp_path / "notes.html"
    unrelated.write_text("precious")
    offload = tmp_path / "offload"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(world["base"]), "calib": str(world["calib"]), "ratio": 0.25,
        "out": str(victim), "overwrite": True, "force": True, "report": str(unrelated),
        "offload_dir": str(offload),
    }))
    before = _tree(tmp_path)
    result = runner.invoke(app, ["prune", "--recipe", str(recipe), *TINY])  # no --out: refused
    assert result.exit_code == 2 and "--out is required" in result.output
    assert "ignoring out, overwrite, force, report, offload_dir" in result.output
    assert _tree(tmp_path) == before
    mine = tmp_path / "mine"
    result = runner.invoke(app, ["prune", "--recipe", str(recipe), *TINY, "--out", str(mine)])
    assert result.exit_code == 0, result.output
    assert (mine / "minillm.json").is_file()
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("mine")} == before  # nothing else touched
    # an export's own minillm.json carrying overwrite: true cannot empty an existing folder either
    metadata = json.loads((mine / "minillm.json").read_text())
    metadata["recipe"].update(overwrite=True, force=True, out=str(victim))
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps(metadata))
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    result = runner.invoke(app, ["prune", "--recipe", str(replay), "--out", str(target)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert _tree(victim) == {k[len("victim/"):]: v for k, v in before.items() if k.startswith("victim/")}


# -------------------------------------------------------------------------- 3. --overwrite has a guard
@pytest.mark.parametrize("where", ["model", "contains model", "inside model", "calib file", "contains calib",
                                   "contains recipe", "cwd", "contains cwd", "home"])
def test_overwrite_refuses_every_input_overlapping_out(world, tmp_path: Path, monkeypatch,
                                                       where: str) -> None:
    import shutil

    area = tmp_path / "area"
    model = area / "models" / "base"
    shutil.copytree(world["base"], model)
    calib = area / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text(world["calib"].read_text())
    recipe = area / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"ratio": 0.25}))
    work = area / "work"
    work.mkdir()
    (work / "minillm.json").write_text("{}")  # an "export" that is also the working directory
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(area / "models"))
    out = {"model": model, "contains model": model.parent, "inside model": model / "pruned",
           "calib file": calib, "contains calib": calib.parent, "contains recipe": recipe.parent,
           "cwd": Path("."), "contains cwd": area, "home": area / "models"}[where]
    before = _tree(area)
    result = runner.invoke(app, ["prune", "--model", str(model), "--calib", str(calib), "--recipe",
                                 str(recipe), *TINY, "--out", str(out), "--overwrite", "--force"])
    line = _one_line_failure(result, "--out")
    assert "input" in line or "directory" in line
    assert _tree(area) == before  # inputs byte-identical, nothing added


def test_overwrite_replaces_only_exports_unless_forced(world, tmp_path: Path) -> None:
    base = ["prune", "--model", str(world["base"]), "--calib", str(world["calib"]), "--ratio", "0.25", *TINY]
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.csv").write_text("not an export")
    result = runner.invoke(app, [*base, "--out", str(out), "--overwrite"])
    _one_line_failure(result, "--force", "not a minillm export")
    assert [p.name for p in out.iterdir()] == ["data.csv"]
    result = runner.invoke(app, [*base, "--out", str(out), "--overwrite", "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "data.csv").exists() and (out / "minillm.json").is_file()
    result = runner.invoke(app, [*base, "--out", str(out), "--overwrite"])  # an export: replaced
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------- 4. push and the token
class _Rejecting(http.server.BaseHTTPRequestHandler):
    """A Hub that answers every request with 401 and remembers the Authorization headers it saw."""

    seen: ClassVar[list[str]] = []

    def _answer(self) -> None:
        _Rejecting.seen.append(self.headers.get("Authorization", ""))
        header = self.headers.get("Authorization")
        body = json.dumps({"error": f"Invalid credentials in Authorization header {header}"})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


def _minillm(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    code = "from minillm.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_failing_push_never_shows_the_token(world, tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Rejecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        folder = str(world["trapped"])
        runs = {
            "bad token": ({"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, ["--token", TOKEN]),
            "bad token, env": ({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN}, []),
            "bad token -v": ({"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, ["--token", TOKEN]),
            "no server": ({"HF_ENDPOINT": "http://127.0.0.1:9"}, ["--token", TOKEN]),
            "offline": ({"HF_HUB_OFFLINE": "1"}, ["--token", TOKEN]),
        }
        for name, (env, extra) in runs.items():
            verbose = ["-v"] if name.endswith("-v") else []
            run = _minillm([*verbose, "push", folder, "--repo", "me/pruned", *extra], env, tmp_path)
            output = run.stdout + run.stderr
            assert run.returncode != 0, (name, output)
            assert TOKEN not in output and TOKEN[3:20] not in output, (name, output)
            if not verbose:  # -v shows the traceback, still without the token
                assert "Traceback" not in output, (name, output)
                assert len([line for line in output.splitlines() if line.strip()]) == 1, (name, output)
    finally:
        server.shutdown()
    assert any(TOKEN in header for header in _Rejecting.seen)  # the token really travelled
    for path in [*tmp_path.rglob("*"), *world["trapped"].rglob("*")]:  # and no file kept it
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_uploads_regular_files_only(world, tmp_path: Path) -> None:
    import shutil

    from minillm.hub import build_upload

    folder = tmp_path / "export"
    shutil.copytree(world["trapped"], folder)
    secret = tmp_path / "secrets"
    secret.mkdir()
    (secret / "token").write_text(TOKEN)
    (folder / "token").symlink_to(secret / "token")
    (folder / "ssh").symlink_to(secret, target_is_directory=True)
    (folder / ".env").write_text(f"HF_TOKEN={TOKEN}")
    upload = build_upload(folder, "me/pruned")
    names = [name for name, _ in upload.files]
    assert "token" not in names and not any(n.startswith(("ssh", ".")) for n in names)
    assert "config.json" in names and "model.safetensors" in names
    assert set(upload.skipped) == {"token", "ssh/", ".env"}
    for op in upload.operations:
        if isinstance(op.path_or_fileobj, str):
            assert Path(op.path_or_fileobj).resolve().is_relative_to(folder.resolve())
            assert TOKEN.encode() not in Path(op.path_or_fileobj).read_bytes()
    result = runner.invoke(app, ["push", str(folder), "--repo", "me/pruned", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "skipped (symbolic link or hidden, never uploaded): token" in result.output
    assert TOKEN not in result.output


# ---------------------------------------------------------------------------- 5. leaked temp exports
def test_sigkilled_export_temp_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    from minillm.output_guard import atomic_output_dir

    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from minillm.output_guard import atomic_output_dir\n"
        "with atomic_output_dir(sys.argv[1], False) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 100000)\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True,
                             env=env)
    tmp = Path(child.stdout.readline().strip())
    assert tmp.is_dir() and tmp.parent == tmp_path
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert tmp.is_dir()  # SIGKILL leaves it: no handler can run
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a temp folder of a process that is still alive is another run's: left alone
        live = tmp_path / f".out.tmp-minillm-{sleeper.pid}-abc"
        live.mkdir()
        with atomic_output_dir(out, False) as fresh:
            (fresh / "minillm.json").write_text("{}")
        assert not tmp.exists() and live.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sigterm_during_export_removes_the_temp_folder_at_once(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from minillm.output_guard import atomic_output_dir\n"
        "with atomic_output_dir(sys.argv[1], False) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE,
                             text=True, env=env)
    tmp = Path(child.stdout.readline().strip())
    assert tmp.is_dir()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_failing_final_rename_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import errno

    from minillm.output_guard import atomic_output_dir

    real_rename = Path.rename

    def busy(self: Path, target):  # what renaming onto a mount point answers
        if ".tmp-minillm-" in self.name:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", busy)
    with pytest.raises(UsageError, match="cannot move the export"):
        with atomic_output_dir(tmp_path / "out", False) as tmp:
            (tmp / "a").write_text("x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_exports_get_the_umask_permissions(tmp_path: Path, umask: int) -> None:
    from minillm.output_guard import atomic_output_dir

    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out", False) as tmp:
            (tmp / "a").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


# --------------------------------------------------------------- 6. bad inputs: one line, nothing written
def _bad_inputs(w: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name → (arguments, a word the error line must contain)."""
    base, calib = str(w["base"]), str(w["calib"])
    prune = ["prune", "--model", base, "--calib", calib, "--calib-samples", "4", "--seq-len", "16",
             "--spsa-steps", "1", "--out", str(tmp / "out")]
    binary = tmp / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    malformed = tmp / "bad.jsonl"
    malformed.write_text('{"text": "w1 w2"\n{not json\n')
    empty_folder = tmp / "no-model"
    empty_folder.mkdir()
    (empty_folder / "README.md").write_text("# nothing here")
    corrupt_config = tmp / "corrupt-config"
    corrupt_config.mkdir()
    (corrupt_config / "config.json").write_text('{"model_type": "llama", ')
    truncated = tmp / "truncated"
    import shutil

    shutil.copytree(w["base"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    gguf = tmp / "garbage.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(200))
    corrupt_export = tmp / "corrupt-export"
    shutil.copytree(w["base"], corrupt_export)
    (corrupt_export / "minillm.json").write_text("{oops")
    existing = tmp / "existing.json"
    existing.write_text("{}")
    report = tmp / "report.html"
    report.write_text("old report")
    recipe = tmp / "options.yaml"
    recipe.write_text(yaml.safe_dump({"criterion_options": {"no_such_option": 1}}))
    ev = ["eval", base, "--ppl", calib, "--seq-len", "16"]
    return {
        "device map cuda:7": ([*prune, "--device-map", "cuda:7"], "--device-map"),
        "max memory lots": ([*prune, "--max-memory", "cpu=lots"], "--max-memory"),
        "max memory gpu 7": ([*prune, "--max-memory", "7=1GiB"], "--max-memory"),
        "max memory no =": ([*prune, "--max-memory", "cpu"], "--max-memory"),
        "max shard size banana": ([*prune, "--max-shard-size", "banana"], "--max-shard-size"),
        "huge seed": ([*prune, "--seed", str(2**70)], "--seed"),
        "negative seed": ([*prune, "--seed", "-1"], "--seed"),
        "binary calibration": ([*prune[:3], "--calib", str(binary), *prune[5:]], "text"),
        "malformed jsonl": ([*prune[:3], "--calib", str(malformed), *prune[5:]], "bad.jsonl"),
        "folder with no model": (["prune", "--model", str(empty_folder), *prune[3:]], "no-model"),
        "corrupt config.json": (["prune", "--model", str(corrupt_config), *prune[3:]], "config.json"),
        "truncated safetensors": (["prune", "--model", str(truncated), *prune[3:]], "safetensors"),
        "garbage gguf": (["prune", "--model", str(gguf), *prune[3:]], "error"),
        "seq len beyond positions": ([*prune[:7], "--seq-len", "512", *prune[9:]], "positions"),
        # found after scoring: -q keeps the scoring's progress lines out, so only the error line remains
        # bias folding adds a bias per closing projection: at a tiny ratio the export would be larger
        "ratio that would grow the model": ([*prune, "--ratio", "0.0001", "--criterion", "flap",
                                             "--compensation", "bias", "-q"],
                                            "shrink"),
        "unknown criterion option": ([*prune, "--recipe", str(recipe)], "no_such_option"),
        "dry run with report": ([*prune, "--dry-run", "--report", str(tmp / "r.html")], "--dry-run"),
        "report exists": ([*prune, "--report", str(report)], "--report"),
        "compare report exists": (["compare", "--model", base, "--methods", "magnitude", "--calib", calib,
                                   "--out", str(tmp / "cmp"), "--report", str(report)], "--report"),
        "inspect corrupt minillm.json": (["inspect", str(corrupt_export)], "minillm.json"),
        "inspect no model": (["inspect", str(empty_folder)], "no-model"),
        "push corrupt minillm.json": (["push", str(corrupt_export), "--repo", "me/x", "--dry-run"],
                                      "minillm.json"),
        "eval seq len 0": ([*ev[:-1], "0"], "--seq-len"),
        "eval json into missing folder": ([*ev, "--json", str(tmp / "missing" / "r.json")], "does not exist"),
        "eval json exists": ([*ev, "--json", str(existing)], "--overwrite"),
        "eval cuda:7": ([*ev, "--device-map", "cuda:7"], "--device-map"),
        "eval binary ppl": (["eval", base, "--ppl", str(binary), "--seq-len", "16"], "text"),
        "bench cuda:7": (["bench", base, "--device", "cuda:7"], "--device"),
        "recover shard size": (["recover", base, "--data", calib, "--out", str(tmp / "r"), "--max-shard-size",
                                "banana"], "--max-shard-size"),
    }


BAD = ["device map cuda:7", "max memory lots", "max memory gpu 7", "max memory no =", "max shard size banana",
       "huge seed", "negative seed", "binary calibration", "malformed jsonl", "folder with no model",
       "corrupt config.json", "truncated safetensors", "garbage gguf", "seq len beyond positions",
       "ratio that would grow the model", "unknown criterion option", "dry run with report", "report exists",
       "compare report exists",
       "inspect corrupt minillm.json", "inspect no model", "push corrupt minillm.json", "eval seq len 0",
       "eval json into missing folder", "eval json exists", "eval cuda:7", "eval binary ppl", "bench cuda:7",
       "recover shard size"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path: Path, case: str) -> None:
    import torch

    if "cuda:7" in case or "gpu 7" in case:
        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    args, needle = _bad_inputs(world, tmp_path)[case]
    before, shared = _tree(tmp_path), _tree(world["root"])
    result = runner.invoke(app, args)
    _one_line_failure(result, needle)
    assert _tree(tmp_path) == before and _tree(world["root"]) == shared


def test_hub_id_while_offline_is_one_line(tmp_path: Path) -> None:
    run = _minillm(["inspect", "nonexistent-org/no-such-model"], {"HF_HUB_OFFLINE": "1"}, tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "Traceback" not in output
    assert len([line for line in output.splitlines() if line.strip()]) == 1, output
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_one_line_and_leaves_no_temp_folder(world, tmp_path: Path, monkeypatch) -> None:
    import errno

    from transformers import PreTrainedModel

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    result = runner.invoke(app, ["prune", "--model", str(world["base"]), "--calib", str(world["calib"]),
                                 "--ratio", "0.25", *TINY, "-q", "--out", str(tmp_path / "out")])
    _one_line_failure(result, "no space left")
    assert list(tmp_path.iterdir()) == []


def test_verbose_shows_the_traceback(world, tmp_path: Path) -> None:
    empty = tmp_path / "m"
    empty.mkdir()
    (empty / "config.json").write_text("[1, 2")
    quiet = runner.invoke(app, ["inspect", str(empty)])
    assert quiet.exit_code == 2 and "Traceback" not in quiet.output
    loud = runner.invoke(app, ["-v", "eval", str(world["base"]), "--ppl", str(tmp_path / "nope.bin"),
                               "--seq-len", "16"])
    assert loud.exit_code != 0 and loud.exception is not None  # raised, for typer to print
    from minillm.error_boundary import show_tracebacks

    show_tracebacks(False)


def test_typer_apps_never_show_locals() -> None:
    from minillm.cli import app as main_app

    assert main_app.pretty_exceptions_show_locals is False
    for group in main_app.registered_groups:
        assert group.typer_instance.pretty_exceptions_show_locals is False


# ------------------------------------------------------------------------- 7. silently wrong results
def test_dry_run_counts_equal_the_export(world, tmp_path: Path) -> None:
    from minillm.api import count_parameters, prune
    from minillm.calibration.data import CalibrationSet

    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    settings = dict(ratio=0.2, criterion="flap", calib=calibration, device_map=None)
    dry = prune(str(world["base"]), dry_run=True, **settings)
    real = prune(str(world["base"]), out=tmp_path / "out", **settings)
    assert dry.plan.params_after == real.plan.params_after == count_parameters(real.model)


def test_unknown_or_misdirected_criterion_options_are_refused(world) -> None:
    from minillm.api import prune
    from minillm.calibration.data import CalibrationSet

    calib = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    with pytest.raises(UsageError, match=r"unknown criterion option.* chekpoint .*takes: checkpoint"):
        prune(str(world["base"]), calib=calib, criterion="taylor-gate",
              criterion_options={"chekpoint": False}, dry_run=True, device_map=None)
    with pytest.raises(UsageError, match="'fms' takes no criterion options"):
        prune(str(world["base"]), calib=calib, criterion="fms", criterion_options={"checkpoint": False},
              dry_run=True, device_map=None)


# ----------------------------------------------------------------------------- minillm cnn's CIFAR reader
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_reader_refuses_pickled_code(tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    from minillm.vision.data import load_cifar10

    monkeypatch.chdir(tmp_path)
    good = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1, 2], b"filenames": [b"a", b"b"]}
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (tmp_path / name).write_bytes(pickle.dumps(good, protocol=2))
    (tmp_path / "test_batch").write_bytes(pickle.dumps(good, protocol=4))
    assert load_cifar10(tmp_path).train_x.shape[0] == 10  # real batches still load
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match=r"posix.system|os.system|nt.system"):
        load_cifar10(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_ratio_that_empties_a_layer_is_refused_before_scoring(world, monkeypatch) -> None:
    import minillm.api
    from minillm.api import prune
    from minillm.calibration.data import CalibrationSet

    def never(*args, **kwargs):
        raise AssertionError("scored although the plan could be refused from the shapes")

    monkeypatch.setattr(minillm.api, "score_model", never)
    with pytest.raises(UsageError, match="empty a layer"):
        prune(str(world["base"]), ratio=0.9, calib=CalibrationSet(random_ids(4, 16, seed=1), batch_size=2),
              dry_run=True, device_map=None)


def test_json_may_join_an_export_but_never_replace_its_files(world) -> None:
    from minillm.output_guard import check_output_file

    folder = world["base"]
    check_output_file(folder / "minillm_eval.json", False, "--json", inputs=(folder,))  # a new file: fine
    with pytest.raises(UsageError, match="would replace"):
        check_output_file(folder / "config.json", True, "--json", inputs=(folder,))
    with pytest.raises(UsageError, match="would replace"):
        check_output_file(world["calib"], True, "--json", inputs=(world["calib"],))


def test_error_line_keeps_brackets_and_masks_secrets(monkeypatch) -> None:
    import typer

    from minillm.error_boundary import error_boundary

    @error_boundary
    def broken() -> None:
        raise RuntimeError(f"[/bold] [model] failed with Authorization: Bearer {TOKEN}\nsecond line")

    app_ = typer.Typer()
    app_.command()(broken)
    result = runner.invoke(app_, [])
    line = _one_line_failure(result, "[/bold] [model] failed", "Bearer ***")
    assert TOKEN not in line and result.exit_code == 1
