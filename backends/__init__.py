"""csi_kit's built-in backends, installed as the ``csi_kit_backends`` package.

Each one registers through the ``csi_kit`` entry-point group exactly as a
third-party backend would (see setup.cfg); nothing in csi_kit knows them by name.
"""
