"""Hub references, resolved to local paths in the Hugging Face cache.

Every model, data set and scorer checkpoint an SD world names (lpo.sd.config.SDWorldConfig) is one of:
- a hub reference, `org/name` or `org/name/path/in/repo` (e.g. `casiatao/LRM/lrm_sd15`,
  `xswu/HPSv2/HPS_v2_compressed.pt`); it is resolved in the local Hugging Face cache only (HF_HUB_CACHE, else
  HF_HOME/hub), never downloaded: these stages run on machines without hub access;
- anything that exists on disk, or starts with `/`, `.` or `~`, is a local path used as it is.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_REF = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^/].*)?$")


def hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_parts(ref: str) -> tuple[str, str] | None:
    """(repo id, path inside the repo) of a hub reference; None for a local path."""
    if ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists() or not _HUB_REF.match(ref):
        return None
    org, name, *rest = ref.split("/")
    return f"{org}/{name}", "/".join(rest)


def download_hint(ref: str, repo_type: str = "model") -> str:
    parts = hub_parts(ref)
    if parts is None:
        return ""
    repo, inner = parts
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    only = f" --include '{inner}/*'" if inner and "." not in Path(inner).name else (f" {inner}" if inner else "")
    return f"`hf download {repo}{kind}{only}`"


def locate(ref: str, key: str, what: str, repo_type: str = "model") -> tuple[Path | None, str | None]:
    """(local path, None) or (None, why it is not available), resolving hub references in the local cache only."""
    parts = hub_parts(ref)
    if parts is None:
        path = Path(ref).expanduser()
        return (path, None) if path.exists() else (None, f"{key}: {what} not found at '{path}'")
    repo, inner = parts
    from huggingface_hub import snapshot_download
    try:
        snapshot = Path(snapshot_download(repo, repo_type=repo_type, cache_dir=hub_cache(), local_files_only=True))
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError
        return None, (f"{key}: {what} '{ref}' is not in the local Hugging Face cache ({hub_cache()}): download it "
                      f"with {download_hint(ref, repo_type)} where the hub is reachable, or set {key} to a local "
                      f"path")
    path = snapshot / inner if inner else snapshot
    if not path.exists():
        return None, (f"{key}: {what} '{ref}': the cached snapshot of {repo} ({snapshot}) lacks '{inner}': "
                      f"download it with {download_hint(ref, repo_type)}, or set {key} to a local path")
    return path, None


def resolve(ref: str, key: str, what: str, repo_type: str = "model") -> Path:
    """The local path of `ref`, or FileNotFoundError naming the config key and what to download."""
    path, problem = locate(ref, key, what, repo_type)
    if problem:
        raise FileNotFoundError(problem)
    return path
