"""Variants that differ only in inference options share the fitted model (and its seed)."""

from __future__ import annotations

import pytest

from benchmark.config import RunConfig
from benchmark.identity import REPO, code_text
from benchmark.runner import Runner
from methods import create_method, list_methods


@pytest.mark.parametrize(
    ("spec", "variant", "trained_field"),
    [
        ("cam", "cam[tta=true]", "epochs"),
        ("ccam_ecs", "ccam_ecs[crf=true]", "epochs"),
        ("weaktr_refinery", "weaktr_refinery[map=decoder]", "epochs"),
        ("cam_affinitynet", "cam_affinitynet[beta=4]", "aff_epochs"),
    ],
)
def test_inference_only_options_keep_the_fit_identity(spec, variant, trained_field):
    a, b = create_method(spec, preset="tiny"), create_method(variant, preset="tiny")
    assert a.identity() != b.identity() and a.cache_key() != b.cache_key()
    assert a.fit_identity() == b.fit_identity() == a.identity()
    assert a.fit_cache_key() == b.fit_cache_key()
    c = create_method(f"{spec}[{trained_field}=3]", preset="tiny")
    assert c.fit_identity() != a.fit_identity() and c.fit_cache_key() != a.fit_cache_key()


@pytest.mark.parametrize("name", list_methods())
def test_inference_fields_are_config_fields(name):
    method = create_method(name, preset="tiny")
    assert set(method.inference_fields) <= set(method.params()), name


def _classifier_costs(tmp_path, methods):
    """All rows of a tiny run of ``methods``, and its ``fit:classifier`` cost rows."""
    cfg = RunConfig(
        methods=methods,
        preset="tiny",
        out=str(tmp_path),
        device="cpu",
        segmenter_epochs=1,
        report=False,
    ).validate()
    rows = Runner(cfg).run_all()
    return rows, rows[(rows["aggregation"] == "cost") & (rows["stage"] == "fit:classifier")]


def test_runner_reuses_the_fitted_stages_of_an_inference_variant(tmp_path):
    rows, cost = _classifier_costs(tmp_path, ["cam", "cam[tta=true]"])
    variant = create_method("cam[tta=true]", preset="tiny").identity()
    reused = cost.groupby("method_id")["reused"].all()
    assert not reused["cam"] and reused[variant]
    seeds = rows.groupby("method_id")["seed"].first()
    assert seeds["cam"] == seeds[variant]
    assert set(rows["status"]) == {"done"}


def test_cam_affinitynet_shares_the_cam_runs_classifier(tmp_path):
    """The classifier inside cam_affinitynet is the cam run's: one file, trained once."""
    rows, cost = _classifier_costs(tmp_path, ["cam_affinitynet", "cam"])
    assert set(rows["status"]) == {"done"}
    reused = cost.groupby("method")["reused"].all()
    assert not reused["cam_affinitynet"] and reused["cam"]  # cam_affinitynet ran first
    classifiers = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("stages/*/*/classifier.pt"))
    assert len(classifiers) == 1 and classifiers[0].parts[1] == "cam", classifiers
    assert list(tmp_path.glob("stages/cam_affinitynet/*/affinity.pt"))


def test_code_version_covers_the_method_modules_a_method_builds_on():
    from benchmark.runner import REPO, _method_sources

    sources = {p.name for p in _method_sources(REPO / "methods" / "cam_affinitynet.py")}
    assert sources == {"cam_affinitynet.py", "cam.py"}


_SOURCE = '''"""Module doc."""
import math


class A:
    """Class doc."""

    x: int = 1  # a comment

    def f(self):
        """Doc."""
        return math.pi * self.x
'''


def test_code_text_ignores_docstrings_comments_and_layout():
    edited = (
        _SOURCE.replace("Module doc.", "Module doc, and a Deviations section with a measurement.")
        .replace("# a comment", "# another comment")
        .replace('"""Doc."""', '"""Another doc."""\n\n')
    )
    assert edited != _SOURCE and code_text(edited) == code_text(_SOURCE)
    real = (REPO / "methods" / "cam.py").read_text(encoding="utf-8")
    assert code_text(real.replace('"""', '"""Edited. ', 1)) == code_text(real)


@pytest.mark.parametrize(
    "old, new",
    [("x: int = 1", "x: int = 2"), ("math.pi", "math.e"), ("self.x\n", "self.x + 0\n")],
)
def test_code_text_changes_with_the_code(old, new):
    assert code_text(_SOURCE.replace(old, new)) != code_text(_SOURCE)


def test_code_text_of_a_docstring_only_function_differs_from_one_that_returns():
    assert code_text('def g():\n    """Doc."""\n') != code_text("def g():\n    return 1\n")


def test_code_text_of_a_docstring_only_function_equals_an_empty_one():
    assert code_text('def g():\n    """Doc."""\n') == code_text("def g():\n    pass\n")
