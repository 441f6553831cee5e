"""Hugging Face hub ids (`--model ORG/NAME`), resolved to a snapshot directory in huggingface_hub's cache.

Resolution is huggingface_hub's own (`snapshot_download`), so its cache layout, `HF_HOME` / `HF_HUB_CACHE`,
`HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` behave as they do for vLLM and transformers: where the network
allows, the files the loader reads are downloaded into the cache (or `--download-dir`); offline, the cache's
snapshot is served as it is. Only what the loader reads is fetched: never a repository's PyTorch `.bin` copies,
a consolidated copy beside the indexed shards, or its subfolders.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (
    HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

# configs, the safetensors index, tokenizer, vocabulary, merges, chat template; top-level only (SUBFOLDERS)
TOKENIZER_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
REMOTE_CODE_FILES = ["*.py"]  # a tokenizer's own code, fetched only when trust_remote_code allows running it
SUBFOLDERS = ["*/*"]  # original/, onnx/, ...: other formats' copies, which the loader never reads


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


def hub_checkpoint(repo_id: str, revision: str | None, cache_dir: str | Path | None, remote_code: bool) -> Path:
    """The snapshot holding what the loader reads: configs and tokenizer, then the shards the safetensors index
    names (a repository may hold a consolidated copy beside them), or the top-level *.safetensors without one."""
    snapshot = hub_tokenizer(repo_id, revision, cache_dir, remote_code)
    index = snapshot / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["*.safetensors"]
    return hub_snapshot(repo_id, snapshot.name, cache_dir, shards)  # the snapshot's name is its commit


def hub_tokenizer(repo_id: str, revision: str | None, cache_dir: str | Path | None, remote_code: bool) -> Path:
    """The snapshot holding the tokenizer's files (and its code, where `remote_code` allows running it)."""
    return hub_snapshot(repo_id, revision, cache_dir, TOKENIZER_FILES + (REMOTE_CODE_FILES if remote_code else []))


def hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, patterns: list[str]) -> Path:
    """The local snapshot of `repo_id` at `revision` (a branch, tag or commit; default main) holding `patterns`,
    downloaded into `cache_dir` (default: huggingface_hub's cache) when the network allows."""
    cache = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE)
    at = repo_id + (f" (revision {revision})" if revision else "")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                      allow_patterns=patterns, ignore_patterns=SUBFOLDERS))
    except RevisionNotFoundError:
        raise HubError(f"{at}: the hub has no such revision of this model") from None
    except RepositoryNotFoundError:
        raise HubError(f"{at}: no such model on the hub, or it is private or gated (log in with `hf auth login` "
                       "or set HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:  # the cache cannot answer, and the hub was not asked or not reached
        cached = any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir, revision), str)
                     for name in ("config.json", "tokenizer_config.json"))
        what = f"its snapshot in the cache ({cache}) lacks files" if cached else f"not found in the cache ({cache})"
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if isinstance(e.__cause__, OfflineModeIsEnabled)
               else f"the hub cannot be reached ({type(e.__cause__).__name__})")
        raise HubError(f"{at}: {what}, and {why}; download it where the network allows (hf download {repo_id}), "
                       "or give a checkpoint directory") from None
