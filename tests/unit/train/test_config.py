"""Defaults live in one place: every CLI option that maps to TrainConfig or ServeSettings has its
default from there (typer keeps them on the click parameters we inspect)."""

from __future__ import annotations

import typer.main

from covid_cxr.cli import app
from covid_cxr.serve.settings import MB, ServeSettings
from covid_cxr.core.config import DEFAULTS, TrainConfig


def _params(command: str) -> dict:
    group = typer.main.get_group(app)
    return {p.name: p.default for p in group.commands[command].params}


def test_training_options_are_unset_unless_given_and_show_train_configs_default():
    """Options default to None (so TrainConfig.model_fields_set is what the user typed) and their help
    shows TrainConfig's default: typed once, in the config."""
    fields = TrainConfig.model_fields
    group = typer.main.get_group(app)
    for command in ("train", "run", "lr-find"):
        checked = 0
        for p in group.commands[command].params:
            if p.name not in fields or p.name == "classes":
                continue
            assert p.default is None, (command, p.name)
            d = getattr(DEFAULTS, p.name)
            if d is not None and not isinstance(d, bool):
                assert p.show_default == (",".join(map(str, d)) if isinstance(d, list) else str(d)), (command, p.name)
                checked += 1
        assert checked >= 5, command
    assert _params("run")["archs"] == DEFAULTS.arch


def test_a_recipe_yields_to_the_options_given_even_at_their_default():
    """`--recipe accurate --balance undersample` trains undersampled, though undersample is the default
    (the recipe's own choice is class weights); options not given take the recipe's values."""
    from covid_cxr.cli.main import _config
    from covid_cxr.train.recipes import recipe_configs

    given = _config(balance="undersample", arch=None, epochs=None)
    assert given.model_fields_set == {"balance"}
    assert {c.balance for c in recipe_configs("accurate", given)} == {"undersample"}
    plain = recipe_configs("accurate", _config(arch=None))
    assert {c.balance for c in plain} == {"weights"}
    assert [c.arch for c in plain] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert {c.arch for c in recipe_configs("accurate", _config(arch="efficientnet_lite0"))} == {"efficientnet_lite0"}


def test_serve_takes_its_defaults_from_serve_settings():
    fields = ServeSettings.model_fields
    params = _params("serve")
    checked = 0
    for name, default in params.items():
        if name in fields and name not in ("models", "intra_op_threads"):
            assert default == fields[name].default, name
            checked += 1
    assert params["max_body_mb"] * MB == fields["max_body_bytes"].default
    assert checked >= 10


def test_config_rejects_bad_values_with_a_clear_message():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown architecture 'vgg19'"):
        TrainConfig(arch="vgg19")
    with pytest.raises(ValidationError, match="balance"):
        TrainConfig(balance="oversample")
    for block in (0, 7):  # EfficientNet-Lite's blocks 1-6 can start stage 2; 0 would train the stem's output too
        with pytest.raises(ValidationError, match="finetune_from_block"):
            TrainConfig(finetune_from_block=block)
    assert TrainConfig(finetune_from_block=5).run_id() != TrainConfig().run_id()


def test_cli_reports_a_bad_option_value_in_one_line(tmp_path):
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path), "--arch", "vgg19"])
    assert res.exit_code == 2 and "unknown architecture 'vgg19'" in res.output and "Traceback" not in res.output


def test_run_id_ignores_only_cosmetics_and_the_stopping_rule():
    a = TrainConfig()
    assert a.run_id() == TrainConfig(epochs=5, patience=2, name="x", progress=False).run_id()
    assert a.run_id() != TrainConfig(lr=0.01).run_id()


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield (*path, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))


def test_every_command_prints_its_help():
    """Typer renders help text as rich markup: an unescaped `[/<version>]` made `ensemble --help`
    and `audit --help` crash (MarkupError) instead of printing."""
    from typer.testing import CliRunner

    commands = list(_commands(typer.main.get_group(app)))
    assert len(commands) >= 15
    for path in commands:
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output[-300:])
