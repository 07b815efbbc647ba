"""Options from one source: every settings flag of bench, eval, plan and resume is a field of
es_mpi.config.Config, made by the same generator as train's flags (es_mpi.cli's
config_options), so each shows train's help, type, choices and default, and a bad value
gives the same error line through every command that takes it. In-process (click's
CliRunner); nothing loads: every bad value is refused before the model is looked at.
"""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from es_mpi import cli as cli_module
from es_mpi.cli import ConfigOption, _known, cli
from es_mpi.config import FIELDS, Config
from es_mpi.errors import EsError

COMMANDS = ("bench", "eval", "plan", "resume")
# flags of those commands named like one of train's but not train's setting, and why
NOT_CONFIG = {
    ("bench", "--model"): "required there: bench has no TOML file or preset to fill it",
    ("plan", "--model"): "a model directory, its config.json or a shipped name",
    ("plan", "--eval-batch-size"): "0 there means no held-out evaluation (train's is >= 1 "
                                   "and held-out evaluation is --eval-every's)",
    ("eval", "--model"): "the base model of a run file, if it moved (refused for a model dir)",
    ("eval", "--seed"): "the seed of --samples, not the run's seed",
    ("resume", "--model"): "the base model of the run file, if it moved",
}
# flags named like one of train's that are another Config field, and why
RENAMED = {
    ("eval", "--batch-size"): ("eval_batch_size", "eval's prompts per generate call are the "
                               "held-out evaluation's; it has no training prompts"),
}
# Config fields with no value Config refuses that a flag can give (any text is a path
# setting: its file is checked with the task; a bool flag), or refused only with another
# field (antithetic: an odd population, the cross-field case below)
NO_BAD_VALUE = {"task_data", "reward", "eval_kl", "antithetic"}
# a value Config refuses, per field
BAD = [("population", "1"), ("population", str(2**31)), ("sigma", "2.0"), ("sigma", "nan"),
       ("lr", "0"), ("rank", "0"), ("max_new_tokens", "0"), ("batch_size", "-1"),
       ("member_batch", "-1"), ("generate_batch", "-1"), ("eval_batch_size", "0"),
       ("generations", "0"), ("task", "")]
# a value click refuses (a choice not offered, not a number): click's line, the same
# through every command but for the command's name and the flag's
BAD_FOR_CLICK = [("dtype", "float8"), ("mode", "fast"), ("master", "gpu"),
                 ("decay_to", "one"), ("credit", "none"), ("prompt_format", "md"),
                 ("population", "x"), ("sigma", "big"), ("eval_batch_size", "1.5")]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False,
                            prog_name="es-mpi")


def options(command: str) -> list[click.Option]:
    return [p for p in cli.commands[command].params if isinstance(p, click.Option)]


def config_flags(command: str) -> dict[str, ConfigOption]:
    """The command's flags made from Config fields, by field name."""
    return {p.config_field: p for p in options(command) if isinstance(p, ConfigOption)}


def exposed() -> list[tuple[str, str]]:
    return [(c, f) for c in COMMANDS for f in config_flags(c)]


def help_record(command: str, param: click.Option) -> tuple[str, str]:
    ctx = click.Context(cli.commands[command], info_name=command,
                        parent=click.Context(cli, info_name="es-mpi"))
    return param.get_help_record(ctx)


def words(text: str) -> str:
    """Text with its line breaks undone (click wraps help after a hyphen too)."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def split_default(help_text: str) -> tuple[str, str]:
    """(the help without its default, the default as stated)."""
    m = re.fullmatch(r"(.*) \[default: (.*)\]", help_text, flags=re.S)
    assert m, help_text
    return m.group(1), m.group(2)


def shown_default(name: str) -> str:
    default = FIELDS[name].default
    return "none" if default == "" else str(default)


# -- the flags ------------------------------------------------------------------------------

def test_train_takes_every_config_field_and_the_others_take_some():
    assert set(config_flags("train")) == set(FIELDS)
    for command in COMMANDS:
        assert config_flags(command), command
    # the commands' own lists of the fields they take
    assert set(config_flags("bench")) == set(cli_module.BENCH_FIELDS)
    assert set(config_flags("eval")) == set(cli_module.EVAL_FIELDS)
    assert set(config_flags("plan")) == set(cli_module.PLAN_FIELDS)


@pytest.mark.parametrize("command,name", exposed())
def test_each_settings_flag_is_trains(command, name):
    """Help, type, choices and default of the flag are train's for the same field, and
    what --help prints."""
    param, train = config_flags(command)[name], config_flags("train")[name]
    assert param.default is None and train.default is None  # a flag given overrides
    assert type(param.type) is type(train.type)
    assert getattr(param.type, "choices", None) == getattr(train.type, "choices", None) == \
        (tuple(FIELDS[name].metadata["choices"]) if "choices" in FIELDS[name].metadata
         else None)
    assert param.is_bool_flag == train.is_bool_flag == (FIELDS[name].type == "bool")
    assert bool(param.secondary_opts) == bool(train.secondary_opts)
    decl, text = help_record(command, param)
    train_decl, train_text = help_record("train", train)
    body, default = split_default(text)
    train_body, train_default = split_default(train_text)
    assert body == train_body == FIELDS[name].metadata["help"] + _known(name)
    assert train_default == shown_default(name)
    if command == "eval":  # a run file's value first, else train's default
        assert default == f"the run's, or {train_default}"
    elif command == "resume":  # the run's own target
        assert default == "the run's target"
    else:
        assert default == train_default
    # what --help prints: that text, that default, those choices
    printed = words(invoke([command, "--help"]).output)
    assert words(f"{decl} {text}") in printed, (decl, text)
    assert words(f"{train_decl} {train_text}") in words(invoke(["train", "--help"]).output)


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_named_like_trains_are_its_settings(command):
    """A flag spelled like one of train's is that Config field, unless listed with why."""
    train = {opt: p.config_field for p in config_flags("train").values()
             for opt in (*p.opts, *p.secondary_opts)}
    for param in options(command):
        for opt in (*param.opts, *param.secondary_opts):
            if opt not in train or (command, opt) in NOT_CONFIG:
                continue
            assert isinstance(param, ConfigOption), (command, opt)
            field = RENAMED.get((command, opt), (train[opt],))[0]
            assert param.config_field == field, (command, opt)


