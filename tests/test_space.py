from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from segcore.errors import UserError
from segsearch.space import fit_depth, load_space, parse_space, suggest

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
search:
  patch_size: {type: categorical, choices: [32, 48, 64]}
  depth: {type: int, low: 2, high: 4}
  lr: {type: float, low: 1.0e-4, high: 0.1, log: true}
  aug_strength: {type: float, low: 0.0, high: 1.0, step: 0.25}
fixed: {epochs: 3, base_width: 8}
study:
  n_trials: 5
  sampler: {name: random}
  pruner: {name: median, args: {n_startup_trials: 2}}
  top_k: 2
"""


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_shipped_spaces_load():
    quick = load_space(ROOT / "search_spaces" / "quick.yaml")
    default = load_space(ROOT / "search_spaces" / "default.yaml")
    for space in (quick, default):
        assert {"patch_size", "depth", "lr", "aug_strength"} <= set(space.search)
    assert quick.n_trials >= 10 and quick.pruner["name"] == "median"
    # the CPU demo is timed: trials, finalists and the final fit each in seconds, each longer
    assert 0 < quick.fixed["seconds"] < quick.promote["seconds"] < quick.final["seconds"]
    assert quick.finalists == 2 and quick.warm_start is True
    assert default.pruner["name"] == "asha" and "min_resource" in default.pruner["args"]
    assert max(default.search["patch_size"]["choices"]) == 128
    assert default.search["depth"]["high"] == 5


def test_parse_and_suggest_with_fixed_trial(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    assert (
        space.n_trials == 5 and space.top_k == 2 and space.sampler == {"name": "random", "args": {}}
    )
    trial = optuna.trial.FixedTrial({"patch_size": 48, "depth": 4, "lr": 0.01, "aug_strength": 0.5})
    cfg = suggest(trial, space)
    assert (cfg.patch_size, cfg.depth, cfg.lr, cfg.aug_strength) == (48, 4, 0.01, 0.5)
    assert cfg.epochs == 3 and cfg.base_width == 8
    # 32 carries depth 4: divisible by 16 and a 2x2 bottom
    cfg = suggest(optuna.trial.FixedTrial({"patch_size": 32, "depth": 4, "lr": 0.01,
                                           "aug_strength": 0.0}), space)  # fmt: skip
    assert cfg.depth == 4


def test_constraint_met_by_construction():
    assert fit_depth(4, 48) == 4 and fit_depth(5, 48) == 4 and fit_depth(4, 40) == 3
    assert fit_depth(3, 24) == 3 and fit_depth(4, 24) == 3  # 24 < 2 * 16: no depth 4
    assert fit_depth(4, 16) == 3  # a 1x1 bottom at depth 4: one less
    assert fit_depth(3, 34) == 1 and fit_depth(2, 33) == 1  # never below 1, even for odd sizes
    space = parse_space(
        {"search": {"patch_size": {"type": "categorical", "choices": [40, 64]},
                    "depth": {"type": "int", "low": 2, "high": 4}}}, "s",
    )  # fmt: skip
    cfg = suggest(optuna.trial.FixedTrial({"patch_size": 40, "depth": 4}), space)
    assert cfg.depth == 3 and cfg.patch_size % 2**cfg.depth == 0


def test_config_from_fits_the_depth_whichever_of_patch_size_and_depth_is_given():
    from segsearch.space import config_from

    space = parse_space({"search": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}, "s")
    assert config_from({"patch_size": 40}, space).depth == 3  # the default depth 4, fitted
    assert config_from({"depth": 6}, space).depth == 5  # to the default patch size, 64
    assert config_from({"depth": 6, "patch_size": 48}, space).depth == 4  # 6 is fitted too
    assert config_from({"depth": 1, "patch_size": 34}, space).depth == 1


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"constraints": [1]}, "'constraints' must map limits to numbers"),
        ({"constraints": {"max_foo": 1}},
         "constraints.max_foo: use max_params, max_gflop_per_patch, max_infer_ms"),
        ({"constraints": {"max_params": "x"}},
         "constraints.max_params: must be a finite float number, got 'x'"),
        ({"final": {"epochs": 0}}, "final: config field 'epochs': must be from 1 to 100000, got 0"),
        ({"final": {"epochs": "3"}}, "final: config field 'epochs': must be of type int, got '3'"),
        ({"fixed": {"depth": "3"}}, "fixed: config field 'depth': must be of type int, got '3'"),
        ({"search": {"depth": {"type": "categorical", "choices": ["a"]}}},
         "search.depth: config field 'depth': must be of type int, got 'a'"),
        ({"search": {"depth": {"type": "int", "low": 3, "high": 4}}, "fixed": {"patch_size": 36}},
         ("patch_size 36: no depth in [3, 4] divides it (a patch must be a multiple of 2**depth "
          "and at least twice it)")),
        ({"search": {"depth": {"type": "int", "low": 4, "high": 4}}, "fixed": {"patch_size": 16}},
         ("patch_size 16: no depth in [4] divides it (a patch must be a multiple of 2**depth "
          "and at least twice it)")),  # a multiple, but not twice it
        ({"search": {"depth": {"type": "int", "low": 2, "high": 7}}, "fixed": {"patch_size": 64}},
         "config field 'depth': must be from 1 to 6, got 7"),  # refused, not fitted to 5
        # the first and the last of every searched field make the corner configs
        ({"search": {"base_width": {"type": "categorical", "choices": [32, 8, 16]}},
          "fixed": {"max_width": 16}},
         "config field 'max_width': must be at least base_width (32), got 16"),
        ({"search": {"base_width": {"type": "categorical", "choices": [8, 16, 32]}},
          "fixed": {"max_width": 16}},
         "config field 'max_width': must be at least base_width (32), got 16"),
    ],
)  # fmt: skip
def test_section_errors_name_the_section_and_field(extra, message):
    base = {"search": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}
    with pytest.raises(UserError) as e:
        parse_space({**base, **extra}, "s.yaml")
    assert str(e.value) == f"s.yaml: {message}"


@pytest.mark.parametrize(
    "study,message",
    [
        ([1], "'study' must be a mapping"),
        ({"n_trials": "x"}, "study.n_trials: must be a finite int number, got 'x'"),
        ({"n_trials": 1.5}, "study.n_trials: must be a finite int number, got 1.5"),
        ({"n_trials": 0}, "study.n_trials: must be at least 1"),
        ({"top_k": "x"}, "study.top_k: must be a finite int number, got 'x'"),
        ({"top_k": 0}, "study.top_k: must be at least 1"),
        ({"timeout": "x"}, "study.timeout: must be a finite float number, got 'x'"),
    ],
)
def test_study_section_errors(study, message):
    lr = {"lr": {"type": "float", "low": 0.01, "high": 0.1}}
    with pytest.raises(UserError) as e:
        parse_space({"search": lr, "study": study}, "s.yaml")
    assert str(e.value) == f"s.yaml: {message}"


def test_study_section_smallest_values():
    lr = {"lr": {"type": "float", "low": 0.01, "high": 0.1}}
    space = parse_space({"search": lr, "study": {"n_trials": 1.0, "top_k": 1, "timeout": 0}}, "s")
    assert (space.n_trials, space.top_k, space.timeout) == (1, 1, 0.0)
    assert type(space.n_trials) is int and type(space.timeout) is float


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"other": 1}, "unknown section 'other' (use search, fixed, study, final, promote, constraints)"),
        ({"fixed": [1]}, "'fixed' must map config fields to values"),
        ({"final": [1]}, "'final' must map config fields to values"),
        ({"search": {"arch": {"type": "categorical", "choices": [[1]]}}},
         "search.arch.choices: must hold plain values, got [1]"),
        ({"search": {"arch": {"type": "categorical", "choices": ["1e-4"]}}},
         "search.arch.choices: '1e-4' is a string to YAML; write it with a dot, e.g. 1.0e-4"),
        ({"search": {"lr": {"type": "float", "low": 0.1, "high": 0.2, "log": "yes"}}},
         "search.lr.log: must be true or false, got 'yes'"),
        ({"search": {"lr": {"type": "float", "low": 0.1, "high": 0.2, "step": "x"}}},
         "search.lr.step: must be a finite float number, got 'x'"),
        ({"search": {"lr": {"type": "float", "low": 0.1, "high": 0.2, "step": 0}}},
         "search.lr.step: must be above 0, got 0.0"),
        ({"search": {"lr": {"type": "float", "low": 0.1, "high": 0.2, "step": 0.05, "log": True}}},
         "search.lr: step and log cannot be used together"),
        ({"constraints": {"max_params": 0}}, "constraints.max_params: must be above 0"),
        ({"study": {"warm_start": "yes"}}, "study.warm_start: true, false or a mapping of searched fields to values"),
        ({"final": {"seed": 3}},
         "final.seed: the final fit keeps the study's value; set other fields there"),
        ({"promote": {"seed": 3}},
         "promote.seed: the promotion stage keeps the study's value; set other fields there"),
        ({"promote": {"lr": 0.05}},
         "promote.lr: the promotion stage keeps the winner's value; set other fields there"),
        ({"promote": [1]}, "'promote' must map config fields to values"),
        ({"promote": {"epochs": "x"}}, "promote: config field 'epochs': must be of type int, got 'x'"),
        ({"final": {"ensemble": "x"}}, "final.ensemble: must be a finite int number, got 'x'"),
        ({"final": {"ensemble": 0}}, "final.ensemble: 1 (the winner alone) or more finalists"),
        ({"study": {"warm_start": {"lr": 5.0}}},
         "study.warm_start.lr: 5.0 is not a value the search samples"),
        ({"final": {"seconds": 60}, "promote": {"epochs": 2}},
         "promote.epochs: the final budget is in seconds (60); set promote.seconds"),
        ({"search": {"depth": {"type": "int", "low": 3, "high": 4}}, "fixed": {"val_patch_size": 40}},
         "val_patch_size 40: must be a multiple of 2**4 = 16, as trials of depth 4 score on it"),
    ],
)  # fmt: skip
def test_section_and_distribution_errors_exactly(raw, message):
    lr = {"lr": {"type": "float", "low": 0.01, "high": 0.1}}
    with pytest.raises(UserError) as e:
        parse_space({"search": lr, **raw}, "s.yaml")
    assert str(e.value) == f"s.yaml: {message}"


def test_a_range_of_one_value_is_allowed():
    space = parse_space({"search": {"lr": {"type": "float", "low": 0.1, "high": 0.1}}}, "s")
    assert (space.search["lr"]["low"], space.search["lr"]["high"]) == (0.1, 0.1)


def test_validation_patch_size_defaults_to_the_largest_patch():
    lr = {"lr": {"type": "float", "low": 0.01, "high": 0.1}}
    assert (
        parse_space({"search": lr, "fixed": {"patch_size": 48}}, "s").fixed["val_patch_size"] == 48
    )
    assert parse_space({"search": lr}, "s").fixed["val_patch_size"] == 64  # TrialConfig's
    patch = {"patch_size": {"type": "categorical", "choices": [32, 96, 64]}}
    assert parse_space({"search": patch}, "s").fixed["val_patch_size"] == 96


def test_grid_lists_the_values_a_distribution_can_take():
    """What the space's checks try: every int of a short range (by its step), the ends of a
    long one or of a float range, every choice."""
    from segsearch.distributions import grid as _grid

    assert _grid({"type": "int", "low": 1, "high": 7, "step": 2}) == [1, 3, 5, 7]
    assert _grid({"type": "int", "low": 0, "high": 20_000, "step": 1}) == [0, 20_000]
    assert len(_grid({"type": "int", "low": 1, "high": 10_000, "step": 1})) == 10_000  # listed
    assert _grid({"type": "int", "low": 1, "high": 10_001, "step": 1}) == [1, 10_001]
    assert _grid({"type": "float", "low": 0.1, "high": 0.2, "step": None}) == [0.1, 0.2]
    assert _grid({"type": "categorical", "choices": [32, 64]}) == [32, 64]


def test_suggest_passes_log_and_step_to_optuna():
    """The distributions a trial records (what TPE models and the dashboard shows) are the
    space's: log scale and step included, for floats and ints."""
    space = parse_space({"search": {
        "lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True},
        "aug_strength": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25},
        "base_width": {"type": "int", "low": 4, "high": 16, "log": True},
        "depth": {"type": "int", "low": 1, "high": 3, "step": 2},
    }, "fixed": {"patch_size": 64}}, "space.yaml")  # fmt: skip
    study = optuna.create_study()
    suggest(study.ask(), space)
    d = study.trials[0].distributions
    assert d["lr"] == optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)
    assert d["aug_strength"] == optuna.distributions.FloatDistribution(0.0, 1.0, step=0.25)
    assert d["base_width"] == optuna.distributions.IntDistribution(4, 16, log=True)
    assert d["depth"] == optuna.distributions.IntDistribution(1, 3, step=2)


