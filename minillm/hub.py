"""Publishing an export to the Hugging Face Hub: one repo, one commit, a generated model card.

``build_upload`` is pure (reads the folder, renders the card, lists the commit operations) so
``--dry-run`` and the tests see exactly what would be sent; ``push`` only adds the two network calls
(``create_repo`` and ``create_commit``), after checking the token with ``whoami`` so that a bad token
creates nothing.
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
    files = sorted(
        (p.relative_to(path).as_posix(), p.stat().st_size)
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    files = [(name, size) for name, size in files if name != "README.md"]
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path / name)) for name, _ in files
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    return Upload(repo=repo, folder=path, card=card, files=files, private=private, operations=operations)


def push(upload: Upload, token: str | None = None, api: Any = None) -> str:
    """Create the repo (if needed) and upload everything in one commit; returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise UsageError(f"no Hugging Face token found: {LOGIN_HINT}")
    api = api or HfApi(token=token)
    try:
        api.whoami()
    except HfHubHTTPError as exc:
        raise UsageError(
            f"the Hugging Face token was rejected ({exc.response.status_code}): {LOGIN_HINT}"
        ) from exc
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
            f"the Hub refused the upload to {upload.repo!r}: {str(exc).splitlines()[0]}"
        ) from exc
    return str(getattr(info, "commit_url", info))
