"""The stage contract's bookkeeping: output folder manifests, cache keys, content hashes, the code version."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

_PACKAGES = ("kiln", "stages", "data", "reward")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StageResult:
    stage: str
    out_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    content_hash: str = ""


def code_version() -> str:
    """Hash of the numerical and stage code: a change to any of it invalidates cached stage outputs."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def hash_files(folder: Path, pattern: str = "**/*") -> str:
    """Content hash of every file under folder except manifest.json."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob(pattern)):
        if path.is_file() and path.name != "manifest.json" and ".tmp" not in path.name:
            digest.update(path.relative_to(folder).as_posix().encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def cache_key(stage: str, stage_config: dict, input_hashes: dict[str, str]) -> str:
    payload = json.dumps({"stage": stage, "config": stage_config, "inputs": input_hashes, "code": code_version()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def read_stage_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_stage_manifest(out_dir: Path, **fields) -> Path:
    """Atomically write out_dir/manifest.json (stage, cache_key, config, inputs, content_hash, metrics, run id)."""
    path = Path(out_dir) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(fields, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path
