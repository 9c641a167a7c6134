"""ControllerModifyVolume and CreateVolume's mutable_parameters (MODIFY_VOLUME).

Only for drivers that advertise MODIFY_VOLUME.  Which mutable parameters
make a valid change is the driver's to say: the tests that need one take
`SanityConfig.modify_parameters` (``--csi-modify-parameters FILE.yaml``) and
skip without it.  The request-shape checks (no volume id, no parameters)
are in `TestControllerModifyVolume` (test_controller.py); these check what
the parameters do:

- a key the driver does not know is INVALID_ARGUMENT (the spec's "invalid
  mutable parameter keys");
- a valid change of a volume that does not exist is NOT_FOUND -- with
  valid parameters there is no other answer;
- a valid change succeeds, again and again (the RPC MUST be idempotent),
  and the volume is still there afterwards;
- CreateVolume with the valid parameters as ``mutable_parameters`` makes
  the volume, and the same request again answers the same volume.
"""

from __future__ import annotations

import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import C, CtrlCap, Resources, SanityContext, expect_error, unique_name

__all__ = ["TestModifyVolume"]

NONEXISTENT_VOLUME = "sanity-no-such-volume-modify-0123456789"
#: A key no driver defines (the spec leaves keys to the driver; this one is ours to make up).
UNKNOWN_KEY = "sanity.csi-kit.io/no-such-mutable-parameter"


def _valid(ctx: SanityContext) -> dict[str, str]:
    params = dict(ctx.config.modify_parameters)
    if not params:
        pytest.skip("no modify_parameters configured (a valid ControllerModifyVolume change)")
    return params


def _modify(ctx: SanityContext, volume_id: str, params: dict[str, str]) -> pb.ControllerModifyVolumeRequest:
    return pb.ControllerModifyVolumeRequest(
        volume_id=volume_id,
        mutable_parameters=params,
        secrets=ctx.config.secrets_for("ControllerModifyVolume"),
    )


class TestModifyVolume:
    def test_unknown_key_is_invalid_argument(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.MODIFY_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.controller.ControllerModifyVolume,
            _modify(csi_sanity, vol.volume_id, {UNKNOWN_KEY: "1"}),
            C.INVALID_ARGUMENT,
        )

    def test_unknown_volume_is_not_found(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.MODIFY_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerModifyVolume,
            _modify(csi_sanity, NONEXISTENT_VOLUME, _valid(csi_sanity)),
            C.NOT_FOUND,
        )

    def test_valid_change_succeeds_repeatedly(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.MODIFY_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        params = _valid(csi_sanity)
        vol = csi_resources.create_volume()
        for _ in range(max(2, csi_sanity.config.idempotency_repeats)):
            csi_sanity.controller.ControllerModifyVolume(_modify(csi_sanity, vol.volume_id, params))
        if CtrlCap.GET_VOLUME in csi_sanity.caps.controller:
            got = csi_sanity.controller.ControllerGetVolume(
                pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)
            )
            assert got.volume.volume_id == vol.volume_id

    def test_create_volume_with_mutable_parameters(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.MODIFY_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request(unique_name("mutable"), mutable_parameters=_valid(csi_sanity))
        first = csi_resources.create_volume_from(req)
        again = csi_resources.create_volume_from(req)
        assert again.volume_id == first.volume_id, "the same CreateVolume made a second volume"
