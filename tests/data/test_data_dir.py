"""Issue 28, item 5: data.dir is judged on its resolved path. A `..` out of the project, or a data/ that is a
symlink out of it, would let DVC version (and a retrain snapshot) content from outside the project under an md5
that says otherwise: refused in one sentence before DVC touches anything."""

import pytest

from components.data.demo import write_demo
from components.data.versioning import DataVersionError, ensure_data, pinned_data
from tests.conftest import make_project


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_a_data_dir_outside_the_project_is_refused(tmp_path, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_demo(make_project(tmp_path / "other").data, outside)
    if how == "dotdot":
        cfg = make_project(tmp_path / "proj", "data.dir=data/../../outside")
    else:
        cfg = make_project(tmp_path / "proj")
        (tmp_path / "proj" / "data").symlink_to(outside, target_is_directory=True)
    for step in (ensure_data, pinned_data):
        with pytest.raises(DataVersionError) as e:
            step(cfg)
        msg = str(e.value)
        assert "outside the project root" in msg and "set data.dir to a folder inside the project" in msg, msg
        assert "\n" not in msg
    assert not (tmp_path / "proj" / ".dvc").exists() and not (tmp_path / "proj" / "data.dvc").exists()


def test_a_data_dir_inside_the_project_with_dots_is_the_same_dir(tmp_path):
    cfg = make_project(tmp_path / "proj", "data.dir=sub/../data")
    state = ensure_data(cfg)
    assert state.rows["demonstrations"] > 0 and (tmp_path / "proj" / "data.dvc").exists()