def test_every_sampled_trial_is_valid(tmp_path):
    space = load_space(ROOT / "search_spaces" / "quick.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        cfg = suggest(study.ask(), space)
        assert cfg.patch_size % 2**cfg.depth == 0 and cfg.patch_size >= 2 * 2**cfg.depth


BAD = [
    ("search: [1, 2", "not valid YAML at line"),
    ("- a\n- b", "must be a mapping"),
    ("search: {}", "'search' must map config fields"),
    ("search: {lr: {type: float, low: 0.1, high: 0.2}}\nextra: 1", "unknown section 'extra'"),
    ("search: {lrr: {type: float, low: 0.1, high: 0.2}}", "unknown config field 'lrr'"),
    ("search: {lr: {type: float, low: 0.2, high: 0.1}}", "search.lr: low \\(0.2\\) must not exceed"),
    ("search: {lr: {type: float, low: 1e-4, high: 0.1}}", "search.lr.low: '1e-4' is a string"),
    ("search: {lr: {type: float, low: abc, high: 0.1}}", "search.lr.low: must be a finite float"),
    ("search: {lr: {type: real, low: 0.1, high: 0.2}}", "search.lr: must be {type: float"),
    ("search: {lr: {type: float, low: 0.1, high: 0.2, lg: true}}", "unknown key 'lg'"),
    ("search: {lr: {type: float, low: 0.0, high: 0.2, log: true}}", "log scale needs low > 0"),
    ("search: {lr: {type: float, high: 0.2}}", "search.lr: needs 'low'"),
    ("search: {depth: {type: int, low: 1.5, high: 3}}", "search.depth.low: must be a finite int"),
    ("search: {depth: {type: int, low: 1, high: 9}}", "field 'depth': must be from 1 to 6"),
    ("search: {arch: {type: categorical, choices: []}}", "choices: must be a non-empty list"),
    ("search: {lr: {type: float, low: 0.1, high: 0.2}}\nfixed: {lr: 0.1}", "both searched and fixed"),
    ("search: {lr: {type: float, low: 0.1, high: 0.2}}\nfixed: {depth: '3'}", "'depth': must be of type int"),
    ("search: {seed: {type: int, low: 0, high: 3}}", "'seed' cannot be searched"),
    (
        "search: {patch_size: {type: categorical, choices: [36]}, depth: {type: int, low: 3, high: 4}}",
        "patch_size 36: no depth in \\[3, 4\\] divides it",
    ),
    ("search: {lr: {type: float, low: 0.1, high: 0.2}}\nstudy: {n_trials: 0}", "n_trials: must be at least 1"),
    ("search: {lr: {type: float, low: 0.1, high: 0.2}}\nstudy: {sampler: grid}", "sampler.name: must be one of"),
    ("search: {lr: {type: float, low: 0.1, high: 0.2}}\nstudy: {pruner: {name: asha, foo: 1}}", "only 'name' and 'args'"),
    ("search: {lr: {type: float, low: 0.1, high: 0.2}}\nstudy: {budget: 3}", "unknown key 'study.budget'"),
    ("search: {lr: {type: float, low: 0.1, high: 0.2}}\nstudy: {metric: loss}", "only patch_miou"),
]  # fmt: skip


@pytest.mark.parametrize("text,message", BAD)
def test_validation_errors_name_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=message) as info:
        load_space(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "search:\n  lr: {}\n  depth: {}\n  lr: {}\n",
            "not valid YAML at line 4 (key 'lr' repeated)",
        ),
        (
            "search:\n  - a: 1\n    a: 2\n",
            "not valid YAML at line 3 (key 'a' repeated)",
        ),  # in a list
        (
            "search: [1, 2\n",
            "not valid YAML at line 2 (expected ',' or ']', but got '<stream end>')",
        ),
        ("a: \x07\n", "not valid YAML"),  # a reader error: no line, no problem
    ],
)
def test_yaml_errors_give_the_line_and_the_problem(tmp_path, text, message):
    with pytest.raises(UserError) as info:
        load_space(write(tmp_path, text))
    assert str(info.value) == f"{tmp_path / 'space.yaml'}: {message}"


