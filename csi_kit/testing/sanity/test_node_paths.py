"""Node paths as an attacker (or a buggy caller) sends them.

In a DaemonSet the node service runs privileged with Bidirectional mount
propagation, so a target path that the driver mounts over, unmounts by
prefix or removes reaches the host.  These tests send what the kubelet never
should but anyone with the socket can:

* a target or staging path that is a symlink, or that goes through one (to
  a canary directory the suite owns, and to a file): refused, nothing
  mounted at the link or where it points, link and canary intact;
* a path that is `/` or not normal (`..`, `.`, `//`, a trailing `/`):
  INVALID_ARGUMENT from Publish, Unpublish, Stage and Unstage, and the mount
  table unchanged — `NodeUnpublishVolume(target_path="/")` must not unmount
  anything, even with a volume published;
* a target inside the driver's own roots (`driver_roots`): refused;
* unpublish/unstage of a directory the driver never published: answered
  without removing it;
* unpublish/unstage through a symlink to a real target: the real mount
  stays (it is not the driver's to undo through a link).

"Nothing changed" is read from /proc/self/mountinfo, so the suite must share
the driver's mount namespace, and that namespace must not be the machine's:
these tests skip in the initial mount namespace unless the configuration
allows it (see docs/conformance.md).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import (
    C,
    Canary,
    CtrlCap,
    NodeCap,
    Published,
    Resources,
    SanityContext,
    call_ok_or,
    expect_error,
    is_mountpoint,
    mounts_unchanged,
)
from csi_kit.testing.sanity.test_hostile import _Alive

__all__ = [
    "TestNodeSymlinkPaths",
    "TestNodeUndoThroughSymlink",
    "TestNodeAbnormalPaths",
    "TestNodePathsInDriverRoots",
    "TestNodeNeverPublishedPaths",
    "TestNodeTargetOwnership",
]

#: What a refused symlinked path may answer: the spec has no row for it.
LINK_CODES = (C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.NOT_FOUND)
#: What a target inside the driver's own roots may answer.
ROOT_CODES = (C.INVALID_ARGUMENT, C.FAILED_PRECONDITION)

#: Where the symlink sits and what it points at.
LINK_KINDS = ("last-dir", "last-file", "parent-dir", "parent-file")
#: Abnormal spellings of a path.
SHAPES = ("root", "dotdot", "dot", "double-slash", "trailing-slash")


class _NodePathAttack(_Alive):
    @pytest.fixture(autouse=True)
    def _private_namespace(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_private_mount_namespace()


def _volume(ctx: SanityContext, res: Resources) -> tuple[str, str, dict[str, str]]:
    """A new volume, controller-published and staged where the driver needs
    it: (volume id, staging path or '', publish context)."""
    ctx.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
    vid = res.create_volume().volume_id
    pctx = res.controller_publish(vid)
    return vid, res.stage(vid, pctx), pctx


def _stage_request(ctx: SanityContext, vid: str, path: str, pctx: dict[str, str]) -> Any:
    return pb.NodeStageVolumeRequest(
        volume_id=vid,
        staging_target_path=path,
        volume_capability=ctx.capability(),
        publish_context=pctx,
        secrets=ctx.config.secrets_for("NodeStageVolume"),
    )


def _linked(ctx: SanityContext, res: Resources, kind: str) -> tuple[Canary, str, str, str]:
    """A canary the suite owns and a path that reaches it through a symlink.

    Returns (canary, link, where the link points, the path to send).  With
    the link as the last component the path is the link; as a parent, the
    path continues below it (to the canary's existing `victim` directory, or
    below a file).
    """
    canary = Canary.create(ctx.scratch("link-canary-", res.workdir))
    link = os.path.join(res.workdir, f"link-{uuid.uuid4().hex[:6]}")
    file = os.path.join(canary.victim, "file")
    dest, path = {
        "last-dir": (canary.victim, link),
        "last-file": (file, link),
        "parent-dir": (canary.root, os.path.join(link, "victim")),
        "parent-file": (file, os.path.join(link, "target")),
    }[kind]
    os.symlink(dest, link)
    return canary, link, dest, path


def _assert_untouched(canary: Canary, link: str, dest: str) -> None:
    assert os.path.islink(link) and os.readlink(link) == dest, f"the symlink {link} was changed or removed"
    canary.assert_intact()


def abnormal(path: str, shape: str) -> str:
    """`path` (absolute and normal, its parent existing) spelled the abnormal
    way `shape`: the kernel resolves each spelling but `root` to `path`."""
    parent, base = os.path.split(path)
    return {
        "root": "/",
        "dotdot": f"{parent}/../{os.path.basename(parent)}/{base}",
        "dot": f"{parent}/./{base}",
        "double-slash": f"{parent}//{base}",
        "trailing-slash": f"{path}/",
    }[shape]


@pytest.mark.privileged
@pytest.mark.parametrize("kind", LINK_KINDS)
class TestNodeSymlinkPaths(_NodePathAttack):
    """Symlinks at or above a target/staging path (issue: a volume
    bind-mounted over /etc, over the driver's root, over another volume)."""

    def test_publish(self, csi_sanity: SanityContext, csi_resources: Resources, kind: str) -> None:
        vid, staging, pctx = _volume(csi_sanity, csi_resources)
        canary, link, dest, path = _linked(csi_sanity, csi_resources, kind)
        req = csi_resources.publish_request(vid, path, staging, publish_context=pctx)
        csi_resources.published.append((vid, path))
        with mounts_unchanged(f"NodePublishVolume through a symlink ({kind})"):
            expect_error(csi_sanity.node.NodePublishVolume, req, LINK_CODES)
        _assert_untouched(canary, link, dest)

    def test_stage(self, csi_sanity: SanityContext, csi_resources: Resources, kind: str) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vid = csi_resources.create_volume().volume_id
        pctx = csi_resources.controller_publish(vid)
        canary, link, dest, path = _linked(csi_sanity, csi_resources, kind)
        csi_resources.staged.append((vid, path))
        with mounts_unchanged(f"NodeStageVolume through a symlink ({kind})"):
            expect_error(
                csi_sanity.node.NodeStageVolume, _stage_request(csi_sanity, vid, path, pctx), LINK_CODES
            )
        _assert_untouched(canary, link, dest)


@pytest.mark.privileged
class TestNodeUndoThroughSymlink(_NodePathAttack):
    """Unpublish/unstage through a link to a real target must not undo it:
    only a mount at exactly the path the driver made is its to remove."""

    def test_unpublish(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        vid, staging, pctx = _volume(csi_sanity, csi_resources)
        req = csi_resources.publish_request(vid, csi_resources.target_path(), staging, publish_context=pctx)
        csi_resources.node_publish(req)
        link = os.path.join(csi_resources.workdir, "link-to-target")
        os.symlink(req.target_path, link)
        with mounts_unchanged("NodeUnpublishVolume through a symlink to the published target"):
            call_ok_or(
                csi_sanity.node.NodeUnpublishVolume,
                pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=link),
                (C.INVALID_ARGUMENT,),
            )
        assert os.path.islink(link), f"NodeUnpublishVolume removed the caller's symlink {link}"

    def test_unstage(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        vid, staging, _pctx = _volume(csi_sanity, csi_resources)
        link = os.path.join(csi_resources.workdir, "link-to-staging")
        os.symlink(staging, link)
        with mounts_unchanged("NodeUnstageVolume through a symlink to the staging path"):
            call_ok_or(
                csi_sanity.node.NodeUnstageVolume,
                pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=link),
                (C.INVALID_ARGUMENT,),
            )
        assert os.path.islink(link), f"NodeUnstageVolume removed the caller's symlink {link}"


@pytest.mark.privileged
@pytest.mark.parametrize("shape", SHAPES)
class TestNodeAbnormalPaths(_NodePathAttack):
    """`/` and paths that are not normal: INVALID_ARGUMENT, nothing touched.

    The unpublish and unstage cases aim at a real published/staged path
    (each spelling but `/` resolves to it): a driver that normalises, or
    unmounts everything under the path, is caught undoing that mount.
    """

    def test_publish(self, csi_sanity: SanityContext, csi_resources: Resources, shape: str) -> None:
        vid, staging, pctx = _volume(csi_sanity, csi_resources)
        target = csi_resources.target_path()
        bad = abnormal(target, shape)
        if shape != "root":  # never ask a cleanup to unpublish "/"
            csi_resources.published.append((vid, bad))
        req = csi_resources.publish_request(vid, bad, staging, publish_context=pctx)
        with mounts_unchanged(f"NodePublishVolume at {bad!r}"):
            expect_error(csi_sanity.node.NodePublishVolume, req, C.INVALID_ARGUMENT)
        assert not os.path.lexists(target), f"a refused NodePublishVolume created {target}"

    def test_unpublish(self, csi_sanity: SanityContext, csi_resources: Resources, shape: str) -> None:
        vid, staging, pctx = _volume(csi_sanity, csi_resources)
        req = csi_resources.publish_request(vid, csi_resources.target_path(), staging, publish_context=pctx)
        csi_resources.node_publish(req)
        bad = abnormal(req.target_path, shape)
        with mounts_unchanged(f"NodeUnpublishVolume of {bad!r}"):
            expect_error(
                csi_sanity.node.NodeUnpublishVolume,
                pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=bad),
                C.INVALID_ARGUMENT,
            )
        assert os.path.lexists(req.target_path), f"a refused NodeUnpublishVolume removed {req.target_path}"

    def test_stage(self, csi_sanity: SanityContext, csi_resources: Resources, shape: str) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vid = csi_resources.create_volume().volume_id
        pctx = csi_resources.controller_publish(vid)
        bad = abnormal(csi_resources.staging_path(), shape)
        if shape != "root":
            csi_resources.staged.append((vid, bad))
        with mounts_unchanged(f"NodeStageVolume at {bad!r}"):
            expect_error(
                csi_sanity.node.NodeStageVolume,
                _stage_request(csi_sanity, vid, bad, pctx),
                C.INVALID_ARGUMENT,
            )

    def test_unstage(self, csi_sanity: SanityContext, csi_resources: Resources, shape: str) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        vid, staging, _pctx = _volume(csi_sanity, csi_resources)
        bad = abnormal(staging, shape)
        with mounts_unchanged(f"NodeUnstageVolume of {bad!r}"):
            expect_error(
                csi_sanity.node.NodeUnstageVolume,
                pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=bad),
                C.INVALID_ARGUMENT,
            )


