"""csi_kit.linux.paths: caller paths are opened with no symlink followed in any
component, with openat2 and with the O_NOFOLLOW walk it falls back to."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_kit.linux import paths


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run each test with openat2 and again with the fallback walk."""
    monkeypatch.setattr(paths, "_openat2_works", None if request.param == "openat2" else False)
    yield str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """real/dir/file, a link to real/dir, a link to the file, and a dangling link."""
    (tmp_path / "real" / "dir").mkdir(parents=True)
    (tmp_path / "real" / "dir" / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "dir")
    (tmp_path / "filelink").symlink_to(tmp_path / "real" / "dir" / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    return tmp_path


def test_opens_a_plain_path(tree: Path, resolver: str) -> None:
    with paths.opened(str(tree / "real" / "dir" / "file")) as fd:
        assert os.fstat(fd).st_ino == os.stat(tree / "real" / "dir" / "file").st_ino


@pytest.mark.parametrize("rel", ["link", "link/file", "filelink", "dangling", "dangling/x"])
def test_a_symlink_anywhere_is_refused(tree: Path, resolver: str, rel: str) -> None:
    with pytest.raises(InvalidArgument, match="symlink"):
        paths.open_nofollow(str(tree / rel), field="target_path")


def test_missing_and_non_directory_components(tree: Path, resolver: str) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        paths.open_nofollow(str(tree / "real" / "missing" / "x"))
    with pytest.raises(InvalidArgument, match="not a directory"):
        paths.open_nofollow(str(tree / "real" / "dir" / "file" / "x"))


def test_dot_dot_and_relative_paths_are_refused(tree: Path) -> None:
    for bad in (str(tree / "real" / ".." / "real"), "relative/path"):
        with pytest.raises(InvalidArgument):
            paths.open_nofollow(bad)


def test_make_target_creates_once_and_reports_it(tree: Path, resolver: str) -> None:
    target = str(tree / "real" / "t")
    assert paths.make_target(target, directory=True) is True
    assert os.path.isdir(target)
    assert paths.make_target(target, directory=True) is False
    block = str(tree / "real" / "b")
    assert paths.make_target(block, directory=False) is True
    assert os.path.isfile(block)
    with pytest.raises(InvalidArgument, match="a block volume is published on a file"):
        paths.make_target(target, directory=False)
    with pytest.raises(InvalidArgument, match="not a directory"):
        paths.make_target(block, directory=True)


def test_make_target_never_goes_through_a_link(tree: Path, resolver: str) -> None:
    with pytest.raises(InvalidArgument, match="symlink"):
        paths.make_target(str(tree / "link" / "new"), directory=True)
    assert not (tree / "real" / "dir" / "new").exists()
    with pytest.raises(InvalidArgument, match="symlink"):
        paths.make_target(str(tree / "filelink"), directory=False)
    with pytest.raises(NotFound):
        paths.make_target(str(tree / "missing" / "new"), directory=True)


def test_lstat_sees_the_link_itself(tree: Path, resolver: str) -> None:
    st = paths.lstat(str(tree / "link"))
    assert st is not None and os.path.islink(tree / "link")
    assert paths.lstat(str(tree / "real" / "absent")) is None
    with pytest.raises(InvalidArgument, match="symlink"):
        paths.lstat(str(tree / "link" / "file"))


def test_remove_target_removes_only_what_it_may(tree: Path, resolver: str) -> None:
    empty = tree / "real" / "empty"
    empty.mkdir()
    paths.remove_target(str(empty))
    assert not empty.exists()
    paths.remove_target(str(empty))  # gone already: success
    with pytest.raises(FailedPrecondition, match="ENOTEMPTY"):
        paths.remove_target(str(tree / "real" / "dir"))
    # Through a link in the parents: refused, the file stays.
    with pytest.raises(InvalidArgument, match="symlink"):
        paths.remove_target(str(tree / "link" / "file"))
    assert (tree / "real" / "dir" / "file").exists()


def test_identity_of_a_path(tree: Path, resolver: str) -> None:
    st = os.stat(tree / "real" / "dir")
    assert paths.identity(str(tree / "real" / "dir")) == (st.st_dev, st.st_ino)
