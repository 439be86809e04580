"""The context the runner gives a method: cached internal stages, the budget, stage costs.

:class:`RunContext` is :class:`methods.base.Context` plus what a run needs from the harness:
internal stages cached in a content-addressed folder (reused when complete and intact), the
wall-clock budget, the cost of every stage, and the shared-fit hook (:meth:`RunContext.as_method`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmark import cache as bcache
from benchmark import faults
from benchmark.accounting import measure
from methods.base import Context, Method

logger = logging.getLogger(__name__)


def progress(iterable: Any, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal, the bare iterable otherwise (logs and CI stay clean)."""
    if not sys.stderr.isatty() or os.environ.get("CI"):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, **kwargs)


@dataclass
class RunContext(Context):
    """A Context that caches internal stages, enforces the budget and records stage costs."""

    stage_dir: Path = field(default_factory=lambda: Path("."))
    budget_s: float | None = None
    force: bool = False
    started: float = field(default_factory=time.perf_counter)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    prefix: str = ""
    phase: str = ""  # the runner's step in flight (fit, maps_val, segmenter, ...), for errors
    active: str = ""  # the internal stage being computed
    failed: str = ""  # the innermost stage whose computation raised
    #: (seed, stage folder) a method has in its own run; set by the runner (see as_method)
    locate: Callable[[Method], tuple[int, Path]] | None = None

    @contextlib.contextmanager
    def as_method(self, method: Method) -> Iterator[None]:
        """Use ``method``'s own seed and stage folder inside the block (shared inner fits)."""
        if self.locate is None:
            yield
            return
        saved = self.seed, self.stage_dir
        self.seed, self.stage_dir = self.locate(method)
        logger.info("%s: fitted as in its own run (seed %d)", method.name, self.seed)
        try:
            yield
        finally:
            self.seed, self.stage_dir = saved

    def should_continue(self) -> bool:
        """False once the run's wall-clock budget is spent (then the run's status is budget)."""
        faults.point("step", self.active)  # test-only; see benchmark.faults
        if self.budget_s is not None and time.perf_counter() - self.started > self.budget_s:
            if not self.budget_hit:
                logger.info("budget of %.0f s spent: stopping training", self.budget_s)
            self.budget_hit = True
            return False
        return True

    def stage(
        self,
        name: str,
        compute: Callable[[], dict[str, torch.Tensor]],
        check: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Reuse the cached stage ``name`` when complete and intact, else compute and save it.

        Another process computing the same stage is waited for (see
        :func:`benchmark.cache.computing`). A result with NaN or inf values (a diverged
        training) raises FloatingPointError and is never cached.

        Args:
            name: the stage name (the file is ``<prefix><name>.pt`` in the stage folder).
            compute: computes the stage's tensors (a dict) when no usable cached copy exists.
            check: says why loaded tensors do not fit (e.g. a state dict that does not load
                into the model), or None; a cached copy that does not fit is recomputed.
        """
        path = self.stage_dir / f"{self.prefix}{name}.pt"
        with bcache.computing(path):
            info = None if self.force else bcache.read_marker(path)
            tensors = None if info is None else _load_stage(path, check)
            if info is not None and tensors is not None:
                meta = info["meta"]
                self.budget_hit = self.budget_hit or bool(meta.get("budget_hit"))
                self.costs[name] = {**meta.get("cost", {}), "reused": True}
                logger.info("stage %s: reused %s", name, path)
                return tensors
            bcache.invalidate(path)
            before, outer = self.budget_hit, self.active
            self.budget_hit, self.active = False, f"{self.prefix}{name}"
            try:
                with measure(self.device) as cost:
                    tensors = compute()
                _check_finite(name, tensors)
            except BaseException:
                self.failed = self.failed or self.active
                raise
            finally:
                self.active = outer
            hit = self.budget_hit
            self.budget_hit = before or hit
            bcache.save_tensors(path, tensors, {"cost": cost.to_dict(), "budget_hit": hit})
            self.costs[name] = {**cost.to_dict(), "reused": False}
            return tensors


def _load_stage(
    path: Path, check: Callable[[dict[str, Any]], str | None] | None
) -> dict[str, Any] | None:
    """The tensors of a cached stage whose marker was checked; None (warned) if unusable."""
    try:
        tensors = bcache.load_tensors(path)
    except Exception as exc:  # noqa: BLE001 - any unloadable file is recomputed
        logger.warning("cannot load cached stage %s (%s); recomputing", path, exc)
        return None
    problem = "not a dict of tensors" if not isinstance(tensors, dict) else None
    if problem is None and check is not None:
        problem = check(tensors)
    if problem is not None:
        logger.warning(
            "cached stage %s does not fit the run: %s (corrupt or replaced?); recomputing",
            path,
            problem,
        )
        return None
    return tensors


def _check_finite(stage: str, tensors: dict[str, Any]) -> None:
    """Raise FloatingPointError if a floating tensor of a stage result holds NaN or inf."""
    bad = [
        key
        for key, value in tensors.items()
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise FloatingPointError(
            f"stage {stage}: training diverged: NaN or inf in {shown} (the loss became NaN or "
            "inf; try a lower learning rate); not cached"
        )
