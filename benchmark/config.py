"""The run configuration: CLI options and YAML keys share one definition and one validator.

A YAML file given with ``--config`` uses the option names as keys (``budget-minutes`` or
``budget_minutes``); options typed on the command line win over the file. Every invalid value
raises :class:`ConfigError` with one line naming the option, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

logger = logging.getLogger(__name__)

PRESET_IMAGE_SIZE = {"paper": 224, "quick": 128, "tiny": 64}
#: Longest value (its repr) echoed in an error message; longer ones are cut.
SHOW_LIMIT = 200
#: Largest ``--config`` file read (a run config is a few lines).
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """An invalid option or config key; the message names the option."""


def show(value: Any, limit: int = SHOW_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (with the full length).

    Args:
        value: any value a user gave.
        limit: the most characters kept.

    Returns:
        The (possibly shortened) repr.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class RunConfig:
    """Everything that defines a ``run``.

    Attributes:
        methods: method specs (``all``, names, globs, ``name[k=v,...]``).
        dataset: registered dataset name (``synthetic``, ``oxford_pet``).
        data_root: dataset folder (``None``: the synthetic data's own cache folder).
        preset: ``paper`` | ``quick`` | ``tiny``: method presets, image size, segmenter recipe.
        seeds: number of repetitions (seeds 0..n-1 derived from ``base_seed``).
        base_seed: the seed every per-run seed is derived from.
        split: split scheme (``official`` | ``weaktr_refinery``).
        val_fraction: share of the train part carved out for validation.
        budget_minutes: wall-clock cap per method run (``None``: no cap).
        max_epochs: optional epoch cap per training stage.
        segmenter_epochs: epochs of the shared segmenter (``None``: the preset's).
        segmenter_batch_size: batch size of the shared segmenter (``None``: the preset's).
        segmenter: segmenter architecture (``lraspp`` | ``unet``; ``None``: the preset's,
            ``unet`` on the offline ImageNet EfficientNet-Lite0 for ``quick``).
        gt_ratio: share of train images whose pseudo mask is replaced by its GT mask.
        threshold: a fixed threshold instead of the validation sweep (``None``: sweep).
        threshold_on: where the sweep picks the threshold: ``val`` (ours: the validation
            split) or ``train_gt`` (the literature's multi-class protocol, SEAM's ``--curve``:
            the background threshold that maximises pseudo-mask mIoU on the train GT, which is
            then scored on that same GT; flagged in every row and table).
        convention: trimap convention of the evaluation (``pet`` by default).
        image_size: working resolution (``None``: the preset's).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``.
        amp: bf16 autocast on CUDA.
        channels_last: convolutional networks in channels_last memory format.
        out: the output folder (cache, results, report).
        force: recompute every stage, ignoring the cache.
        report: write the report folder at the end.
    """

    methods: list[str] = field(default_factory=lambda: ["all"])
    dataset: str = "synthetic"
    data_root: str | None = None
    preset: str = "quick"
    seeds: int = 1
    base_seed: int = 0
    split: str = "official"
    val_fraction: float = 0.15
    budget_minutes: float | None = None
    max_epochs: int | None = None
    segmenter_epochs: int | None = None
    segmenter_batch_size: int | None = None
    segmenter: str | None = None
    gt_ratio: float = 0.0
    threshold: float | None = None
    threshold_on: str = "val"
    convention: str = "pet"
    image_size: int | None = None
    device: str = "auto"
    amp: bool = False
    channels_last: bool = True
    out: str = "runs/default"
    force: bool = False
    report: bool = True

    @property
    def size(self) -> int:
        """The working image resolution."""
        return self.image_size or PRESET_IMAGE_SIZE[self.preset]

    def validate(self) -> RunConfig:
        """Check every value; raise ConfigError naming the first bad option."""
        from datasets import CONVENTIONS, SPLIT_SCHEMES, list_datasets

        if isinstance(self.methods, str):
            self.methods = [self.methods]
        if not isinstance(self.methods, (list, tuple)) or not all(
            isinstance(m, str) for m in self.methods
        ):
            raise ConfigError(
                f"--methods: expected a list of method names, got {show(self.methods)}"
            )
        if not self.methods:
            raise ConfigError("--methods: empty list; give 'all' or method names")
        if not any(m.replace(",", " ").strip() for m in self.methods):
            raise ConfigError(
                f"--methods: no method named (got {show(self.methods)}); give 'all' or names"
            )
        for name in ("dataset", "preset", "split", "convention", "out"):
            _text(name, getattr(self, name))
        if self.segmenter is not None:
            _text("segmenter", self.segmenter)
            _choice("segmenter", self.segmenter, ("lraspp", "unet"))
        if self.data_root is not None:
            _text("data-root", self.data_root)
        for name in ("amp", "channels_last", "force", "report"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"--{name.replace('_', '-')}: expected true or false, "
                    f"got {show(getattr(self, name))}"
                )
        _choice("preset", self.preset, tuple(PRESET_IMAGE_SIZE))
        _choice("split", self.split, SPLIT_SCHEMES)
        _choice("convention", self.convention, CONVENTIONS)
        _choice("threshold-on", self.threshold_on, THRESHOLD_ON)
        names = list_datasets()
        if self.dataset.replace("-", "_") not in names:
            raise ConfigError(f"--dataset: unknown dataset {show(self.dataset)}; valid: {names}")
        self.dataset = self.dataset.replace("-", "_")
        _int("seeds", self.seeds, minimum=1)
        _int("base-seed", self.base_seed, minimum=0)
        _number("val-fraction", self.val_fraction, 0.0, 0.9, open_low=True)
        _number("gt-ratio", self.gt_ratio, 0.0, 1.0)
        if self.budget_minutes is not None:  # no cap: leave it out (inf is refused)
            _number("budget-minutes", self.budget_minutes, 0.0, None, open_low=True)
        if self.max_epochs is not None:
            _int("max-epochs", self.max_epochs, minimum=1)
        if self.segmenter_epochs is not None:
            _int("segmenter-epochs", self.segmenter_epochs, minimum=0)
        if self.segmenter_batch_size is not None:
            _int("segmenter-batch-size", self.segmenter_batch_size, minimum=1)
        if self.threshold is not None:
            _number("threshold", self.threshold, 0.0, 1.0)
        if self.image_size is not None:
            _int("image-size", self.image_size, minimum=16)
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"--device: expected a device name, got {show(self.device)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for provenance)."""
        return dataclasses.asdict(self)


#: Where a swept threshold is chosen: ours (validation) or the literature's (train GT).
THRESHOLD_ON = ("val", "train_gt")


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"--{name}: {show(value)} is not one of {', '.join(valid)}")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"--{name}: expected a non-empty text value, got {show(value)}")


def _int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"--{name}: expected an integer, got {show(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"--{name}: must be >= {minimum}, got {show(value)}")


def _number(name: str, value: Any, low: float, high: float | None, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"--{name}: expected a number, got {show(value)}")
    if not math.isfinite(value):  # nan passes every comparison below
        raise ConfigError(f"--{name}: expected a finite number, got {value}")
    if value < low or (open_low and value == low) or (high is not None and value > high):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ConfigError(f"--{name}: must be in {bound.replace('None', 'inf')}, got {value}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run YAML with a strict safe loader; keys are option names (dashes or underscores).

    Refused, each as one :class:`ConfigError` line: a missing, unreadable, binary (not UTF-8)
    or oversized file, invalid YAML, Python tags, anchors and aliases, a key given twice (also
    as ``budget-minutes`` and ``budget_minutes``) and unknown keys.
    """
    import yaml

    from methods.base import strict_yaml_load

    p = Path(path)
    text = _read_config_text(p)
    try:
        data = strict_yaml_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {p} is not valid YAML: {exc}".splitlines()[0]) from None
    except RecursionError:  # absurdly deep nesting
        raise ConfigError(f"--config: {p} is not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of option: value")
    valid = {f.name for f in dataclasses.fields(RunConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in valid:
            names = ", ".join(sorted(n.replace("_", "-") for n in valid))
            raise ConfigError(f"--config: unknown key {show(key)} in {p}; valid keys: {names}")
        if k in out:
            raise ConfigError(f"--config: option {k.replace('_', '-')!r} is given twice in {p}")
        out[k] = value
    return out


def _read_config_text(p: Path) -> str:
    """The text of a ``--config`` file, or one ConfigError line saying why it cannot be read."""
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"--config: {p} is {size} bytes, not a run config (at most {MAX_CONFIG_BYTES})"
            )
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {p}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--config: {p} is not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); give a YAML file"
        ) from None


def build_config(yaml_values: dict[str, Any], cli_values: dict[str, Any]) -> RunConfig:
    """Merge defaults < YAML < explicit CLI values, then validate."""
    values = dict(yaml_values)
    values.update({k: v for k, v in cli_values.items() if v is not None})
    return RunConfig(**values).validate()


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder if needed and prove it writable, before any work starts.

    Args:
        path: the folder.
        option: the option named in the error.

    Returns:
        The folder.

    Raises:
        ConfigError: the path is a file (or lies under one), or the folder cannot be created or
            written (read-only file system, no permission, disk full).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option}: {p} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{option}: cannot write to {p}: {exc.strerror or exc}") from None
    return p


_SECRET_KEYS = re.compile(r"pass|secret|token|key|auth|credential", re.IGNORECASE)


def _split_url(text: str, last_at: bool = False) -> tuple[str, str | None, str, str | None]:
    """``(scheme, userinfo, host_and_path, query)`` of ``scheme://...``, read pessimistically.

    The userinfo runs to the last ``@`` before the first ``?`` (so a raw ``@``, ``:``, ``/`` or
    ``#`` in a password stays inside it); when no ``@`` but a ``:`` precedes the first ``?``
    (a raw ``?`` in a password; SQLAlchemy reads ``db:5432/x?u=a@b`` that way too), or when
    ``last_at`` is set, to the last ``@`` of all. The query is everything after the next ``?``
    (``#`` included, as SQLAlchemy reads it). ``sqlite:///a@b.db`` (empty host) has no userinfo.
    """
    scheme, rest = text.split("://", 1)
    userinfo: str | None = None
    if rest and rest[0] != "/" and "@" in rest:
        head = rest.partition("?")[0]
        if last_at or ("@" not in head and ":" in head):
            at = rest.rfind("@")
        else:
            at = head.rfind("@")
        if at != -1:
            userinfo, rest = rest[:at], rest[at + 1 :]
    host_path, sep, query = rest.partition("?")
    return scheme, userinfo, host_path, query if sep else None


def mask_url(url: str) -> str:
    """A storage URL safe to log or print: the password (and secret query values) masked.

    ``postgresql://bench:s3cret@db:5432/optuna`` becomes ``postgresql://bench:***@db:5432/optuna``;
    query parameters whose names look secret (``password``, ``token``, ``api_key``, ...) get
    ``***`` too. The URL is read pessimistically (see :func:`_split_url`): a raw ``@``, ``:``,
    ``/`` or ``#`` in a password is masked with the rest of it, even where that over-masks, and
    the pieces of every secret under the other reading are masked as well (:func:`redact`).
    Hosts, ports, paths and user names are kept so that logs stay useful; text that is not a
    URL (a plain file path, ``journal:PATH``) is returned unchanged.

    Args:
        url: an RDB / journal URL or a file path.

    Returns:
        The masked text.
    """
    text = str(url)
    if "://" not in text:
        return text
    scheme, userinfo, host_path, query = _split_url(text)
    masked = f"{scheme}://"
    if userinfo is not None:
        user, sep, _ = userinfo.partition(":")
        masked += f"{user}:***@" if sep else f"{userinfo}@"
    masked += host_path
    if query is not None:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_KEYS.search(k) for k, _ in pairs):
            query = urlencode(
                [(k, "***" if _SECRET_KEYS.search(k) else v) for k, v in pairs], safe="*/:"
            )
        masked += f"?{query}"
    return redact(masked, text)


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL (password, secret query values) as they may appear in text.

    Each secret in its raw, percent-decoded and percent-encoded forms, under both readings of
    :func:`_split_url`; for the first reading also its pieces between ``@``, ``:`` and ``/``
    of 4 characters or more (a driver that splits a raw-``@`` password shows only a piece of
    it). Longest first.
    """
    text = str(url)
    if "://" not in text:
        return []
    forms: set[str] = set()
    for last_at in (False, True):
        _, userinfo, _, query = _split_url(text, last_at)
        found = []
        if userinfo is not None and ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        for part in (query or "").split("&"):
            key, _, value = part.partition("=")
            if value and _SECRET_KEYS.search(unquote(key)):
                found.append(value)
        for secret in found:
            for form in (secret, unquote(secret), quote(unquote(secret), safe="")):
                forms.add(form)
                if not last_at:
                    pieces = re.split(r"[@:/]|%40|%3A|%2F", form, flags=re.IGNORECASE)
                    forms.update(p for p in pieces if len(p) >= 4)
    return sorted(forms, key=len, reverse=True)


def redact(text: str, url: str | None) -> str:
    """``text`` with every secret of ``url`` (see :func:`url_secrets`) replaced by ``***``.

    For messages of exceptions raised while a storage URL was in use (a driver may quote the
    host it failed to reach, which holds part of a password with a raw ``@``).
    """
    if not url:
        return text
    for secret in url_secrets(url):
        if secret and secret != "***":
            text = text.replace(secret, "***")
    return text
