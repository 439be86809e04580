"""The run configuration: CLI options and YAML keys share one definition and one validator.

A YAML file given with ``--config`` uses the option names as keys (``budget-minutes`` or
``budget_minutes``); options typed on the command line win over the file. Every invalid value
raises :class:`ConfigError` with one line naming the option, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

logger = logging.getLogger(__name__)

PRESET_IMAGE_SIZE = {"paper": 224, "quick": 128, "tiny": 64}


class ConfigError(ValueError):
    """An invalid option or config key; the message names the option."""


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
            raise ConfigError(f"--methods: expected a list of method names, got {self.methods!r}")
        if not self.methods:
            raise ConfigError("--methods: empty list; give 'all' or method names")
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
                    f"got {getattr(self, name)!r}"
                )
        _choice("preset", self.preset, tuple(PRESET_IMAGE_SIZE))
        _choice("split", self.split, SPLIT_SCHEMES)
        _choice("convention", self.convention, CONVENTIONS)
        names = list_datasets()
        if self.dataset.replace("-", "_") not in names:
            raise ConfigError(f"--dataset: unknown dataset {self.dataset!r}; valid: {names}")
        self.dataset = self.dataset.replace("-", "_")
        _int("seeds", self.seeds, minimum=1)
        _int("base-seed", self.base_seed, minimum=0)
        _number("val-fraction", self.val_fraction, 0.0, 0.9, open_low=True)
        _number("gt-ratio", self.gt_ratio, 0.0, 1.0)
        if self.budget_minutes is not None:
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
            raise ConfigError(f"--device: expected a device name, got {self.device!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for provenance)."""
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"--{name}: {value!r} is not one of {', '.join(valid)}")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"--{name}: expected a non-empty text value, got {value!r}")


def _int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"--{name}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"--{name}: must be >= {minimum}, got {value}")


def _number(name: str, value: Any, low: float, high: float | None, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"--{name}: expected a number, got {value!r}")
    if value < low or (open_low and value == low) or (high is not None and value > high):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ConfigError(f"--{name}: must be in {bound.replace('None', 'inf')}, got {value}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run YAML with a safe loader; keys are option names (dashes or underscores)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {p} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of option: value")
    valid = {f.name for f in dataclasses.fields(RunConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in valid:
            names = ", ".join(sorted(n.replace("_", "-") for n in valid))
            raise ConfigError(f"--config: unknown key {key!r} in {p}; valid keys: {names}")
        out[k] = value
    return out


def build_config(yaml_values: dict[str, Any], cli_values: dict[str, Any]) -> RunConfig:
    """Merge defaults < YAML < explicit CLI values, then validate."""
    values = dict(yaml_values)
    values.update({k: v for k, v in cli_values.items() if v is not None})
    return RunConfig(**values).validate()


_SECRET_KEYS = re.compile(r"pass|secret|token|key|auth|credential", re.IGNORECASE)


def mask_url(url: str) -> str:
    """A storage URL safe to log or print: the password (and secret query values) masked.

    ``postgresql://bench:s3cret@db:5432/optuna`` becomes ``postgresql://bench:***@db:5432/optuna``;
    query parameters whose names look secret (``password``, ``token``, ``api_key``, ...) get
    ``***`` too. Paths, hosts, ports and user names are kept so that logs stay useful; text
    that is not a URL (a plain file path) is returned unchanged.

    Args:
        url: an RDB / journal URL or a file path.

    Returns:
        The masked text.
    """
    text = str(url)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if sep else f"{user}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, "***" if _SECRET_KEYS.search(k) else v) for k, v in pairs], safe="*"
            )
        if (netloc, query) == (parts.netloc, parts.query):
            return text  # nothing secret (urlunsplit would also drop the "//" of sqlite:///)
        masked = f"{parts.scheme}://{netloc}{parts.path}"
        return (
            masked
            + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else "")
        )
    except ValueError:  # unparsable: hide everything between the scheme and the host
        return re.sub(r"(://)[^/@]*@", r"\1***@", text)
