"""Code generated from proto/csi.proto at build time (see setup.py).

Only csi_kit._grpc and csi_kit.testing import from here: backends never see
protobuf.
"""
