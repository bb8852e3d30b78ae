"""The stage contract's bookkeeping: output folder manifests, cache keys, content hashes, code fingerprints."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# The project's own packages: their modules are the code a cache key fingerprints (third-party code is not).
PROJECT_PACKAGES = ("kiln", "stages", "data", "reward")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StageResult:
    stage: str
    out_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    content_hash: str = ""


def module_source(module: str) -> Path | None:
    """The file of a project module (`a/b.py` or `a/b/__init__.py` under ROOT); None for anything else."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=None)  # keyed by the source itself: an edited file is parsed again
def _imported_names(module: str, source: bytes, is_package: bool) -> frozenset[str]:
    """Every module an import statement anywhere in source names (inside functions too): for `from a import b`,
    both `a` and `a.b`, since b may be a submodule (module_source drops the names that are not)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(_with_packages(names))


def _with_packages(modules) -> set[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    return {".".join(name.split(".")[:i]) for name in modules for i in range(1, name.count(".") + 2)}


def module_closure(module: str) -> list[Path]:
    """The project files module uses: its own and, transitively, every project module it imports."""
    files: dict[str, Path] = {}
    pending = list(_with_packages([module]))
    while pending:
        name = pending.pop()
        path = None if name in files else module_source(name)
        if path is None:
            continue
        files[name] = path
        pending += _imported_names(name, path.read_bytes(), path.name == "__init__.py")
    return sorted(set(files.values()))


def code_fingerprint(module: str) -> str:
    """Hash of the code a stage uses (module_closure of its module): an edit elsewhere leaves its outputs current."""
    digest = hashlib.sha256()
    for path in module_closure(module):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def hash_files(folder: Path, pattern: str = "**/*") -> str:
    """Content hash of every file under folder except manifest.json."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob(pattern)):
        if path.is_file() and path.name != "manifest.json" and ".tmp" not in path.name:
            digest.update(path.relative_to(folder).as_posix().encode())
            _update_with_file(digest, path)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    _update_with_file(digest, path)
    return digest.hexdigest()


def _update_with_file(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def cache_key(stage: str, stage_config: dict, input_hashes: dict[str, str], code: str) -> str:
    """stage: its kind; stage_config: the config sections it reads; input_hashes: its inputs' content hashes;
    code: the fingerprint of the code it uses (code_fingerprint)."""
    payload = json.dumps({"stage": stage, "config": stage_config, "inputs": input_hashes, "code": code},
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
