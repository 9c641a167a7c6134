"""Linux system helpers: the only part of csi_kit that touches the kernel or runs tools.

Backends call these instead of syscalls or subprocesses of their own, so
that every command runs through `run` (argv lists, timeouts, stderr kept),
mount state always comes from /proc/self/mountinfo, and copies never follow
a symlink out of a volume.  The package imports nothing from csi_kit except
`csi_kit.errors`; every failure is one of its exceptions.

Modules: `run` (subprocesses), `mounts` (mountinfo, bind/mount/unmount),
`copy` (reflink and sparse copies of files and trees), `fs` (usage,
freeze/thaw, sync), `quota` (XFS project quotas).
"""

from __future__ import annotations

from csi_kit.linux.copy import (
    CopyStats,
    clone_file,
    copy_file,
    copy_file_sparse,
    copy_tree,
    reflink_supported,
)
from csi_kit.linux.fs import Usage, filesystem_of, frozen, statvfs_usage, sync_path, tree_usage
from csi_kit.linux.mounts import (
    MountInfo,
    bind_mount,
    is_mounted,
    mount,
    mounts_at,
    mounts_under,
    read_mountinfo,
    remount_readonly,
    unmount,
    unmount_all,
)
from csi_kit.linux.quota import (
    clear_project_limit,
    project_quota_enabled,
    project_usage,
    set_project,
    set_project_limit,
)
from csi_kit.linux.run import Result, run

__all__ = [
    "CopyStats",
    "MountInfo",
    "Result",
    "Usage",
    "bind_mount",
    "clear_project_limit",
    "clone_file",
    "copy_file",
    "copy_file_sparse",
    "copy_tree",
    "filesystem_of",
    "frozen",
    "is_mounted",
    "mount",
    "mounts_at",
    "mounts_under",
    "project_quota_enabled",
    "project_usage",
    "read_mountinfo",
    "reflink_supported",
    "remount_readonly",
    "run",
    "set_project",
    "set_project_limit",
    "statvfs_usage",
    "sync_path",
    "tree_usage",
    "unmount",
    "unmount_all",
]
