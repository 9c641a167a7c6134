"""The loopfile backend: image files on loop devices, with real filesystems or raw block access."""
