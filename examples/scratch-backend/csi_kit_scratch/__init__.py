"""An example third-party csi_kit backend (see README.md)."""
