"""Hugging Face hub ids (`--model ORG/NAME`), resolved to a snapshot directory in huggingface_hub's cache.

Resolution is huggingface_hub's own (`snapshot_download`), so its cache layout, `HF_HOME` / `HF_HUB_CACHE`,
`HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` behave as they do for vLLM and transformers: where the network
allows, the files the loader reads are downloaded into the cache (or `--download-dir`); offline, the cache's
snapshot is served as it is. Only what serving reads is fetched, never a repository's PyTorch `.bin` copies.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (
    HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError, OfflineModeIsEnabled,
    RepositoryNotFoundError, RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

TOKENIZER_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]  # tokenizer, vocab, merges, chat template
CHECKPOINT_FILES = [*TOKENIZER_FILES, "*.safetensors"]  # config, generation_config and the safetensors index are json
REMOTE_CODE_FILES = ["*.py"]  # a tokenizer's own code, fetched only when trust_remote_code allows running it


class HubError(ValueError):
    """A hub id that cannot be served, with the reason and what to do about it."""


def is_hub_id(name: str | None) -> bool:
    """ORG/NAME naming no local path: a hub repository, as vLLM reads `--model`. A bare NAME stays a local path,
    so a mistyped directory is reported as missing rather than looked up on the hub."""
    if not name or name.count("/") != 1 or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, patterns: list[str]) -> Path:
    """The local snapshot of `repo_id` at `revision` (a branch, tag or commit; default main) holding `patterns`,
    downloaded into `cache_dir` (default: huggingface_hub's cache) when the network allows."""
    cache = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE)
    at = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                      allow_patterns=patterns))
    except RevisionNotFoundError:
        raise HubError(f"{at}: the hub has no such revision of this model") from None
    except RepositoryNotFoundError:
        raise HubError(f"{at}: no such model on the hub, or it is private or gated (log in with `hf auth login` "
                       "or set HF_TOKEN)") from None
    except IncompleteSnapshotError:
        raise HubError(f"{at}: its snapshot in the cache ({cache}) is missing files, and the hub cannot be "
                       "reached to complete it") from None
    except LocalEntryNotFoundError as e:
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if isinstance(e.__cause__, OfflineModeIsEnabled)
               else f"the hub cannot be reached ({type(e.__cause__).__name__})")
        raise HubError(f"{at}: not found in the cache ({cache}), and {why}; download it where the network "
                       f"allows (hf download {repo_id}), or give a checkpoint directory") from None
