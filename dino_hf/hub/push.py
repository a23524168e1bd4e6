"""Pushing a trained DINO backbone to the Hugging Face Hub.

:func:`push_training_output` turns a run's output folder (:mod:`dino_hf.base.run_folder`) into one Hub
commit: the backbone files at the repository root (so ``AutoModel.from_pretrained("user/name")``
works), a ``README.md`` model card (:mod:`dino_hf.hub.model_card`), the training arguments (secrets
removed), the evaluation results, metrics and curves when they exist, and, with
``include_training_model=True``, the full ``DinoForPreTraining`` under ``training_model/`` so that
pre-training can continue from it.

Everything goes through ``huggingface_hub`` (``HfApi.create_repo(exist_ok=True)`` then one
``HfApi.create_commit``), so ``HF_ENDPOINT``, ``HF_TOKEN`` and the cached ``hf auth login`` token
are honoured. The token is never printed, logged, written into a pushed file or kept in an exception
message. This module does not import torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from dino_hf.base.errors import RunError
from dino_hf.base.run_folder import (
    RUN_RECORD_NAMES,
    SHARD_INDEX_NAME,
    TRAINING_ARGS_NAME,
    TrainingOutput,
    read_training_output,
    scrub_secrets,
    strip_secret_fields,
)
from dino_hf.hub.model_card import bare_backbone_dir, render_card

__all__ = [
    "HubPushError",
    "MissingTokenError",
    "check_push_target",
    "push_training_output",
    "resolve_token",
    "try_push_training_output",
]

logger = logging.getLogger(__name__)

LOGIN_HINT = (
    "No Hugging Face token found: run `hf auth login` or set the HF_TOKEN environment variable "
    "(a token with write access), then try again."
)
# Text files are read, scrubbed of secrets and uploaded from memory; the rest go from disk.
_TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".yaml", ".yml")


class HubPushError(RuntimeError):
    """A push that could not be done; the message names the repository and any HTTP status.

    Attributes:
        repo_id: the target repository.
        status_code: HTTP status returned by the Hub, None when the failure was not an HTTP answer.
    """

    def __init__(self, message: str, repo_id: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.status_code = status_code


class MissingTokenError(HubPushError):
    """No token was given and none is configured (``HF_TOKEN`` or ``hf auth login``)."""


def _file_contains(path: Path, needle: bytes, chunk_size: int = 1 << 24) -> bool:
    """Whether ``needle`` occurs in the file, read in chunks (with overlap) to bound memory."""
    overlap = b""
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            if needle in overlap + chunk:
                return True
            overlap = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token`` if given, else ``HF_TOKEN`` or the cached login.

    Raises:
        MissingTokenError: with :data:`LOGIN_HINT` when there is none.
    """
    resolved = token or get_token()
    if not resolved:
        raise MissingTokenError(LOGIN_HINT, repo_id="")
    return resolved


