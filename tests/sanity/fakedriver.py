"""A small, spec-following CSI driver written straight against the generated
servicers, with switchable faults — the suite's own test subject.

It is independent of csi_kit's server so that the suite can be shown to
pass a correct driver and to fail the right tests for each planted fault,
whatever state the real server is in.  Volumes are directories under a
root; publish/stage are bind mounts when running as root and symlinks
otherwise.  Sizes are advisory.  Run as a process:

    python fakedriver.py --endpoint unix:///tmp/x.sock --root DIR [--fault NAME ...] [-- COMMAND ...]

With a COMMAND it serves only while COMMAND runs: `unshare -m` around the
whole line puts driver and suite in one private mount namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures
from typing import Any

import grpc

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg

FAULTS = {
    "create-not-idempotent": "CreateVolume with a known name makes another volume",
    "notfound-for-invalid": "missing required fields answer NOT_FOUND instead of INVALID_ARGUMENT",
    "traversal": "DeleteVolume joins the id to its root unchecked and removes what it points at",
    "keep-target": "NodeUnpublishVolume leaves the target directory behind",
    "ignore-bad-token": "ListVolumes/ListSnapshots accept any starting_token",
    "snapshot-any-source": "CreateSnapshot with a known name ignores a different source",
    "racy-create": "CreateVolume checks and inserts without a lock",
    "empty-restore": "a volume restored from a snapshot starts empty",
    "shallow-clone": "a clone shares its source's directory",
    "crash-on-nul": "an id holding NUL raises an unhandled exception",
    "shrink": "ControllerExpandVolume sets the size even when smaller",
    "group-ignores-sources": "CreateVolumeGroupSnapshot with a known name ignores different sources",
    "follow-symlinks": "node paths may go through symlinks; undo finds its record through the link",
    "normalise-paths": "node paths with `..`, `.`, `//` or a trailing `/` are normalised, not refused",
    "unmount-prefix": "unpublish/unstage of an unknown path unmounts every mount below it, answers OK",
    "rmdir-unpublished": "unpublish/unstage of an unknown empty directory removes it",
    "target-in-root": "targets and staging paths inside the driver's root are accepted",
    "stats-wrong-codes": "stats/expand judge the path before the volume, FAILED_PRECONDITION off target",
}

GiB = 1024**3
MAX_SIZE = 1024 * GiB
_BANNED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ID = re.compile(r"^[0-9a-f]{32}$")
MS_BIND, MS_REMOUNT, MS_RDONLY = 4096, 32, 1
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8
#: The destructive faults act only below the suite's own scratch directories.
FENCE = tempfile.gettempdir() + "/csi-sanity-"
_libc = ctypes.CDLL(None, use_errno=True)
ROOT = os.geteuid() == 0
C = grpc.StatusCode


def _mount(src: str, dst: str, readonly: bool) -> None:
    if _libc.mount(src.encode(), dst.encode(), None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), f"bind mount {src} on {dst}")
    if readonly and _libc.mount(None, dst.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
        err = ctypes.get_errno()
        _libc.umount2(dst.encode(), 0)
        raise OSError(err, f"remount {dst} read-only")


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), ln.split()[4]) for ln in f]


def _fenced(path: str) -> bool:
    return path.startswith(FENCE)


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg


def _wrap(fn: Any) -> Any:
    def call(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Abort as a:
            context.abort(a.code, a.msg)

    return call


class Driver(pbg.IdentityServicer, pbg.ControllerServicer, pbg.NodeServicer, pbg.GroupControllerServicer):
    def __init__(self, root: str, faults: set[str], node_id: str = "fake-node-1") -> None:
        self.root = root
        self.faults = faults
        self.node_id = node_id
        self.lock = threading.RLock()
        self.vols: dict[str, dict[str, Any]] = {}
        self.names: dict[str, str] = {}
        self.snaps: dict[str, dict[str, Any]] = {}
        self.snap_names: dict[str, str] = {}
        self.staged: dict[str, dict[str, Any]] = {}
        self.published: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.group_names: dict[str, str] = {}
        os.makedirs(os.path.join(root, "vols"), exist_ok=True)
        os.makedirs(os.path.join(root, "snaps"), exist_ok=True)

    # -- helpers ------------------------------------------------------------

    def _missing(self, what: str) -> Abort:
        code = C.NOT_FOUND if "notfound-for-invalid" in self.faults else C.INVALID_ARGUMENT
        return Abort(code, f"{what} is required")

    def _vol(self, vid: str) -> dict[str, Any]:
        if "\x00" in vid and "crash-on-nul" in self.faults:
            raise RuntimeError("unexpected NUL")  # gRPC answers UNKNOWN: a crash, to the caller
        v = self.vols.get(vid)
        if v is None:
            raise Abort(C.NOT_FOUND, f"volume {vid!r} not found")
        return v

    def _check_name(self, name: str) -> None:
        if len(name.encode()) > 128 or _BANNED.search(name):
            raise Abort(C.INVALID_ARGUMENT, "name longer than 128 bytes or holding control characters")

    def _check_cap(self, cap: Any) -> None:
        if not cap.HasField("access_mode") or cap.access_mode.mode not in (1, 2, 3, 4, 5):
            raise Abort(C.INVALID_ARGUMENT, f"unsupported access mode {cap.access_mode.mode}")
        if cap.WhichOneof("access_type") != "mount":
            raise Abort(C.INVALID_ARGUMENT, "only mount volumes")

    def _size(self, cr: Any, default: int) -> int:
        req, lim = cr.required_bytes, cr.limit_bytes
        if req < 0 or lim < 0:
            raise Abort(C.INVALID_ARGUMENT, "negative capacity")
        if lim and req > lim:
            raise Abort(C.INVALID_ARGUMENT, "required_bytes above limit_bytes")
        size = req or default
        if lim and size > lim:
            size = lim
        if size > MAX_SIZE:
            raise Abort(C.OUT_OF_RANGE, f"at most {MAX_SIZE} bytes")
        return size

    @staticmethod
    def _abs(path: str, what: str) -> None:
        if not path:
            raise Abort(C.INVALID_ARGUMENT, f"{what} is required")
        if not os.path.isabs(path) or "\x00" in path:
            raise Abort(C.INVALID_ARGUMENT, f"{what} must be an absolute path")

    def _volume_msg(self, v: dict[str, Any]) -> Any:
        vol = pb.Volume(volume_id=v["id"], capacity_bytes=v["size"], volume_context={"fake": "1"})
        if v["source"]:
            kind, sid = v["source"]
            if kind == "snapshot":
                vol.content_source.snapshot.snapshot_id = sid
            else:
                vol.content_source.volume.volume_id = sid
        return vol

    def _snap_msg(self, s: dict[str, Any]) -> Any:
        snap = pb.Snapshot(
            snapshot_id=s["id"], source_volume_id=s["source"], size_bytes=s["size"], ready_to_use=True
        )
        snap.creation_time.FromNanoseconds(s["created"])
        return snap

    # -- identity -----------------------------------------------------------

    def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return pb.GetPluginInfoResponse(name="fake.csi-kit.io", vendor_version="0.0.1")

    def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        r = pb.GetPluginCapabilitiesResponse()
        r.capabilities.add().service.type = pb.PluginCapability.Service.CONTROLLER_SERVICE
        r.capabilities.add().service.type = pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE
        r.capabilities.add().volume_expansion.type = pb.PluginCapability.VolumeExpansion.ONLINE
        return r

    def Probe(self, request: Any, context: Any) -> Any:
        r = pb.ProbeResponse()
        r.ready.value = True
        return r

    # -- controller ---------------------------------------------------------

    def ControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        r = pb.ControllerGetCapabilitiesResponse()
        R = pb.ControllerServiceCapability.RPC
        for t in (
            R.CREATE_DELETE_VOLUME,
            R.LIST_VOLUMES,
            R.GET_CAPACITY,
            R.CREATE_DELETE_SNAPSHOT,
            R.LIST_SNAPSHOTS,
            R.CLONE_VOLUME,
            R.EXPAND_VOLUME,
            R.GET_VOLUME,
            R.GET_SNAPSHOT,
        ):
            r.capabilities.add().rpc.type = t
        return r

    @_wrap
    def CreateVolume(self, request: Any, context: Any) -> Any:
        if not request.name:
            raise self._missing("name")
        self._check_name(request.name)
        if not request.volume_capabilities:
            raise self._missing("volume_capabilities")
        for cap in request.volume_capabilities:
            self._check_cap(cap)
        for k in request.parameters:
            if k != "fake":
                raise Abort(C.INVALID_ARGUMENT, f"unknown parameter {k!r}")
        size = self._size(request.capacity_range, GiB)
        key = (
            request.capacity_range.SerializeToString(),
            tuple(sorted(request.parameters.items())),
            request.volume_content_source.SerializeToString(),
        )
        with self.lock:
            existing = self.names.get(request.name)
            if existing and "create-not-idempotent" not in self.faults:
                v = self.vols[existing]
                if v["key"] != key:
                    raise Abort(C.ALREADY_EXISTS, f"volume {request.name!r} exists with other arguments")
                return pb.CreateVolumeResponse(volume=self._volume_msg(v))
        source = None
        src_dir = None
        if request.HasField("volume_content_source"):
            kind = request.volume_content_source.WhichOneof("type")
            if kind is None:
                raise Abort(C.INVALID_ARGUMENT, "volume_content_source without a source")
            if kind == "snapshot":
                sid = request.volume_content_source.snapshot.snapshot_id
                s = self.snaps.get(sid)
                if s is None:
                    raise Abort(C.NOT_FOUND, f"snapshot {sid!r} not found")
                if request.capacity_range.limit_bytes and request.capacity_range.limit_bytes < s["size"]:
                    raise Abort(C.OUT_OF_RANGE, "smaller than the snapshot")
                source, src_dir = ("snapshot", sid), s["dir"]
                size = max(size, s["size"])
            else:
                vid = request.volume_content_source.volume.volume_id
                v = self.vols.get(vid)
                if v is None:
                    raise Abort(C.NOT_FOUND, f"volume {vid!r} not found")
                source, src_dir = ("volume", vid), v["dir"]
                size = max(size, v["size"])
        racy = "racy-create" in self.faults
        with threading.Lock() if racy else self.lock:
            existing = self.names.get(request.name)
            if existing and "create-not-idempotent" not in self.faults:
                v = self.vols[existing]
                if v["key"] != key:
                    raise Abort(C.ALREADY_EXISTS, f"volume {request.name!r} exists with other arguments")
                return pb.CreateVolumeResponse(volume=self._volume_msg(v))
            if racy:
                time.sleep(0.05)  # widen the check-then-insert window
            vid = uuid.uuid4().hex
            d = os.path.join(self.root, "vols", vid)
            if src_dir and "shallow-clone" in self.faults and source and source[0] == "volume":
                d = src_dir
            elif src_dir and not (source and source[0] == "snapshot" and "empty-restore" in self.faults):
                shutil.copytree(src_dir, d, symlinks=True)
            else:
                os.mkdir(d)
            v = {"id": vid, "name": request.name, "size": size, "dir": d, "source": source, "key": key}
            self.vols[vid] = v
            self.names[request.name] = vid
            return pb.CreateVolumeResponse(volume=self._volume_msg(v))

    @_wrap
    def DeleteVolume(self, request: Any, context: Any) -> Any:
        vid = request.volume_id
        if not vid:
            raise self._missing("volume_id")
        if "traversal" in self.faults:
            target = os.path.realpath(os.path.join(self.root, "vols", vid))
            # The planted bug, fenced so it can only ever hit the suite's canary.
            if _fenced(target) and os.path.isdir(target):
                shutil.rmtree(target)
        with self.lock:
            v = self.vols.pop(vid, None)
            if v is not None:
                self.names.pop(v["name"], None)
                if not any(o["dir"] == v["dir"] for o in self.vols.values()):
                    shutil.rmtree(v["dir"], ignore_errors=True)
        return pb.DeleteVolumeResponse()

    @_wrap
    def ValidateVolumeCapabilities(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        if not request.volume_capabilities:
            raise self._missing("volume_capabilities")
        self._vol(request.volume_id)
        r = pb.ValidateVolumeCapabilitiesResponse()
        try:
            for cap in request.volume_capabilities:
                self._check_cap(cap)
        except Abort as a:
            r.message = a.msg
            return r
        r.confirmed.volume_capabilities.extend(request.volume_capabilities)
        return r

    def _page(self, items: list[Any], max_entries: int, token: str) -> tuple[list[Any], str]:
        if max_entries < 0:
            raise Abort(C.INVALID_ARGUMENT, "negative max_entries")
        start = 0
        if token:
            if not token.isdigit() or int(token) > len(items):
                if "ignore-bad-token" in self.faults:
                    token = "0"
                else:
                    raise Abort(C.ABORTED, f"invalid starting_token {token!r}")
            start = int(token)
        end = len(items) if not max_entries else min(len(items), start + max_entries)
        return items[start:end], (str(end) if end < len(items) else "")

    @_wrap
    def ListVolumes(self, request: Any, context: Any) -> Any:
        with self.lock:
            vols = [self.vols[k] for k in sorted(self.vols)]
        page, nxt = self._page(vols, request.max_entries, request.starting_token)
        r = pb.ListVolumesResponse(next_token=nxt)
        for v in page:
            r.entries.add().volume.CopyFrom(self._volume_msg(v))
        return r

    @_wrap
    def GetCapacity(self, request: Any, context: Any) -> Any:
        for cap in request.volume_capabilities:
            self._check_cap(cap)
        st = os.statvfs(self.root)
        return pb.GetCapacityResponse(available_capacity=st.f_bavail * st.f_frsize)

    @_wrap
    def ControllerGetVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        v = self._vol(request.volume_id)
        return pb.ControllerGetVolumeResponse(volume=self._volume_msg(v))

    @_wrap
    def ControllerExpandVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        if not request.HasField("capacity_range"):
            raise self._missing("capacity_range")
        v = self._vol(request.volume_id)
        size = self._size(request.capacity_range, 0)
        with self.lock:
            v["size"] = size if "shrink" in self.faults else max(v["size"], size)
        return pb.ControllerExpandVolumeResponse(capacity_bytes=v["size"], node_expansion_required=False)

    @_wrap
    def CreateSnapshot(self, request: Any, context: Any) -> Any:
        if not request.name:
            raise self._missing("name")
        if not request.source_volume_id:
            raise self._missing("source_volume_id")
        self._check_name(request.name)
        v = self._vol(request.source_volume_id)
        with self.lock:
            existing = self.snap_names.get(request.name)
            if existing:
                s = self.snaps[existing]
                if s["source"] != request.source_volume_id and "snapshot-any-source" not in self.faults:
                    raise Abort(C.ALREADY_EXISTS, f"snapshot {request.name!r} exists for another volume")
                return pb.CreateSnapshotResponse(snapshot=self._snap_msg(s))
            sid = uuid.uuid4().hex
            d = os.path.join(self.root, "snaps", sid)
            shutil.copytree(v["dir"], d, symlinks=True)
            s = {
                "id": sid,
                "name": request.name,
                "source": v["id"],
                "size": v["size"],
                "dir": d,
                "created": time.time_ns(),
            }
            self.snaps[sid] = s
            self.snap_names[request.name] = sid
            return pb.CreateSnapshotResponse(snapshot=self._snap_msg(s))

    @_wrap
    def DeleteSnapshot(self, request: Any, context: Any) -> Any:
        if not request.snapshot_id:
            raise self._missing("snapshot_id")
        with self.lock:
            s = self.snaps.pop(request.snapshot_id, None)
            if s is not None:
                self.snap_names.pop(s["name"], None)
                shutil.rmtree(s["dir"], ignore_errors=True)
        return pb.DeleteSnapshotResponse()

    @_wrap
    def ListSnapshots(self, request: Any, context: Any) -> Any:
        with self.lock:
            snaps = [self.snaps[k] for k in sorted(self.snaps)]
        if request.snapshot_id:
            snaps = [s for s in snaps if s["id"] == request.snapshot_id]
        if request.source_volume_id:
            snaps = [s for s in snaps if s["source"] == request.source_volume_id]
        page, nxt = self._page(snaps, request.max_entries, request.starting_token)
        r = pb.ListSnapshotsResponse(next_token=nxt)
        for s in page:
            r.entries.add().snapshot.CopyFrom(self._snap_msg(s))
        return r

    @_wrap
    def GetSnapshot(self, request: Any, context: Any) -> Any:
        if not request.snapshot_id:
            raise self._missing("snapshot_id")
        s = self.snaps.get(request.snapshot_id)
        if s is None:
            raise Abort(C.NOT_FOUND, f"snapshot {request.snapshot_id!r} not found")
        return pb.GetSnapshotResponse(snapshot=self._snap_msg(s))

    # -- group controller -------------------------------------------------------

    def GroupControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        r = pb.GroupControllerGetCapabilitiesResponse()
        r.capabilities.add().rpc.type = (
            pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
        )
        return r

    def _group_msg(self, g: dict[str, Any]) -> Any:
        msg = pb.VolumeGroupSnapshot(group_snapshot_id=g["id"], ready_to_use=True)
        msg.creation_time.FromNanoseconds(g["created"])
        for sid in g["snapshots"]:
            snap = self._snap_msg(self.snaps[sid])
            snap.group_snapshot_id = g["id"]
            msg.snapshots.append(snap)
        return msg

    @_wrap
    def CreateVolumeGroupSnapshot(self, request: Any, context: Any) -> Any:
        if not request.name:
            raise self._missing("name")
        if not request.source_volume_ids:
            raise self._missing("source_volume_ids")
        self._check_name(request.name)
        sources = sorted(request.source_volume_ids)
        with self.lock:
            gid = self.group_names.get(request.name)
            if gid is not None:
                g = self.groups[gid]
                if g["sources"] != sources and "group-ignores-sources" not in self.faults:
                    raise Abort(C.ALREADY_EXISTS, f"group snapshot {request.name!r} exists for other volumes")
                return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=self._group_msg(g))
            vols = [self._vol(v) for v in sources]
            gid = uuid.uuid4().hex
            members = []
            for v in vols:
                sid = uuid.uuid4().hex
                d = os.path.join(self.root, "snaps", sid)
                shutil.copytree(v["dir"], d, symlinks=True)
                self.snaps[sid] = {
                    "id": sid,
                    "name": f"{gid}/{sid}",
                    "source": v["id"],
                    "size": v["size"],
                    "dir": d,
                    "created": time.time_ns(),
                }
                members.append(sid)
            g = {
                "id": gid,
                "name": request.name,
                "sources": sources,
                "snapshots": members,
                "created": time.time_ns(),
            }
            self.groups[gid] = g
            self.group_names[request.name] = gid
            return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=self._group_msg(g))

    @_wrap
    def DeleteVolumeGroupSnapshot(self, request: Any, context: Any) -> Any:
        if not request.group_snapshot_id:
            raise self._missing("group_snapshot_id")
        with self.lock:
            g = self.groups.pop(request.group_snapshot_id, None)
            if g is not None:
                self.group_names.pop(g["name"], None)
                for sid in g["snapshots"]:
                    s = self.snaps.pop(sid, None)
                    if s is not None:
                        shutil.rmtree(s["dir"], ignore_errors=True)
        return pb.DeleteVolumeGroupSnapshotResponse()

    @_wrap
    def GetVolumeGroupSnapshot(self, request: Any, context: Any) -> Any:
        if not request.group_snapshot_id:
            raise self._missing("group_snapshot_id")
        g = self.groups.get(request.group_snapshot_id)
        if g is None:
            raise Abort(C.NOT_FOUND, f"group snapshot {request.group_snapshot_id!r} not found")
        return pb.GetVolumeGroupSnapshotResponse(group_snapshot=self._group_msg(g))

    # -- node -----------------------------------------------------------------
    #
    # Caller paths are judged as the spec asks of any driver (see
    # _node_path): absolute, normal, never `/`, never inside the root, no
    # symlink in any component.  Publish/stage are real bind mounts as root.
    # Unpublish/unstage undo only what a record says this driver did, at
    # exactly that path.  The node faults each undo one of these rules; the
    # destructive ones are fenced to the suite's own scratch directories
    # (FENCE) so that even a run outside a private mount namespace cannot
    # harm the machine.

    def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        r = pb.NodeGetCapabilitiesResponse()
        R = pb.NodeServiceCapability.RPC
        for t in (R.STAGE_UNSTAGE_VOLUME, R.GET_VOLUME_STATS, R.EXPAND_VOLUME):
            r.capabilities.add().rpc.type = t
        return r

    def NodeGetInfo(self, request: Any, context: Any) -> Any:
        return pb.NodeGetInfoResponse(node_id=self.node_id)

    def _node_path(self, path: str, what: str) -> str:
        """The caller's path if it is one this driver may mount at or undo;
        INVALID_ARGUMENT otherwise."""
        self._abs(path, what)
        if path == "/":
            raise Abort(C.INVALID_ARGUMENT, f"{what} must not be /")
        if path != os.path.normpath(path) or path.startswith("//"):
            if "normalise-paths" not in self.faults:
                raise Abort(C.INVALID_ARGUMENT, f"{what} {path!r} is not a normal path")
            path = "/" + os.path.normpath(path).lstrip("/")
        root = os.path.realpath(self.root)
        if (path == root or path.startswith(root + "/")) and "target-in-root" not in self.faults:
            raise Abort(C.INVALID_ARGUMENT, f"{what} {path!r} is inside the driver's root")
        if "follow-symlinks" not in self.faults:
            prefix = ""
            for part in path.strip("/").split("/"):
                prefix += "/" + part
                try:
                    st = os.lstat(prefix)
                except OSError:
                    break  # missing (or below a file): nothing further to follow
                if stat.S_ISLNK(st.st_mode):
                    raise Abort(C.INVALID_ARGUMENT, f"{what} {path!r} goes through the symlink {prefix}")
        return path

    def _umount(self, path: str) -> None:
        flags = 0 if "follow-symlinks" in self.faults else UMOUNT_NOFOLLOW
        if _libc.umount2(path.encode(), flags) != 0:
            raise OSError(ctypes.get_errno(), f"umount {path}")

    def _not_ours(self, path: str, records: dict[str, dict[str, Any]], what: str) -> str | None:
        """Undo of a path with no record: the faults' wrong moves, or nothing."""
        if "unmount-prefix" in self.faults:
            prefix = path.rstrip("/") + "/"
            doomed = [mp for mp in _mount_points() if (mp == path or mp.startswith(prefix)) and _fenced(mp)]
            for mp in sorted(doomed, key=len, reverse=True):
                _libc.umount2(mp.encode(), MNT_DETACH)
            return None
        path = self._node_path(path, what)
        if path in records:  # another spelling of a recorded path (normalise-paths)
            return path
        if "follow-symlinks" in self.faults and os.path.realpath(path) in records:
            return os.path.realpath(path)
        if "rmdir-unpublished" in self.faults and _fenced(path):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        return None

    @_wrap
    def NodeStageVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        self._abs(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise self._missing("volume_capability")
        self._check_cap(request.volume_capability)
        v = self._vol(request.volume_id)
        path = self._node_path(request.staging_target_path, "staging_target_path")
        with self.lock:
            if path in self.staged:
                if self.staged[path]["volume"] == v["id"]:
                    return pb.NodeStageVolumeResponse()
                raise Abort(C.ALREADY_EXISTS, f"another volume is staged at {path}")
            if ROOT:
                if not os.path.isdir(path):
                    raise Abort(C.NOT_FOUND, f"staging_target_path {path} is not a directory")
                _mount(v["dir"], path, False)
            self.staged[path] = {"volume": v["id"], "cap": request.volume_capability}
        return pb.NodeStageVolumeResponse()

    @_wrap
    def NodeUnstageVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        self._abs(request.staging_target_path, "staging_target_path")
        with self.lock:
            path = request.staging_target_path
            if path not in self.staged:
                path = self._not_ours(path, self.staged, "staging_target_path")
            if path is None or self.staged[path]["volume"] != request.volume_id:
                return pb.NodeUnstageVolumeResponse()
            if ROOT:
                self._umount(path)
            del self.staged[path]
        return pb.NodeUnstageVolumeResponse()

    @_wrap
    def NodePublishVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        self._abs(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise self._missing("volume_capability")
        if not request.staging_target_path:
            raise Abort(C.FAILED_PRECONDITION, "staging_target_path is required (STAGE_UNSTAGE_VOLUME)")
        self._check_cap(request.volume_capability)
        v = self._vol(request.volume_id)
        target = self._node_path(request.target_path, "target_path")
        staged = self.staged.get(request.staging_target_path)
        if staged is None or staged["volume"] != v["id"]:
            raise Abort(C.FAILED_PRECONDITION, f"volume not staged at {request.staging_target_path}")
        args = (request.staging_target_path, request.readonly, request.volume_capability.SerializeToString())
        mode = request.volume_capability.access_mode.mode
        with self.lock:
            p = self.published.get(target)
            if p is not None:
                if p["volume"] == v["id"] and p["args"] == args:
                    return pb.NodePublishVolumeResponse()
                raise Abort(C.ALREADY_EXISTS, f"{target} published with other arguments")
            others = [o for o in self.published.values() if o["volume"] == v["id"]]
            if others and mode in (1, 2):
                raise Abort(C.FAILED_PRECONDITION, "single-node volume already published elsewhere")
            created = not os.path.lexists(target)
            if not ROOT:
                if not created:
                    raise Abort(
                        C.FAILED_PRECONDITION, f"{target} exists (unprivileged: publishes are symlinks)"
                    )
                os.symlink(v["dir"], target)
            else:
                if created:
                    os.mkdir(target)
                elif not os.path.isdir(target) and "follow-symlinks" not in self.faults:
                    raise Abort(C.INVALID_ARGUMENT, f"{target} exists and is not a directory")
                try:
                    _mount(request.staging_target_path, target, request.readonly)
                except OSError:
                    if created:
                        os.rmdir(target)
                    raise
            self.published[target] = {"volume": v["id"], "args": args, "created": created}
        return pb.NodePublishVolumeResponse()

    @_wrap
    def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        self._abs(request.target_path, "target_path")
        with self.lock:
            target = request.target_path
            if target not in self.published:
                target = self._not_ours(target, self.published, "target_path")
            if target is None or self.published[target]["volume"] != request.volume_id:
                return pb.NodeUnpublishVolumeResponse()
            p = self.published.pop(target)
            if ROOT:
                self._umount(target)
                if p["created"] and "keep-target" not in self.faults:
                    os.rmdir(target)
            elif "keep-target" not in self.faults:
                os.unlink(target)
        return pb.NodeUnpublishVolumeResponse()

    def _at(self, vid: str, path: str) -> dict[str, Any]:
        """The volume `vid`, which must be published or staged at `path`.

        The volume is looked up first: an unknown one is NOT_FOUND whatever
        the path (csi-sanity sends `some/path`)."""
        if "stats-wrong-codes" in self.faults:
            self._abs(path, "volume_path")
        v = self._vol(vid)
        known = {t for t, p in self.published.items() if p["volume"] == vid}
        known |= {s for s, rec in self.staged.items() if rec["volume"] == vid}
        if path not in known:
            code = C.FAILED_PRECONDITION if "stats-wrong-codes" in self.faults else C.NOT_FOUND
            raise Abort(code, f"volume {vid} is not at {path}")
        return v

    @_wrap
    def NodeGetVolumeStats(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        if not request.volume_path:
            raise self._missing("volume_path")
        self._at(request.volume_id, request.volume_path)
        st = os.statvfs(request.volume_path)
        r = pb.NodeGetVolumeStatsResponse()
        r.usage.add(
            unit=pb.VolumeUsage.BYTES,
            total=st.f_blocks * st.f_frsize,
            available=st.f_bavail * st.f_frsize,
            used=(st.f_blocks - st.f_bfree) * st.f_frsize,
        )
        return r

    @_wrap
    def NodeExpandVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise self._missing("volume_id")
        if not request.volume_path:
            raise self._missing("volume_path")
        v = self._at(request.volume_id, request.volume_path)
        return pb.NodeExpandVolumeResponse(capacity_bytes=v["size"])


def serve(endpoint: str, root: str, faults: set[str]) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    d = Driver(root, faults)
    pbg.add_IdentityServicer_to_server(d, server)
    pbg.add_ControllerServicer_to_server(d, server)
    pbg.add_NodeServicer_to_server(d, server)
    pbg.add_GroupControllerServicer_to_server(d, server)
    server.add_insecure_port(endpoint)
    server.start()
    return server


def main() -> None:
    """Serve until SIGTERM; or, given `-- COMMAND...`, serve while COMMAND
    runs (its output relayed) and exit with its status — how the suite runs
    against a faulty driver inside one private mount namespace."""
    argv = sys.argv[1:]
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--fault", action="append", default=[], choices=sorted(FAULTS))
    ns = ap.parse_args(argv)
    server = serve(ns.endpoint, ns.root, set(ns.fault))
    if command:
        sys.exit(run_beside(server, command))
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print("ready", flush=True)
    server.wait_for_termination()
    sys.exit(0)


def run_beside(server: Any, command: list[str]) -> int:
    """Run `command` while `server` serves; relay its output; its exit status."""
    from csi_kit.linux.run import run

    try:
        result = run(command, check=False, timeout=3600)
    finally:
        server.stop(None).wait()
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.stdout.flush()
    return result.returncode


if __name__ == "__main__":
    main()
