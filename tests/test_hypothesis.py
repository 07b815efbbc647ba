"""Property-based bad input (hypothesis): every invalid config value, TOML file, CLI argument
or task-data file gives one clear error, exit status 2, before any model loads, and writes
nothing. In-process (click's CliRunner), so hundreds of cases take seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from es_mpi import config as config_module
from es_mpi.cli import cli
from es_mpi.config import Config, load_toml
from es_mpi.errors import EsError
from tasks import get_task

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# directory settings: any text names a directory (a flag's 0 is the directory "0"), so
# what is bad there is a path that cannot be one: under a file (/dev/null is not a folder)
BAD_PATHS = {"tensorboard": "/dev/null/board"}
MAX_COUNT = getattr(config_module, "MAX_COUNT", 2**31 - 1)
# the smallest valid value of each integer field (beyond it: invalid)
INT_MIN = {"population": 2, "seed": 0, "batch_size": 0, "eval_every": 0, "eval_limit": 0,
           "train_limit": 0, "generate_batch": 0, "member_batch": 0}
# (lowest valid, highest valid) of float fields with a range, given the defaults
FLOAT_RANGE = {"sigma": (0.0, 1.0), "lr": (0.0, 10.0), "weight_decay": (0.0, 1 / 5e-4),
               "reward_timeout": (0.0, 1e6)}
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

not_a_number = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=2),
                         st.none(), st.booleans(), st.dictionaries(st.text(max_size=3),
                                                                   st.integers(), max_size=2))
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def bad_values(name: str) -> st.SearchStrategy:
    """Values that are invalid for Config field `name`, whatever the other fields."""
    f = FIELDS[name]
    if f.type == "int":
        low = INT_MIN.get(name, 1)
        high = config_module.MAX_SEED if name == "seed" else MAX_COUNT
        return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1),
                         st.floats(allow_nan=True), not_a_number.filter(
                             lambda v: isinstance(v, bool) or not isinstance(v, int)))
    if f.type == "float":
        wrong_type = not_a_number.filter(lambda v: not isinstance(v, (int, float)) or
                                         isinstance(v, bool))
        if name not in FLOAT_RANGE:
            return st.one_of(not_finite, wrong_type)
        low, high = FLOAT_RANGE[name]
        below = st.floats(max_value=low, allow_nan=False) if name in ("sigma", "lr") else \
            st.floats(max_value=-5e-324, allow_nan=False)
        return st.one_of(not_finite, wrong_type, below,
                         st.floats(min_value=high, exclude_min=True, allow_nan=False))
    if f.type == "bool":
        return st.one_of(st.integers(), st.text(max_size=5), st.none(), st.floats())
    if f.metadata.get("choices"):
        return st.one_of(st.text(max_size=12).filter(lambda v: v not in f.metadata["choices"]),
                         st.integers(), st.none())
    bad_type = st.one_of(st.integers(), st.floats(), st.none(), st.booleans(),
                         st.lists(st.text(max_size=3), max_size=2))
    if name in BAD_PATHS:
        return st.one_of(bad_type, st.just(BAD_PATHS[name]))
    return st.one_of(bad_type, st.just("")) if name == "task" else bad_type


field_and_bad_value = st.sampled_from(sorted(FIELDS)).flatmap(
    lambda name: st.tuples(st.just(name), bad_values(name)))


@given(field_and_bad_value)
@settings(max_examples=400, deadline=None)
def test_every_invalid_config_value_is_one_named_error(case):
    name, value = case
    # a path that cannot be a directory is refused by train's checks, not by the config
    # (a run file's config is read on machines where its paths do not exist)
    assume(name not in BAD_PATHS or value != BAD_PATHS[name])
    with pytest.raises(EsError) as info:
        Config.from_dict({"model": "m", name: value})
    assert str(info.value).startswith(f"config: {name} = "), str(info.value)


@given(st.text(min_size=1, max_size=20).filter(
    lambda k: k.replace("-", "_") not in FIELDS), st.integers())
@settings(max_examples=100, deadline=None)
def test_unknown_config_keys_are_refused(key, value):
    with pytest.raises(EsError, match="unknown key"):
        Config.from_dict({key: value})


# -- through the command line -------------------------------------------------------------

def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(result, what=""):
    assert result.exit_code == 2, (what, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, (what, result.stderr)
    assert lines[0].startswith("es-mpi: error: "), (what, lines[0])
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def small_run(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hyp") / "run.h5"
    result = invoke(["train", "--model", tiny_model, "--run", path, "--population", "4",
                     "--max-new-tokens", "4", "--generations", "2"])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def no_model_loading(small_run):
    """Bad input must be refused before any weights load: loading fails the test."""
    from es_mpi import model

    def refuse(*args, **kw):
        raise AssertionError("a model was loaded: the bad input was not caught early")

    mp = pytest.MonkeyPatch()
    mp.setattr(model, "load_model", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


def fresh_dir(scratch: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=scratch))


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


@given(field_and_bad_value)
@FAST
def test_bad_value_in_a_toml_config_is_one_error_line(tiny_model, no_model_loading, scratch,
                                                      case):
    name, value = case
    assume(value is not None)  # TOML has no null
    work = fresh_dir(scratch)
    config = work / "run.toml"
    config.write_text(f"{name} = {toml_value(value)}\n", encoding="utf-8")
    result = invoke(["train", "--config", config, "--model", tiny_model, "--run",
                     work / "run.h5"] if name not in ("model", "run") else
                    ["train", "--config", config])
    assert_one_error_line(result, (name, value))
    assert sorted(p.name for p in work.iterdir()) == ["run.toml"]
    shutil.rmtree(work)


def _flag_text(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


cli_cases = st.sampled_from(sorted(n for n, f in FIELDS.items()
                                   if n not in ("model", "run") and f.type != "bool")).flatmap(
    lambda name: st.tuples(st.just(name), bad_values(name).filter(
        lambda v: v is not None and (name not in BAD_PATHS or v == BAD_PATHS[name]))))


@given(cli_cases)
@FAST
def test_bad_flag_value_is_one_error_line(tiny_model, no_model_loading, scratch, case):
    name, value = case
    work = fresh_dir(scratch)
    flag = "--" + name.replace("_", "-")
    result = invoke(["train", "--model", tiny_model, "--run", work / "run.h5",
                     f"{flag}={_flag_text(value)}"])
    assert_one_error_line(result, (name, value))
    assert list(work.iterdir()) == []
    work.rmdir()


@given(st.lists(st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12),
                min_size=1, max_size=3))
@FAST
def test_unknown_flags_and_stray_arguments_are_one_error_line(tiny_model, no_model_loading,
                                                             scratch, junk):
    known = {"--" + n.replace("_", "-") for n in FIELDS} | {"--config", "--preset", "--help",
                                                             "-h", "--quiet", "-q",
                                                             "--verbose", "-v"}
    assume(not any(j in known or j.split("=")[0] in known or j.startswith("--no-")
                   or j == "--" or (j[:1] == "-" and j[1:] and set(j[1:]) <= set("qvh"))
                   for j in junk))
    work = fresh_dir(scratch)
    args = ["train", "--model", tiny_model, "--run", work / "run.h5", *junk]
    result = invoke(args)
    if result.exit_code == 0:  # pragma: no cover - junk that click accepted as values
        pytest.fail(f"accepted: {junk}")
    assert_one_error_line(result, junk)
    assert list(work.iterdir()) == []
    work.rmdir()


@given(st.text(max_size=40))
@FAST
def test_model_paths_that_are_not_models_are_one_error_line(no_model_loading, scratch, path):
    assume(path.strip() and not Path(path).exists() and "\0" not in path)
    work = fresh_dir(scratch)
    result = invoke(["train", "--model", path, "--run", work / "run.h5"])
    assert_one_error_line(result, path)
    assert list(work.iterdir()) == []
    work.rmdir()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


run_file_commands = st.one_of(
    st.tuples(st.just("resume"), st.integers(max_value=0).map(lambda g: ["--generations", g])),
    st.tuples(st.just("export"), st.one_of(st.integers(max_value=-1),
                                           st.integers(min_value=3)).map(
        lambda g: ["{out}", "--generation", g])),
    st.tuples(st.just("eval"), st.one_of(
        st.integers(max_value=-1).map(lambda n: ["--limit", n]),
        st.integers(max_value=0).map(lambda n: ["--batch-size", n]),
        st.integers(max_value=0).map(lambda n: ["--max-new-tokens", n]),
        st.text(max_size=6).filter(lambda t: not t.isdecimal() or int(t) > 2).map(
            lambda t: ["@" + t]))),
)


@given(run_file_commands)
@FAST
def test_bad_arguments_for_a_run_file_are_one_error_line(small_run, no_model_loading, scratch,
                                                         case):
    command, rest = case
    before = digest(small_run)
    work = fresh_dir(scratch)
    if rest and isinstance(rest[0], str) and rest[0].startswith("@"):
        args = [command, f"{small_run}{rest[0]}"]
    else:
        args = [command, small_run, *[work / "out" if a == "{out}" else a for a in rest]]
    result = invoke(args)
    assert_one_error_line(result, args)
    assert list(work.iterdir()) == []
    work.rmdir()
    assert digest(small_run) == before


@given(st.binary(max_size=300))
@FAST
def test_garbage_run_files_are_one_error_line(no_model_loading, scratch, content):
    work = fresh_dir(scratch)
    run = work / "run.h5"
    run.write_bytes(content)
    for args in (["inspect", run], ["resume", run], ["export", run, work / "out"],
                 ["eval", run]):
        assert_one_error_line(invoke(args), args)
    assert [p.name for p in work.iterdir()] == ["run.h5"] and run.read_bytes() == content
    shutil.rmtree(work)


# -- files users write: TOML configs and task data ------------------------------------------

@given(st.text(max_size=200))
@FAST
def test_any_toml_text_loads_or_is_one_named_error(scratch, text):
    path = fresh_dir(scratch) / "c.toml"
    path.write_text(text, encoding="utf-8")
    try:
        values = load_toml(path)
    except EsError as exc:
        assert str(path) in str(exc)
        return
    with contextlib.suppress(EsError):  # a valid config, or one named error
        Config.from_dict({"model": "m", **values})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3),
    max_leaves=8)
record = st.one_of(
    json_values,
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=20), json_values)},
                          optional={"answer": json_values, "split": json_values,
                                    "numbers": json_values, "target": json_values}))


@given(st.sampled_from(["conciseness", "countdown", "arithmetic"]),
       st.sampled_from([".jsonl", ".json"]),
       st.one_of(st.lists(record, max_size=4).map(lambda rs: rs),
                 st.binary(max_size=200)))
@FAST
def test_any_task_data_file_loads_or_is_one_named_error(scratch, task, suffix, content):
    """Empty, malformed, binary, deeply nested or mistyped task data: an EsError naming the
    file (and line), or examples that the task can score; never another exception."""
    path = fresh_dir(scratch) / f"data{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    else:
        path.write_text(json.dumps(content))
    try:
        loaded = get_task(task, data=str(path))
    except EsError as exc:
        assert str(path) in str(exc) or path.name in str(exc), str(exc)
        return
    for example in loaded.train_examples() + loaded.eval_examples():
        reward = loaded.reward("x" * 50, example)
        assert isinstance(reward, float) and math.isfinite(reward)


def test_deeply_nested_task_data_is_one_named_error(tmp_path):
    for suffix in (".json", ".jsonl"):
        path = tmp_path / f"deep{suffix}"
        path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
        with pytest.raises(EsError, match="nested too deeply"):
            get_task("conciseness", data=str(path))
