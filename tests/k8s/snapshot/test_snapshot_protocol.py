"""The snapshot protocol helpers: names, secret templates, reserved parameters."""

from __future__ import annotations

import pytest

from csi_kit.k8s.snapshot import protocol as p


def test_names_follow_upstream() -> None:
    snap = {"metadata": {"uid": "0b5c-11"}}
    assert p.content_name_for(snap) == "snapcontent-0b5c-11"
    content = {"spec": {"volumeSnapshotRef": {"uid": "0b5c-11"}}}
    assert p.csi_snapshot_name(content) == "snapshot-0b5c-11"
    assert p.csi_snapshot_name(content, "snap", 4) == "snap-0b5c"


def test_reserved_parameters_are_stripped_and_unknown_ones_refused() -> None:
    params = {"tier": "gold", p.SECRET_NAME_KEY: "s", p.SECRET_NAMESPACE_KEY: "ns"}
    assert p.strip_prefixed(params) == {"tier": "gold"}
    with pytest.raises(ValueError, match="reserved namespace"):
        p.strip_prefixed({"csi.storage.k8s.io/typo": "x"})


def test_secret_templates() -> None:
    params = {
        p.SECRET_NAME_KEY: "${volumesnapshot.name}-${volumesnapshotcontent.name}",
        p.SECRET_NAMESPACE_KEY: "${volumesnapshot.namespace}",
    }
    assert p.secret_ref(params, "snapcontent-1", "db", "team") == ("db-snapcontent-1", "team")
    assert p.secret_ref({}, "c", "s", "n") is None
    with pytest.raises(ValueError, match="Both must be specified"):
        p.secret_ref({p.SECRET_NAME_KEY: "x"}, "c", "s", "n")
    with pytest.raises(ValueError, match="invalid tokens"):
        # The snapshot's name is the user's to choose: it may not pick the namespace.
        p.secret_ref(
            {p.SECRET_NAME_KEY: "x", p.SECRET_NAMESPACE_KEY: "${volumesnapshot.name}"}, "c", "s", "n"
        )
    with pytest.raises(ValueError, match="not a valid secret name"):
        p.secret_ref(
            {p.SECRET_NAME_KEY: "${volumesnapshot.name}", p.SECRET_NAMESPACE_KEY: "n"}, "c", "Bad_Name", "n"
        )
