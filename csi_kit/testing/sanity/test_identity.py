"""Identity service: GetPluginInfo, GetPluginCapabilities, Probe."""

from __future__ import annotations

import re

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import PluginSvc, SanityContext

__all__ = ["TestIdentity"]

# RFC 1035 style, 63 characters at most, alphanumeric at both ends.
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")


class TestIdentity:
    def test_plugin_info_name_follows_domain_notation(self, csi_sanity: SanityContext) -> None:
        info = csi_sanity.identity.GetPluginInfo(pb.GetPluginInfoRequest())
        assert info.name, "GetPluginInfo: name is REQUIRED"
        assert len(info.name) <= 63, f"plugin name {info.name!r} is longer than 63 characters"
        assert _NAME.match(info.name), f"plugin name {info.name!r} does not follow domain name notation"

    def test_plugin_info_vendor_version_is_set(self, csi_sanity: SanityContext) -> None:
        info = csi_sanity.identity.GetPluginInfo(pb.GetPluginInfoRequest())
        assert info.vendor_version, "GetPluginInfo: vendor_version is REQUIRED"

    def test_plugin_info_is_stable(self, csi_sanity: SanityContext) -> None:
        first = csi_sanity.identity.GetPluginInfo(pb.GetPluginInfoRequest())
        for _ in range(3):
            assert csi_sanity.identity.GetPluginInfo(pb.GetPluginInfoRequest()) == first

    def test_plugin_capabilities_are_known(self, csi_sanity: SanityContext) -> None:
        resp = csi_sanity.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
        known_services = set(pb.PluginCapability.Service.Type.values()) - {PluginSvc.UNKNOWN}
        known_expansion = set(pb.PluginCapability.VolumeExpansion.Type.values()) - {0}
        for cap in resp.capabilities:
            kind = cap.WhichOneof("type")
            assert kind is not None, f"capability with no type set: {cap}"
            if kind == "service":
                assert cap.service.type in known_services, (
                    f"unknown plugin service capability {cap.service.type}"
                )
            else:
                assert cap.volume_expansion.type in known_expansion, (
                    f"unknown volume expansion capability {cap.volume_expansion.type}"
                )

    def test_volume_expansion_capability_has_an_expand_rpc(self, csi_sanity: SanityContext) -> None:
        """ONLINE/OFFLINE expansion requires controller or node EXPAND_VOLUME."""
        caps = csi_sanity.caps
        if not caps.expansion:
            return
        from csi_kit.testing.sanity._support import CtrlCap, NodeCap

        assert CtrlCap.EXPAND_VOLUME in caps.controller or NodeCap.EXPAND_VOLUME in caps.node, (
            "VolumeExpansion advertised but neither controller nor node EXPAND_VOLUME"
        )

    def test_probe_succeeds(self, csi_sanity: SanityContext) -> None:
        resp = csi_sanity.identity.Probe(pb.ProbeRequest())
        assert isinstance(resp, pb.ProbeResponse)

    def test_probe_reports_ready_after_startup(self, csi_sanity: SanityContext) -> None:
        resp = csi_sanity.identity.Probe(pb.ProbeRequest())
        if resp.HasField("ready"):
            assert resp.ready.value, "Probe: the driver still reports ready=false while being tested"
