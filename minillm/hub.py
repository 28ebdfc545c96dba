"""Publishing an export to the Hugging Face Hub: one repo, one commit, a generated model card.

``build_upload`` is pure (reads the folder, renders the card, lists the commit operations) so
``--dry-run`` and the tests see exactly what would be sent; ``push`` only adds the two network calls
(``create_repo`` and ``create_commit``), after checking the token with ``whoami`` so that a bad token
creates nothing.

Only regular files under the folder are uploaded: symbolic links (a link to ``~/.cache/huggingface/token``
or an ssh key) and hidden files are skipped and listed as skipped. The token never appears in an
error: every failure of the network calls becomes one scrubbed line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.card import render_card
from minillm.errors import UsageError
from minillm.export import METADATA_FILE, read_metadata

#: ``minillm eval --json`` output picked up automatically when it sits in the export folder
EVAL_FILE = "minillm_eval.json"
LOGIN_HINT = "run `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN to a token with write access"


@dataclass
class Upload:
    """Everything one push sends: the commit operations (files + generated README.md) and the card."""

    repo: str
    folder: Path
    card: str
    files: list[tuple[str, int]]  # (path in repo, bytes) of the folder's files, README.md excluded
    private: bool = False
    skipped: list[str] = field(default_factory=list)  # symbolic links and hidden entries, not uploaded
    operations: list[Any] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return sorted([*(p for p, _ in self.files), "README.md"])


def license_from_card(folder: str | Path) -> str | None:
    """The ``license:`` of a local model folder's README.md front matter, if any."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a README without valid front matter
        return None
    return str(value) if value else None


def base_license(base: str | None, online: bool = False) -> str | None:
    """License of the base model: its local README front matter, or (``online``) its Hub card."""
    if not base:
        return None
    if Path(base).is_dir():
        return license_from_card(base)
    if Path(base).suffix == ".gguf":
        return license_from_card(Path(base).parent)
    if online and "/" in base:
        from huggingface_hub import model_info

        try:
            data = model_info(base).card_data
            value = data.to_dict().get("license") if data else None
            return str(value) if value else None
        except Exception:  # offline, private or renamed: the card just omits it
            return None
    return None


def _read_evaluation(folder: Path, evaluation: str | Path | dict | None) -> dict[str, Any] | None:
    if isinstance(evaluation, dict):
        return evaluation
    path = Path(evaluation) if evaluation else folder / EVAL_FILE
    if not path.is_file():
        if evaluation:
            raise UsageError(
                f"--eval {str(path)!r} does not exist; write it with `minillm eval … --json FILE`"
            )
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--eval {str(path)!r} is not JSON ({exc.msg}); use `minillm eval … --json` output"
        ) from exc


def build_upload(
    folder: str | Path,
    repo: str,
    *,
    private: bool = False,
    evaluation: str | Path | dict | None = None,
    license: str | None = None,
    online: bool = False,
) -> Upload:
    """The exact commit for ``folder`` → ``repo``; the model card is regenerated from ``minillm.json``."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(folder)
    if not path.is_dir():
        raise UsageError(
            f"{str(path)!r} is not a folder; push an export made by `minillm prune` or `minillm recover`"
        )
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise UsageError(f"{str(path)!r} has no config.json and *.safetensors weights; is it a model export?")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise UsageError(f"--repo {repo!r} is not a valid Hub repo id (user/name): {exc}") from exc
    metadata = read_metadata(path)
    if not metadata:
        raise UsageError(
            f"{str(path)!r} has no {METADATA_FILE}: push exports made by minillm (prune/recover)"
        )
    lic = license or metadata.get("license") or base_license(metadata.get("base_model"), online=online)
    card = render_card(
        {**metadata, "license": lic, "name": repo.split("/")[-1]}, _read_evaluation(path, evaluation)
    )
    files, skipped = regular_files(path)
    files = [(name, size) for name, size in files if name != "README.md"]
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path / name)) for name, _ in files
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    return Upload(repo=repo, folder=path, card=card, files=files, private=private, operations=operations,
                  skipped=skipped)


def regular_files(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``(relative path, bytes)`` of the regular files under ``folder`` (no symlinks followed, none
    taken, nothing hidden), and the relative paths that were skipped."""
    import os
    import stat

    root = folder.resolve()
    files: list[tuple[str, int]] = []
    skipped: list[str] = []
    for current, dirs, names in os.walk(root, followlinks=False):
        base = Path(current)
        for name in list(dirs):
            entry = base / name
            if name.startswith(".") or entry.is_symlink():
                skipped.append(entry.relative_to(root).as_posix() + "/")
                dirs.remove(name)
        for name in names:
            entry = base / name
            info = entry.lstat()
            relative = entry.relative_to(root).as_posix()
            if name.startswith(".") or not stat.S_ISREG(info.st_mode):
                skipped.append(relative)
            else:
                files.append((relative, info.st_size))
    return sorted(files), sorted(skipped)


def push(upload: Upload, token: str | None = None, api: Any = None) -> str:
    """Create the repo (if needed) and upload everything in one commit; returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from minillm.error_boundary import register_secret, scrub

    token = token or get_token()
    if not token:
        raise UsageError(f"no Hugging Face token found: {LOGIN_HINT}")
    register_secret(token)
    api = api or HfApi(token=token)
    try:
        api.whoami()
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise UsageError(f"the Hugging Face token was rejected ({status}): {LOGIN_HINT}") from None
    except Exception as exc:  # offline, DNS, TLS, proxy: never let the request (and its header) surface
        raise UsageError(
            f"cannot reach the Hugging Face Hub ({type(exc).__name__}: {scrub(_first_line(exc))}); "
            "check the network, HF_ENDPOINT and HF_HUB_OFFLINE"
        ) from None
    try:
        api.create_repo(upload.repo, private=upload.private, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id=upload.repo,
            operations=upload.operations,
            commit_message="Upload pruned model with minillm",
            repo_type="model",
        )
    except HfHubHTTPError as exc:
        raise UsageError(
            f"the Hub refused the upload to {upload.repo!r}: {scrub(_first_line(exc))}"
        ) from None
    except Exception as exc:
        raise UsageError(
            f"the upload to {upload.repo!r} failed ({type(exc).__name__}: {scrub(_first_line(exc))}); "
            "check the network and try again"
        ) from None
    return str(getattr(info, "commit_url", info))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
