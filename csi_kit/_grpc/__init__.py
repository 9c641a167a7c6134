"""The gRPC side: servicers, the error/log/metrics wrapper, the server.

This package is the only one that touches protobuf messages on the serving
path; it converts them to `csi_kit.types` values and calls the engine.
"""
