from dataclasses import fields

import pytest
import yaml

from components.config import (
    CONF_DIR,
    GROUPS,
    NEVER_REMOTE,
    SUBGROUPS,
    Config,
    ConfigError,
    OverrideNotAllowed,
    check_remote_overrides,
    compose,
    group_options,
    to_dict,
)


def all_options():
    return [(g, o) for g, opts in group_options().items() for o in opts if o != "schema"]


def test_every_group_has_options():
    opts = group_options()
    assert set(opts) == {*GROUPS, *SUBGROUPS}
    for group, names in opts.items():
        assert [n for n in names if n != "schema"], f"conf/{group}/ has no options"


@pytest.mark.parametrize("group,option", all_options())
def test_composes_every_option_of_every_group(group, option):
    cfg = compose([f"{group}={option}"])
    assert isinstance(cfg, Config)
    node, d = cfg, to_dict(cfg)
    for key in group.split("/"):  # ppo/guide -> cfg.ppo.guide
        node, d = getattr(node, key), d[key]
    # Typed: the group's dataclass, every field set (no MISSING left)
    assert set(d) == {f.name for f in fields(node)}


def test_every_yaml_option_starts_from_the_schema():
    for group in (*GROUPS, *SUBGROUPS):
        for path in (CONF_DIR / group).glob("*.yaml"):
            defaults = yaml.safe_load(path.read_text())["defaults"]
            assert defaults[0] == "schema", f"{path} must extend the {group} schema first"


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


# ---- what a triggered or remote run may override (issues 12, 38: deny by default, bounded values) ----
DEFAULT_ALLOWED = compose([]).infra.remote_overrides
REMOTE_OK = [
    "ppo.steps=3",
    "+ppo.steps=3",
    "++ppo.steps=3",
    "ppo.lora.r=4",
    "ppo.lora={r:4,alpha:8}",
    "ppo={steps:3}",
    "ppo.ptx_coef=0.2",
    "ppo.kl_controller=fixed",
    "policy=grpo",
    "policy.dpo.beta=0.5",
    "reward.ensemble=2",
    "seed=7",
]
REMOTE_REFUSED = [
    ("ppo.reward_fn=os.system", "*_fn"),
    ("ppo.reward_fn='os:system'", "*_fn"),
    ("+ppo.reward_fn=os:system", "*_fn"),
    ("++ppo.reward_fn=os:system", "*_fn"),
    ("~ppo.reward_fn", "*_fn"),
    ("ppo={reward_fn:'os:system'}", "*_fn"),
    ("gate.judge=os:system", "gate.judge"),
    ("model.trust_remote_code=true", "*trust_remote_code"),
    ("++model.trust_remote_code=true", "*trust_remote_code"),
    ("model={trust_remote_code:true}", "*trust_remote_code"),
    ("root=/tmp/elsewhere", "root"),
    ("infra.state_dir=/tmp/x", "infra.state_dir"),
    ("infra.remote_overrides=[*]", "infra.remote_overrides*"),
    ("+infra.remote_overrides=[*]", "infra.remote_overrides*"),
    ("hydra.searchpath=[file:///tmp]", "hydra*"),
    # names weights, a host, a file or a URI: never (issue 38), the guide included
    ("ppo.guide.model=http://127.0.0.1:9/guide", "ppo.guide*"),
    ("ppo.guide.model='runs:/abc/model'", "ppo.guide*"),
    ("ppo/guide=rollin", "ppo.guide*"),
    ("ppo.guide={model:reference,rollin_prob:0.5}", "ppo.guide*"),
    ("model.name_or_path=evil/model", "*name_or_path"),
    ("tracking.uri=http://evil:5000", "*uri"),
    ("infra.dvc_remote_url=s3://evil", "*url"),
    ("data.dir=data/../../../tmp/x", "*dir"),
    # not listed by default: the gate's thresholds and measurement, the registry, SFT (the guard's baseline), data
    ("gate.min_win_rate=0", "not listed"),
    ("gate.max_prompts=1", "not listed"),
    ("registry.include_reward_model=false", "not listed"),
    ("sft.learning_rate=1e-3", "not listed"),
    ("data.n_preferences=100", "not listed"),
    ("model=small", "not listed"),
    ("ppo.reward_fn_weight=0.5", "not listed"),
    ("tracking.run_name_prefix=nightly-", "not listed"),
    # listed, but out of bounds or of the wrong type
    ("ppo.steps=100000", "outside 1..1000"),
    ("ppo.steps=3.5", "an integer"),
    ("ppo.steps=true", "an integer"),
    ("ppo.learning_rate=abc", "a number"),
    ("ppo.kl_controller=evil", "not one of pid, ziegler, fixed"),
    ("policy=evil", "not an option of the group `policy`"),
    ("model=../../../../tmp/x", "not an option of the group `model`"),  # found in review: composed a host's file
    ("reward.ensemble=0", "outside 1..8"),
    ("~ppo.max_approx_kl", "a deletion"),
    ("tracking.run_name_prefix=${oc.env:AWS_SECRET_ACCESS_KEY}", "interpolation"),
    ("model@_global_=tiny", "package override"),
    ("not an override ]", "not a Hydra override"),
]


@pytest.mark.parametrize("override", REMOTE_OK)
def test_the_default_allow_list_lets_stage_settings_through(override):
    check_remote_overrides([override], DEFAULT_ALLOWED)


