"""The lvm backend."""