def _http_status(error: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and server message of the first HfHubHTTPError in an exception's cause chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, HfHubHTTPError) and current.response is not None:
            return current.response.status_code, current.server_message
        current = current.__cause__ or current.__context__
    return None, None


def _commit_operations(run: TrainingOutput, card: ModelCard, token: str) -> list[CommitOperationAdd]:
    """One upload per file; text files are scrubbed in memory; nothing carrying the token is pushed."""
    needle = token.encode()
    operations = [CommitOperationAdd("README.md", scrub_secrets(str(card), token).encode("utf-8"))]
    for path_in_repo, local_path in sorted(run.files.items()):
        if local_path.suffix in _TEXT_SUFFIXES:
            text = local_path.read_text(encoding="utf-8")
            if path_in_repo == TRAINING_ARGS_NAME:
                text = json.dumps(strip_secret_fields(json.loads(text), token), indent=2) + "\n"
            content = scrub_secrets(text, token).encode("utf-8")
            operations.append(CommitOperationAdd(path_in_repo, content))
        else:
            if _file_contains(local_path, needle):
                raise HubPushError(
                    f"Refusing to push {local_path}: it contains the Hugging Face token.",
                    repo_id="",
                )
            operations.append(CommitOperationAdd(path_in_repo, str(local_path)))
    return operations


def _stale_file_deletions(
    api: HfApi, repo_id: str, revision: str | None, pushed: set[str]
) -> list[CommitOperationDelete]:
    """Deletions of run files and root weights left in the repository by an earlier push.

    A re-push replaces the model card, so records it no longer describes (e.g. an old
    eval_results.json or the shards of a differently sharded backbone) must go too.
    ``training_model/`` is left alone.
    """
    try:
        remote = api.list_repo_files(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []
    managed = [
        path
        for path in remote
        if "/" not in path and (path in RUN_RECORD_NAMES or path.endswith(".safetensors") or path == SHARD_INDEX_NAME)
    ]
    return [CommitOperationDelete(path) for path in managed if path not in pushed]


def _default_commit_message(run: TrainingOutput) -> str:
    step = run.metrics[-1].get("step") if run.metrics else None
    return (
        f"Upload DINO backbone (step {step}) with dino_hf" if step is not None else "Upload DINO backbone with dino_hf"
    )


def push_training_output(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include_training_model: bool = False,
    license: str | None = None,
    backbone_dir: str | Path | None = None,
) -> str:
    """Push a training output directory to the Hub as a plain ``transformers`` model of the backbone's own class; return the commit URL.

    Creates the repository if needed (``exist_ok=True``; ``private`` only applies to a new
    repository) and the branch ``revision`` if it does not exist, then makes a single commit with
    the backbone (config.json, model.safetensors, preprocessor_config.json) at the root, README.md,
    training_args.json (secrets removed), and eval_results.json, metrics.jsonl and
    training_curves.png when they exist; with ``include_training_model``, also the full
    DinoForPreTraining under ``training_model/``.

    Args:
        model_dir: training output directory, or an exported backbone folder (of any family).
        repo_id: ``user/name`` (a bare ``name`` is put under the token's account).
        private: create a new repository as private.
        revision: branch to commit to (default ``main``); created from ``main`` when missing.
        commit_message: default "Upload DINO backbone (step N) with dino_hf".
        token: a Hub token; default ``HF_TOKEN`` or the cached ``hf auth login``.
        include_training_model: also push ``model_dir/config.json`` + ``model.safetensors``.
        license: license id for the card metadata (see :func:`render_model_card`).
        backbone_dir: the backbone folder to push instead of ``model_dir/backbone``.

    Raises:
        MissingTokenError: no token anywhere (message: how to log in).
        HubPushError: the Hub refused or the upload failed; the message names the repository and the
            HTTP status, and never contains the token.
        FileNotFoundError, ValueError: the directory does not hold a pushable backbone.
    """
    resolved_token = resolve_token(token)
    run = read_training_output(model_dir, include_training_model=include_training_model,
                               backbone_dir=backbone_dir or bare_backbone_dir(model_dir))
    api = HfApi(token=resolved_token)
    target = repo_id
    try:
        if "/" not in repo_id:
            target = f"{api.whoami()['name']}/{repo_id}"
        card = render_card(run, target, license=license)
        additions = _commit_operations(run, card, resolved_token)
        api.create_repo(target, repo_type="model", private=True if private else None, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(target, branch=revision, repo_type="model", exist_ok=True)
        deletions = _stale_file_deletions(api, target, revision, {operation.path_in_repo for operation in additions})
        logger.info(
            "Pushing %d files from %s to %s (%s)%s",
            len(additions),
            run.model_dir,
            target,
            revision or "main",
            f", removing {len(deletions)} stale files" if deletions else "",
        )
        info = api.create_commit(
            target,
            [*deletions, *additions],
            commit_message=commit_message or _default_commit_message(run),
            repo_type="model",
            revision=revision,
        )
    except HubPushError as error:
        raise HubPushError(scrub_secrets(str(error), resolved_token), repo_id=target) from None
    except (FileNotFoundError, NotADirectoryError):
        raise
    except Exception as error:  # noqa: BLE001 - any transport/Hub failure becomes one sentence
        status, server_message = _http_status(error)
        if status is not None:
            if not server_message and not isinstance(error, HfHubHTTPError):
                server_message = str(error)  # e.g. "Invalid metadata in README.md ..." (HTTP 400)
            detail = f": {server_message}" if server_message else ""
            message = f"Pushing to {target} failed: the Hub answered HTTP {status}{detail}."
        else:
            message = f"Pushing to {target} failed: {type(error).__name__}: {error}"
        raise HubPushError(scrub_secrets(message, resolved_token), repo_id=target, status_code=status) from None
    logger.info("Pushed %s: %s", target, info.commit_url)
    return info.commit_url


def check_push_target(repo_id: str | None, token: str | None = None) -> None:
    """Check, before training, that ``--push_to_hub`` can push to ``repo_id`` at the end.

    Offline checks first (a token exists, the id is well formed, the Hub is not disabled by
    ``HF_HUB_OFFLINE``), then one ``whoami`` call: a token the Hub rejects is refused; a Hub that
    cannot be reached now only warns (it may be back by the end of training).

    Raises:
        RunError: one sentence naming the flag or the variable to change.
    """
    try:
        resolved_token = resolve_token(token)
    except MissingTokenError:
        raise RunError(
            "--push_to_hub needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN, or drop "
            "--push_to_hub."
        ) from None
    try:
        validate_repo_id(str(repo_id))
    except HFValidationError as error:
        raise RunError(
            f"--hub_model_id {repo_id!r} is not a valid Hub repository id ({str(error).split(':')[0]}): pass user/name."
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise RunError("--push_to_hub cannot push while HF_HUB_OFFLINE is set: unset it or drop --push_to_hub.")
    try:
        HfApi(token=resolved_token).whoami()
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise RunError(
                f"--push_to_hub: the Hub rejected the Hugging Face token (HTTP {status}): log in again with `hf auth "
                "login` or set HF_TOKEN to a valid token with write access."
            ) from None
        logger.warning("Could not check the Hugging Face token now (HTTP %s); the push at the end may fail.", status)
    except Exception as error:  # noqa: BLE001 - an unreachable Hub now is not a reason to refuse training
        logger.warning("Could not reach the Hub to check the token (%s); the push at the end may fail.",
                       scrub_secrets(f"{type(error).__name__}: {error}", resolved_token))


def try_push_training_output(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include_training_model: bool = False,
    retried: bool = True,
) -> bool:
    """:func:`push_training_output` for the training loop: never raises; on failure, warns and returns False.

    Call it on the main process only. ``retried`` says whether a later push will follow (the next
    checkpoint's); the warning says so only then. Returns True when the commit was made.
    """
    try:
        push_training_output(
            model_dir,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            include_training_model=include_training_model,
        )
    except Exception as error:  # noqa: BLE001 - a failed push must never stop training
        logger.warning(
            "Push of %s to %s failed%s: %s",
            model_dir,
            repo_id,
            "; training continues and the next checkpoint's push tries again" if retried else "",
            scrub_secrets(str(error), token),
        )
        return False
    return True
