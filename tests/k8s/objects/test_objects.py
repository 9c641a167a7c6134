"""csi_kit.k8s.objects: the pure helpers every loop shares (quantities, times, selectors, names)."""

from __future__ import annotations

import datetime

import pytest

from csi_kit.k8s.objects import selectors
from csi_kit.k8s.objects.meta import set_finalizers_patch
from csi_kit.k8s.objects.names import is_dns1123_label, is_dns1123_subdomain, sanitize_lease_name
from csi_kit.k8s.objects.quantity import format_quantity, parse_quantity
from csi_kit.k8s.objects.templates import TemplateError, expand
from csi_kit.k8s.objects.times import micro_time, rfc3339, rfc3339_from_ns


@pytest.mark.parametrize(
    ("n", "q"), [(0, "0"), (1, "1"), (1024, "1Ki"), (1536, "1536"), (1 << 30, "1Gi"), (5 << 40, "5Ti")]
)
def test_quantity_is_canonical_binary_si(n: int, q: str) -> None:
    assert format_quantity(n) == q
    assert parse_quantity(q) == n


def test_times_are_rfc3339_utc() -> None:
    assert rfc3339_from_ns(1_700_000_000_123_456_789) == "2023-11-14T22:13:20Z"
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    assert rfc3339(datetime.datetime(2024, 1, 1, 2, 0, 5, tzinfo=plus_two)) == "2024-01-01T00:00:05Z"
    assert micro_time().endswith("Z") and len(micro_time()) == len("2024-01-01T00:00:05.000000Z")


def test_finalizer_patch_keeps_order_and_guards_the_version() -> None:
    obj = {"metadata": {"finalizers": ["b", "a"], "resourceVersion": "7"}}
    assert set_finalizers_patch(obj, add={"a"}) is None
    assert set_finalizers_patch(obj, add={"d", "c"}) == {
        "metadata": {"finalizers": ["b", "a", "c", "d"], "resourceVersion": "7"}
    }
    assert set_finalizers_patch(obj, remove={"a", "b"}) == {
        "metadata": {"finalizers": None, "resourceVersion": "7"}
    }


@pytest.mark.parametrize(
    ("selector", "labels", "want"),
    [
        ("", {}, True),
        ("a=b", {"a": "b"}, True),
        ("a==b", {"a": "b"}, True),
        ("a=b", {"a": "c"}, False),
        ("a!=b", {}, True),
        ("a!=b", {"a": "b"}, False),
        ("a", {"a": ""}, True),
        ("!a", {"a": ""}, False),
        ("a in (x, y),b notin (z)", {"a": "y"}, True),
        ("a in (x,y)", {}, False),
        ("b notin (z)", {"b": "z"}, False),
        ("a=b, c", {"a": "b"}, False),
    ],
)
def test_string_selectors_match_as_the_api_server_does(
    selector: str, labels: dict[str, str], want: bool
) -> None:
    assert selectors.matches(selector, labels) is want


def test_structured_selectors() -> None:
    sel = {
        "matchLabels": {"app": "db"},
        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}],
    }
    assert selectors.label_selector_matches(sel, {"app": "db"})
    assert not selectors.label_selector_matches(sel, {"app": "db", "tier": "x"})
    assert not selectors.label_selector_matches(sel, {"app": "web"})
    assert selectors.label_selector_matches(
        {"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}
    )
    assert selectors.format_label_selector(sel) == "app=db,tier notin (x)"
    assert selectors.format_label_selector({}) == "<none>"
    with pytest.raises(ValueError, match="operator"):
        selectors.label_selector_matches({"matchExpressions": [{"key": "a", "operator": "Near"}]}, {})
    with pytest.raises(ValueError, match="selector term"):
        selectors.parse("a b")


def test_dns1123_names() -> None:
    assert is_dns1123_label("kube-system") and not is_dns1123_label("a.b") and not is_dns1123_label("x" * 64)
    assert is_dns1123_subdomain("a.b-c") and not is_dns1123_subdomain("A") and not is_dns1123_subdomain("")
    assert not is_dns1123_subdomain("a" * 254)
    assert sanitize_lease_name("hostpath.csi-kit.io") == "hostpath-csi-kit-io"
    assert sanitize_lease_name("a.b.") == "a-b-X"


def test_templates_expand_known_tokens_and_name_the_unknown() -> None:
    assert expand("s-${pvc.name}", {"pvc.name": "x"}) == "s-x"
    assert expand("plain", {}) == "plain"
    with pytest.raises(TemplateError) as e:
        expand("${b}-${a}-${b}", {})
    assert e.value.missing == ["a", "b"]