def test_unreadable_file_names_the_reason(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    for name, reason in (
        ("folder.yaml", "IsADirectoryError"),
        ("binary.yaml", "UnicodeDecodeError"),
    ):
        with pytest.raises(UserError) as info:
            load_space(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: cannot read ({reason})"


def test_sampler_and_pruner_args_are_checked_when_the_space_is_loaded(tmp_path):
    from segsearch.space import build_sampler

    with pytest.raises(UserError, match="study.pruner.args"):
        load_space(write(tmp_path, GOOD.replace("n_startup_trials: 2", "bogus: 2")))
    assert isinstance(build_sampler(load_space(write(tmp_path, GOOD)), 0),
                      optuna.samplers.RandomSampler)  # fmt: skip


def test_limits_and_the_largest_patch_are_the_spaces():
    from segsearch.space import largest_patch

    patch = {"patch_size": {"type": "categorical", "choices": [32, 96, 64]}}
    space = parse_space({"search": patch, "constraints": {"max_params": 1000}}, "s")
    assert space.constraints == {"max_params": 1000.0} and largest_patch(space) == 96
    lr = {"lr": {"type": "float", "low": 0.01, "high": 0.1}}
    assert largest_patch(parse_space({"search": lr, "fixed": {"patch_size": 48}}, "s")) == 48
    two = {"search": lr, "final": {"ensemble": 2, "train_on": "train"}, "study": {"finalists": 2}}
    assert parse_space(two, "s").ensemble == 2