@pytest.mark.parametrize("override,rule", REMOTE_REFUSED)
def test_remote_overrides_refused_with_the_rule(override, rule):
    with pytest.raises(OverrideNotAllowed) as e:
        check_remote_overrides(["ppo.steps=3", override], DEFAULT_ALLOWED)
    msg = str(e.value)
    assert f"  {override}: " in msg and rule in msg and "ppo.steps=3:" not in msg
    assert "infra.remote_overrides" in msg and "`rlhf serve` command line" in msg  # the setting and what to do


def test_every_refused_override_is_named_at_once():
    with pytest.raises(OverrideNotAllowed) as e:
        check_remote_overrides(["ppo.reward_fn=a:b", "root=/", "seed=1"], DEFAULT_ALLOWED)
    assert "ppo.reward_fn=a:b:" in str(e.value) and "root=/:" in str(e.value) and "seed=1:" not in str(e.value)


@pytest.mark.parametrize(
    "override", ["ppo.reward_fn=os:system", "model.trust_remote_code=true", "root=/", "gate.judge=a:b"]
)
def test_the_never_list_beats_any_allow_list(override):
    with pytest.raises(OverrideNotAllowed, match="never overridable"):
        check_remote_overrides([override], ["*", "*.*", "ppo.reward_fn", "model.*", "root"])


def test_nothing_is_allowed_by_an_empty_allow_list():
    with pytest.raises(OverrideNotAllowed, match="not listed"):
        check_remote_overrides(["seed=1"], [])
    check_remote_overrides([], [])


def test_the_default_allow_list_never_matches_an_import_path_setting():
    """Every `_fn` field of the schema (and gate.judge) is refused with the defaults, whatever the syntax."""
    import dataclasses

    cfg = compose([])
    fn_keys = [
        f"{group}.{f.name}"
        for group in GROUPS
        for f in dataclasses.fields(getattr(cfg, group))
        if f.name.endswith("_fn") or f.name == "judge"
    ]
    assert "ppo.reward_fn" in fn_keys and "gate.judge" in fn_keys
    for key in fn_keys:
        for override in (f"{key}=os:system", f"+{key}=os:system", f"++{key}=os:system", f"~{key}"):
            with pytest.raises(OverrideNotAllowed):
                check_remote_overrides([override], cfg.infra.remote_overrides)
    assert set(NEVER_REMOTE) >= {"*_fn", "*trust_remote_code", "root", "infra.state_dir", "infra.remote_overrides*"}


def test_a_remote_value_may_only_make_the_gates_evidence_stronger():
    """Issue 38: a run may raise the operator's ensemble or tighten a gate threshold the operator lists, never the
    reverse, and never switch a check off."""
    operator = compose(["reward.ensemble=3", "gate.min_win_rate=0.6", "gate.max_kl=10"])
    allowed = [*DEFAULT_ALLOWED, "gate.min_win_rate", "gate.max_kl", "gate.min_judge_gain"]
    check_remote_overrides(["reward.ensemble=4", "gate.min_win_rate=0.7", "gate.max_kl=5"], allowed, base=operator)
    for weaker, why in (
        ("reward.ensemble=1", "weaker than the operator's 3"),
        ("gate.min_win_rate=0.5", "weaker than the operator's 0.6"),
        ("gate.max_kl=20", "weaker than the operator's 10"),
        ("gate.min_judge_gain=null", "may not switch off the operator's check"),
    ):
        with pytest.raises(OverrideNotAllowed, match=why):
            check_remote_overrides([weaker], allowed, base=operator)


def test_the_allow_list_is_exact_keys_with_bounds():
    """No wildcards: `ppo.*` in the list allows nothing; a listed key without bounds in the schema is still refused."""
    with pytest.raises(OverrideNotAllowed, match="`ppo.steps` is not listed"):
        check_remote_overrides(["ppo.steps=3"], ["ppo.*"])
    with pytest.raises(OverrideNotAllowed, match="no bounds in the schema"):
        check_remote_overrides(["sft.max_steps=3"], ["sft.max_steps"])


def test_every_bounded_key_is_a_key_of_the_schema():
    from components.config import REMOTE_BOUNDS, _value_at

    cfg = compose([])
    missing = [k for k in REMOTE_BOUNDS if k not in GROUPS and _value_at(cfg, k) is None and "gate." not in k]
    assert not missing, missing
    assert all(k in REMOTE_BOUNDS for k in DEFAULT_ALLOWED)


def test_the_gates_degeneration_thresholds_are_the_frontiers_and_the_documented_ones():
    """Issue 42: the guard's thresholds in conf/gate are the ones benchmarks/frontier.py computed from SFT's spread
    (benchmarks/results/frontier.json), and docs/training.md states them. Either changed without the other fails."""
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    measured = json.loads((repo / "benchmarks" / "results" / "frontier.json").read_text())["gate"]
    gate, manual = to_dict(compose([]))["gate"], to_dict(compose(["gate=manual"]))["gate"]
    assert manual == {**gate, "approval": "manual"}, "gate=manual keeps the default gate's thresholds"
    training = (repo / "docs" / "training.md").read_text()
    for key in ("max_repeated_word_gain", "min_distinct_2_ratio"):
        assert gate[key] == pytest.approx(measured[key]), (
            f"gate.{key} is {gate[key]}, the frontier measured {measured[key]}"
        )
        assert f"`gate.{key}` ({measured[key]:g})" in training, f"docs/training.md does not state gate.{key}"
