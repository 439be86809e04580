"""Which runs a command names and what identifies them: method specs, seeds, code versions.

:func:`expand_methods` turns ``--methods`` into specs, :func:`check_methods` builds each one so
that a bad spec fails before any work, :func:`derive_seed` gives every run its seed and
:func:`code_version` hashes the source that decides a method's outputs (part of every cache key).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import hashlib
import logging
import re
import sys
from pathlib import Path

from benchmark.config import ConfigError, RunConfig
from methods import create_method, list_methods
from methods.base import Method, parse_spec, split_top_level

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: Version of what the runner stores per stage (maps dtype and range, stage files); bump it when
#: that changes, so that old caches are not reused.
STAGE_FORMAT = 1


def expand_methods(specs: list[str]) -> list[str]:
    """Expand ``all``, names, globs and ``name[k=v]`` specs to a de-duplicated list."""
    out: list[str] = []
    known = list_methods()
    for spec in specs:
        for part in split_top_level(spec):
            if part == "all":
                matched = known
            elif "[" in part:
                try:
                    name, _ = parse_spec(part)
                except Exception as exc:  # noqa: BLE001 - a ValueError or a YAML error
                    raise ConfigError(f"--methods: {exc}".splitlines()[0]) from None
                if name not in known:
                    raise ConfigError(
                        f"--methods: unknown method {name!r}; valid: {', '.join(known)}"
                    )
                matched = [part]
            elif any(ch in part for ch in "*?"):
                matched = fnmatch.filter(known, part)
                if not matched:
                    raise ConfigError(f"--methods: {part!r} matches no method of {known}")
            elif part in known:
                matched = [part]
            else:
                raise ConfigError(f"--methods: unknown method {part!r}; valid: {', '.join(known)}")
            out.extend(m for m in matched if m not in out)
    return out


def check_methods(specs: list[str], preset: str) -> list[str]:
    """Expand method specs and build each one's config, so that a bad spec fails before any work.

    Raises:
        ConfigError: an unknown method or parameter, a value of the wrong type or an
            unparsable spec (one line naming ``--methods``).
    """
    import yaml

    from methods.common.weights import PretrainedWeightsError, check_offline

    expanded = expand_methods(specs)
    for spec in expanded:
        try:
            method = create_method(spec, preset=preset)
            for arch, source in method.weight_sources().items():
                check_offline(arch, source)
        except (ValueError, TypeError, KeyError, yaml.YAMLError, PretrainedWeightsError) as exc:
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ConfigError(f"--methods: {spec!r}: {text}".splitlines()[0]) from None
    return expanded


def derive_seed(base: int, dataset: str, method: str, repetition: int) -> int:
    """A per-run seed from (base seed, dataset, method, repetition)."""
    text = f"{base}|{dataset}|{method}|{repetition}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % (2**31 - 1)


@functools.cache
def code_version(method_cls: type[Method]) -> str:
    """Hash of the source that determines a method's outputs, plus :data:`STAGE_FORMAT`.

    Covered: the method's module and every ``methods.*`` module it imports (``cam_affinitynet``
    builds on ``cam``), ``methods/common``, ``methods/base.py`` and ``methods/specs.py``. Not
    covered, on purpose: the runner, the evaluator, reports and the dataset loaders, so that
    editing them does not throw away hours of cached training. The data a method sees is keyed
    separately (dataset fingerprint, split hash, image size); a runner change that alters what a
    stage stores must bump :data:`STAGE_FORMAT`.

    Computed once per process (cached): the hash describes the code this process imported, so
    editing ``methods/`` while a long run goes on does not give its later runs keys of code
    they are not running. Each file counts by its code only (:func:`code_text`): editing a
    docstring, a comment or the layout (a module's Deviations, say) keeps every cached stage.
    """
    files = _method_sources(Path(sys.modules[method_cls.__module__].__file__ or ""))
    files.extend(sorted((REPO / "methods" / "common").glob("*.py")))
    files.extend(REPO / "methods" / name for name in ("base.py", "specs.py"))
    h = hashlib.sha256(f"stage-format-{STAGE_FORMAT}".encode())
    for f in files:
        if f.is_file():
            h.update(code_text(f.read_text(encoding="utf-8")))
    return h.hexdigest()[:12]


def code_text(source: str) -> bytes:
    """A Python source's code without docstrings, comments or layout: its syntax tree, dumped.

    Two sources that differ only there give the same bytes; any change to what runs (a value, a
    name, an expression) gives other bytes. The dump's format follows the Python minor version,
    so cache keys do too.
    """
    tree = ast.parse(source)
    for node in ast.walk(tree):
        documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        if isinstance(node, documented) and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def _method_sources(module: Path) -> list[Path]:
    """``module`` and the method modules it imports (``from methods.cam import ...``), sorted."""
    seen, todo = set(), [module]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for name in _METHOD_IMPORT.findall(path.read_text(encoding="utf-8")):
            if name not in ("base", "common"):
                todo.append(REPO / "methods" / f"{name}.py")
    return sorted(seen)


_METHOD_IMPORT = re.compile(r"^\s*(?:from|import)\s+methods\.(\w+)", re.MULTILINE)


def regime_suffix(cfg: RunConfig) -> str:
    """`` [max_epochs=1, amp, threshold=0.3]``: the run options that change a method's numbers.

    ``threshold_on=train_gt`` (the literature's protocol) adds ``tuned on train GT``.

    Empty for a plain run. A smoke run capped by ``--max-epochs``, a bf16 ``--amp`` run or a run
    at a fixed ``--threshold`` is therefore a different entry in every table, never averaged
    with (or superseding) the full run of the same method.
    """
    parts = []
    if cfg.max_epochs is not None:
        parts.append(f"max_epochs={cfg.max_epochs}")
    if cfg.amp:
        parts.append("amp")
    if cfg.threshold is not None:
        parts.append(f"threshold={cfg.threshold}")
    elif cfg.threshold_on == "train_gt":
        parts.append("tuned on train GT")
    return f" [{', '.join(parts)}]" if parts else ""


def run_label(method: Method, cfg: RunConfig) -> str:
    """The ``method_id`` of a run's rows: the method's identity and the run's regime."""
    return method.identity() + regime_suffix(cfg)
