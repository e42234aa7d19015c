import pytest

from sopq.io import atomic_path


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "plan.parquet"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.parquet"]


def test_leftovers_of_a_killed_write_are_removed_by_the_next_one(tmp_path):
    # What SIGKILL leaves: atomic_path's temporary folder, never cleaned up by its own process.
    (tmp_path / ".packed.k1ll3d_x" / "packed").mkdir(parents=True)
    (tmp_path / ".packed.extra.k1ll3d_x").mkdir()  # another output's temporary ("packed.extra"): kept
    with atomic_path(tmp_path / "packed") as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".packed.extra.k1ll3d_x", "packed"]