def _inside_roots(ctx: SanityContext, where: str) -> list[str]:
    """The configured driver roots themselves, or a fresh name below each
    (never created by the suite: the driver's directories are not ours)."""
    if not ctx.config.driver_roots:
        pytest.skip(
            "no driver roots configured (--driver-root): the suite cannot know where the driver keeps data"
        )
    roots = [os.path.realpath(r) for r in ctx.config.driver_roots]
    if where == "root-itself":
        return roots
    return [os.path.join(r, f"sanity-inside-{uuid.uuid4().hex[:8]}") for r in roots]


@pytest.mark.privileged
@pytest.mark.parametrize("where", ["root-itself", "below-root"])
class TestNodePathsInDriverRoots(_NodePathAttack):
    """A target or staging path inside the driver's own state: one volume
    mounted over another volume, or over the driver's data."""

    def test_publish(self, csi_sanity: SanityContext, csi_resources: Resources, where: str) -> None:
        vid, staging, pctx = _volume(csi_sanity, csi_resources)
        for path in _inside_roots(csi_sanity, where):
            existed = os.path.lexists(path)
            csi_resources.published.append((vid, path))
            req = csi_resources.publish_request(vid, path, staging, publish_context=pctx)
            with mounts_unchanged(f"NodePublishVolume at {path} (inside a driver root)"):
                expect_error(csi_sanity.node.NodePublishVolume, req, ROOT_CODES)
            assert existed or not os.path.lexists(path), f"a refused NodePublishVolume created {path}"

    def test_stage(self, csi_sanity: SanityContext, csi_resources: Resources, where: str) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vid = csi_resources.create_volume().volume_id
        pctx = csi_resources.controller_publish(vid)
        # A staging path below a root does not exist (the CO makes it): NOT_FOUND is fair too.
        codes = ROOT_CODES if where == "root-itself" else (*ROOT_CODES, C.NOT_FOUND)
        for path in _inside_roots(csi_sanity, where):
            csi_resources.staged.append((vid, path))
            with mounts_unchanged(f"NodeStageVolume at {path} (inside a driver root)"):
                expect_error(
                    csi_sanity.node.NodeStageVolume, _stage_request(csi_sanity, vid, path, pctx), codes
                )


