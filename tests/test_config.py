import pytest

from es_mpi import presets
from es_mpi.config import Config, load_toml
from es_mpi.errors import EsError
from tasks import get_task


def test_defaults_are_valid_and_round_trip():
    cfg = Config(model="m")
    assert Config.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("changes,match", [
    ({"population": 1}, "population"),
    ({"population": 5, "antithetic": True}, "even population"),
    ({"sigma": 0.0}, "sigma"),
    ({"sigma": -1e-3}, "sigma"),
    ({"sigma": float("nan")}, "finite"),
    ({"lr": 0}, "lr"),
    ({"lr": float("inf")}, "finite"),
    ({"generations": 0}, "generations"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"shaping": "softmax"}, "zscore, rank"),
    ({"mode": "fast"}, "mode"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"batch_size": -2}, "batch_size"),
    ({"population": 4.5}, "integer"),
    ({"population": True}, "integer"),
    ({"antithetic": "yes"}, "true or false"),
    ({"sigma": "0.1"}, "number"),
])
def test_invalid_values_name_the_field(changes, match):
    with pytest.raises(EsError, match=match) as exc:
        Config(model="m", **changes)
    assert "\n" not in str(exc.value)


def test_toml_and_unknown_keys(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text('population = 6\nmax-new-tokens = 12\nsigma = 0.01\n')
    values = load_toml(good)
    assert values == {"population": 6, "max_new_tokens": 12, "sigma": 0.01}
    assert Config.from_dict(values).max_new_tokens == 12

    typo = tmp_path / "typo.toml"
    typo.write_text("popluation = 6\n")
    with pytest.raises(EsError, match="unknown key 'popluation'"):
        load_toml(typo)
    broken = tmp_path / "broken.toml"
    broken.write_text("population = \n")
    with pytest.raises(EsError, match="not valid TOML"):
        load_toml(broken)
    with pytest.raises(EsError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_trajectory_differences_ignore_resumable_fields():
    a = Config(model="m", generations=5, sigma=0.01)
    b = a.replace(generations=50, checkpoint_every=3, model="elsewhere", run="x.h5")
    assert a.trajectory_differences(b) == []
    assert a.trajectory_differences(b.replace(sigma=0.02, seed=1)) == ["sigma", "seed"]


@pytest.mark.parametrize("name", presets.names())
def test_every_shipped_preset_is_a_valid_config_of_a_known_task(name):
    values = presets.load(name)
    cfg = Config.from_dict({**values, "model": "m"})
    assert presets.description(name) and name in presets.help_text()
    task = get_task(cfg.task, data=cfg.task_data or None)
    assert task.train_examples() and task.eval_examples()
    assert cfg.batch_size <= len(task.train_examples())


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(EsError, match=r"choose one of .*reasoning-lowrank-cpu"):
        presets.load("reasoning")


# the constants of the paper's scripts (es_fine-tuning_conciseness.py and
# es_fine-tuning_countdown_accl.py), written out by hand
PAPER = {
    "conciseness": {"population": 30, "sigma": 0.001, "lr": 0.0005, "generations": 1000,
                    "max_new_tokens": 100, "task": "conciseness"},
    "countdown": {"population": 30, "sigma": 0.001, "lr": 0.0005, "generations": 1000,
                  "max_new_tokens": 1024, "task": "countdown-paper", "train_limit": 200},
}


@pytest.mark.parametrize("name", list(PAPER))
def test_the_paper_presets_hold_the_papers_settings(name):
    from es_mpi.config import Config
    from es_mpi.session import check_task

    cfg = Config.from_dict(presets.load(name))
    for key, value in PAPER[name].items():
        assert getattr(cfg, key) == value, key
    # greedy full-parameter ES on raw prompts, one noise per member, z-scored, no decay
    assert (cfg.mode, cfg.prompt_format, cfg.antithetic, cfg.shaping, cfg.weight_decay,
            cfg.batch_size) == ("full", "raw", False, "zscore", 0.0, 0)
    task, train = check_task(cfg)
    assert len(train) == {"conciseness": 2, "countdown": 200}[name]
    assert task.prompt_format == "raw"
