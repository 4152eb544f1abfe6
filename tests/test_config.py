from dataclasses import fields

import pytest

from components.config import CONF_DIR, GROUPS, Config, ConfigError, compose, group_options, to_dict


def all_options():
    return [(g, o) for g, opts in group_options().items() for o in opts if o != "schema"]


def test_every_group_has_options():
    opts = group_options()
    assert set(opts) == set(GROUPS)
    for group, names in opts.items():
        assert [n for n in names if n != "schema"], f"conf/{group}/ has no options"


@pytest.mark.parametrize("group,option", all_options())
def test_composes_every_option_of_every_group(group, option):
    cfg = compose([f"{group}={option}"])
    assert isinstance(cfg, Config)
    node = getattr(cfg, group)
    # Typed: the group's dataclass, every field set (no MISSING left)
    d = to_dict(cfg)[group]
    assert set(d) == {f.name for f in fields(node)}


def test_every_yaml_option_starts_from_the_schema():
    for group in GROUPS:
        for path in (CONF_DIR / group).glob("*.yaml"):
            assert "defaults: [schema]" in path.read_text(), f"{path} must extend the {group} schema"


def test_overrides_apply_and_are_typed():
    cfg = compose(["model=small", "data.n_eval=7", "ppo.steps=3"])
    assert (cfg.model.name, cfg.data.n_eval, cfg.ppo.steps) == ("small", 7, 3)
    assert isinstance(cfg.data.n_eval, int)


@pytest.mark.parametrize("override", ["model=nope", "data.n_eval=abc", "data.no_such_field=1"])
def test_bad_overrides_raise_config_error(override):
    with pytest.raises(ConfigError):
        compose([override])


def test_paths_derive_from_root(tmp_path):
    cfg = compose([f"root={tmp_path}"])
    assert cfg.state_path == tmp_path / ".rlhf"
    assert cfg.data_path == tmp_path / "data"