class TestNodeNeverPublishedPaths(_NodePathAttack):
    """Unpublish/unstage of an empty directory the driver never published
    (the issue: an empty volume's own directory, the backend's work
    directory, directories outside every root were removed)."""

    def _empty_dir(self, res: Resources) -> str:
        path = os.path.join(res.workdir, "never-published")
        os.mkdir(path)
        return path

    def test_unpublish(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vid = csi_resources.create_volume().volume_id
        path = self._empty_dir(csi_resources)
        with mounts_unchanged("NodeUnpublishVolume of a never-published directory"):
            call_ok_or(
                csi_sanity.node.NodeUnpublishVolume,
                pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=path),
                (C.NOT_FOUND,),
            )
        assert os.path.isdir(path), f"NodeUnpublishVolume removed {path}, which it never published"

    def test_unstage(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vid = csi_resources.create_volume().volume_id
        path = self._empty_dir(csi_resources)
        with mounts_unchanged("NodeUnstageVolume of a never-staged directory"):
            call_ok_or(
                csi_sanity.node.NodeUnstageVolume,
                pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=path),
                (C.NOT_FOUND,),
            )
        assert os.path.isdir(path), f"NodeUnstageVolume removed {path}, which it never staged"


@pytest.mark.privileged
class TestNodeTargetOwnership(_NodePathAttack):
    """A target the CO made before publishing (csi-sanity makes only the
    parent; kubelet makes the target for mount volumes): publish onto it,
    and after unpublish it is no longer a mount point.  Whether it stays is
    the driver's call (the SP deletes what it created), so neither is asserted;
    that a driver-made target is removed is TestNodeLifecycle's check."""

    def test_precreated_target(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        vid, staging, pctx = _volume(csi_sanity, csi_resources)
        target = csi_resources.target_path("precreated")
        if csi_sanity.config.access_type == "block":
            with open(target, "x"):
                pass
        else:
            os.mkdir(target)
        csi_resources.node_publish(csi_resources.publish_request(vid, target, staging, publish_context=pctx))
        assert is_mountpoint(target), f"{target} is not a mount point after NodePublishVolume"
        csi_resources.unpublish(Published(vid, target, staging))
        assert not is_mountpoint(target), "a pre-created target is still mounted after NodeUnpublishVolume"