def test_plan_settings_take_configs_defaults():
    from es_mpi.tooling import plan

    assert set(plan.CONFIG_FIELDS) == set(cli_module.PLAN_FIELDS)
    settings = plan.Settings()
    for name in plan.CONFIG_FIELDS:
        assert getattr(settings, name) == FIELDS[name].default, name


def test_bench_pairs_members_only_when_asked_as_train():
    assert FIELDS["antithetic"].default is False
    assert config_flags("bench")["antithetic"].default is None  # Config's default, off
    assert "--antithetic is off unless given, as in train" in words(
        invoke(["bench", "--help"]).output)


# -- a bad value: the same line through every command ---------------------------------------

def command_args(command: str, tmp_path) -> list:
    """Each command on a model (or run file) that does not exist: the bad value must be
    refused before the model is looked at, or the line names the missing model."""
    missing = tmp_path / "missing"
    return {"train": ["train", "--model", missing, "--run", tmp_path / "run.h5"],
            "bench": ["bench", "--model", missing],
            "eval": ["eval", missing],
            "plan": ["plan", "--model", missing],
            "resume": ["resume", tmp_path / "missing.h5"]}[command]


def taking(name: str) -> list[str]:
    return ["train", *[c for c in COMMANDS if name in config_flags(c)]]


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("es-mpi: error: "), result.stderr
    return lines[0]


def config_error(values: dict) -> str:
    with pytest.raises(EsError) as info:
        Config.from_dict(values)
    return f"es-mpi: error: {info.value}"


def test_every_exposed_field_has_a_bad_value_here():
    covered = {name for name, _ in BAD + BAD_FOR_CLICK} | NO_BAD_VALUE
    assert {name for _, name in exposed()} <= covered


@pytest.mark.parametrize("name,value", BAD)
def test_a_bad_value_is_configs_error_line_from_each_command(tmp_path, name, value):
    typed = {"int": int, "float": float, "str": str}[FIELDS[name].type](value)
    expected = config_error({name: typed})
    commands = taking(name)
    assert len(commands) >= 2, name
    for command in commands:
        flag = config_flags(command)[name].opts[0]
        result = invoke([*command_args(command, tmp_path), flag, value])
        assert error_line(result) == expected, command
    assert not (tmp_path / "run.h5").exists()


def test_antithetic_with_an_odd_population_is_one_line_from_each_command(tmp_path):
    expected = config_error({"population": 3, "antithetic": True})
    commands = [c for c in taking("antithetic") if "population" in config_flags(c)]
    assert commands == ["train", "bench", "plan"]
    for command in commands:
        result = invoke([*command_args(command, tmp_path), "--population", "3", "--antithetic"])
        assert error_line(result) == expected, command


@pytest.mark.parametrize("name,value", BAD_FOR_CLICK)
def test_a_value_click_refuses_is_the_same_line_from_each_command(tmp_path, name, value):
    commands = taking(name)
    assert len(commands) >= 2, name
    lines = set()
    for command in commands:
        flag = config_flags(command)[name].opts[0]
        line = error_line(invoke([*command_args(command, tmp_path), flag, value]))
        assert line.startswith("es-mpi: error: Invalid value for"), line
        lines.add(line.replace(f"es-mpi {command} ", "es-mpi COMMAND ")
                  .replace(f"'{flag}'", "'FLAG'"))
    assert len(lines) == 1, lines
