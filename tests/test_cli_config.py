from __future__ import annotations

import subprocess
import sys

import pytest

from benchmark.cli import main
from benchmark.config import ConfigError, build_config, load_yaml


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "list", "datasets", "report", "perf"):
        assert cmd in out


def test_list_datasets(capsys):
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "oxford_pet" in out and "synthetic" in out


def test_list_methods(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for name in ("cam", "cam_affinitynet", "supervised", "centre_prior", "all_foreground"):
        assert name in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--budget-minutes", "-1"], "--budget-minutes"),
        (["--gt-ratio", "1.5"], "--gt-ratio"),
        (["--seeds", "0"], "--seeds"),
        (["--methods", "nonexistent_method"], "valid"),
        (["--preset", "huge"], "--preset"),
        (["--convention", "dogs"], "--convention"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, needle, capsys, tmp_path):
    code = main(["run", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1


def test_yaml_unknown_key_and_precedence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [cam]\nbogus_key: 3\n")
    with pytest.raises(ConfigError, match="bogus_key"):
        load_yaml(bad)
    good = tmp_path / "good.yaml"
    good.write_text("methods: [cam]\nseeds: 3\ngt-ratio: 0.2\n")
    cfg = build_config(load_yaml(good), {"seeds": 2})
    assert cfg.seeds == 2 and cfg.gt_ratio == 0.2 and cfg.methods == ["cam"]


def test_yaml_wrong_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seeds: three\n")
    with pytest.raises(ConfigError, match="--seeds"):
        build_config(load_yaml(f), {})


def test_yaml_is_loaded_safely(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("methods: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        load_yaml(f)


def test_module_entry_point_runs():
    res = subprocess.run(
        [sys.executable, "-m", "benchmark", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "run" in res.stdout


def test_channels_last_flag_parses_and_is_validated(tmp_path):
    from benchmark.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run"]).channels_last is None  # the config default (on) applies
    assert parser.parse_args(["run", "--no-channels-last"]).channels_last is False
    assert build_config({}, {"channels_last": False}).channels_last is False
    assert build_config({}, {}).channels_last is True
    f = tmp_path / "c.yaml"
    f.write_text("channels-last: maybe\n")
    with pytest.raises(ConfigError, match="--channels-last"):
        build_config(load_yaml(f), {})
