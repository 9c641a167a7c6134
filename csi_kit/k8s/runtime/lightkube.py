"""The production `KubeAPI`: lightkube's async client.

Why lightkube: async-native (httpx), small, maintained, reads in-cluster and
kubeconfig credentials the standard way, and has generic resources for CRDs.
Every kind is addressed through a generic (dict-shaped) resource class built
here and *not* registered in lightkube's global registry, so the loops see the
JSON the server sent -- the same shape the fake API gives -- and our classes
cannot collide with typed models another library in the process registered.

lightkube's watch re-opens itself from the last version when the server ends
a stream; a 410 surfaces as `ApiError(410)` for the informer to re-list.

Every request carries a User-Agent naming its sender (`csi-kit-<loop>/<v>`),
as upstream's sidecars send theirs, so the audit log and API Priority and
Fairness can tell the loops apart.  lightkube has no per-request headers, so
`with_agent` opens a sibling client on the same kubeconfig (and transport)
whose connection pool sends that agent -- one pool per agent, as each
upstream sidecar has its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
from lightkube import AsyncClient, KubeConfig, operators
from lightkube.core import resource as lk_res
from lightkube.core.exceptions import ApiError as LKApiError
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericGlobalStatus,
    GenericNamespacedResource,
    GenericNamespacedStatus,
    create_api_info,
)
from lightkube.types import PatchType

from csi_kit._version import __version__
from csi_kit.k8s.objects import selectors
from csi_kit.k8s.runtime.api import ApiError, Obj, ObjectList, Resource, WatchEvent

_classes: dict[Resource, Any] = {}

#: The agent of a connection opened without one (what `connect` gives the CLI's raw client).
DEFAULT_AGENT = f"csi-kit/{__version__}"


def _cls(res: Resource) -> Any:
    """A dict-shaped lightkube resource class for `res` (cached, unregistered)."""
    cached = _classes.get(res)
    if cached is not None:
        return cached
    info = create_api_info(res.group, res.version, res.kind, res.plural)
    base, status_base = (
        (GenericNamespacedResource, GenericNamespacedStatus)
        if res.namespaced
        else (GenericGlobalResource, GenericGlobalStatus)
    )
    status_info = lk_res.ApiInfo(
        resource=info.resource,
        parent=info.resource,
        plural=res.plural,
        verbs=["get", "patch", "put"],
        action="status",
    )
    c: Any = type(res.kind, (base,), {"_api_info": info})
    c.Status = type(res.kind + "Status", (status_base,), {"_api_info": status_info})
    _classes[res] = c
    return c


def _plain(obj: Any) -> Obj:
    d: Obj = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return d


_OPERATORS: dict[str, Any] = {
    "!=": lambda v: operators.not_equal(v[0]),
    "in": lambda v: operators.in_(list(v)),
    "notin": lambda v: operators.not_in(list(v)),
    "exists": lambda v: operators.exists(),
    "!exists": lambda v: operators.not_exists(),
}


def _labels(selector: str | None) -> dict[str, Any] | None:
    """A selector string as lightkube's label dict, every term with its operator kept.

    `c!=d` must not become key `c!` (nor `e` a test for an empty value), or the
    server filters on the wrong thing.
    """
    if not selector:
        return None
    return {
        t.key: t.values[0] if t.op == "=" else _OPERATORS[t.op](t.values) for t in selectors.parse(selector)
    }


def _convert(e: BaseException) -> BaseException:
    if isinstance(e, LKApiError):
        st = e.status
        return ApiError(int(st.code or 0), str(st.reason or ""), str(st.message or ""))
    if isinstance(e, httpx2.HTTPStatusError):
        return ApiError(e.response.status_code, e.response.reason_phrase, e.response.text[:500])
    if isinstance(e, httpx2.HTTPError):
        return ConnectionError(str(e))
    return e


def _set_user_agent(client: AsyncClient, agent: str) -> None:
    """Make every request of `client` carry `agent` (lightkube keeps its httpx client one level down)."""
    http = getattr(getattr(client, "_client", None), "_client", None)
    if not isinstance(http, httpx2.AsyncClient):  # a lightkube release that moved it: fail loudly, in tests
        raise RuntimeError(
            "cannot set the User-Agent: lightkube's AsyncClient has no httpx2 client at _client._client"
        )
    http.headers["User-Agent"] = agent


class LightkubeAPI:
    """The `KubeAPI` over one lightkube client; `open` remembers how, so `with_agent` can open siblings."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        config: KubeConfig | None = None,
        timeout: float = 30.0,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        # Typed as Any: lightkube's overloads are keyed on its resource base
        # classes, which our runtime-built classes satisfy but mypy cannot see.
        self.client: Any = client
        self._config = config
        self._timeout = timeout
        self._transport = transport

    @classmethod
    def open(
        cls,
        config: KubeConfig,
        *,
        timeout: float = 30.0,
        agent: str = DEFAULT_AGENT,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> LightkubeAPI:
        """A client on `config` whose requests carry `agent` (`transport` replaces the network: tests)."""
        client = AsyncClient(
            config, timeout=httpx2.Timeout(timeout), field_manager="csi-kit", transport=transport
        )
        _set_user_agent(client, agent)
        return cls(client, config=config, timeout=timeout, transport=transport)

    @classmethod
    def connect(
        cls, kubeconfig: str | None = None, *, timeout: float = 30.0, agent: str = DEFAULT_AGENT
    ) -> LightkubeAPI:
        """In-cluster service account when no kubeconfig is given (then $KUBECONFIG, ~/.kube/config)."""
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        return cls.open(config, timeout=timeout, agent=agent)

    def with_agent(self, agent: str) -> LightkubeAPI:
        """A sibling on the same kubeconfig whose requests carry `agent`; close it on its own.

        An adapter wrapped around a client made elsewhere cannot reopen it:
        it keeps its one client (and that client's User-Agent).
        """
        if self._config is None:
            return self
        return self.open(self._config, timeout=self._timeout, agent=agent, transport=self._transport)

    async def close(self) -> None:
        await self.client.close()

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj:
        try:
            kw = {"namespace": namespace} if res.namespaced else {}
            return _plain(await self.client.get(_cls(res), name, **kw))
        except Exception as e:
            raise _convert(e) from None

    async def list(
        self, res: Resource, namespace: str | None = None, label_selector: str | None = None
    ) -> ObjectList:
        try:
            kw: dict[str, Any] = {"labels": _labels(label_selector)}
            if res.namespaced:
                kw["namespace"] = namespace or "*"
            it = self.client.list(_cls(res), **kw)
            items = [_plain(o) async for o in it]
            try:
                rv = it.resourceVersion
            except Exception:  # an empty answer may carry no version in lightkube's iterator
                rv = ""
            return ObjectList(items, rv)
        except Exception as e:
            raise _convert(e) from None

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int | None = None,
    ) -> AsyncIterator[WatchEvent]:
        kw: dict[str, Any] = {
            "labels": _labels(label_selector),
            "resource_version": resource_version or None,
            "server_timeout": timeout_seconds,
        }
        if res.namespaced:
            kw["namespace"] = namespace or "*"
        try:
            async for ev_type, obj in self.client.watch(_cls(res), **kw):
                yield WatchEvent(str(ev_type), _plain(obj))
        except Exception as e:
            raise _convert(e) from None

    async def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        try:
            kw = (
                {"namespace": namespace or (obj.get("metadata") or {}).get("namespace")}
                if res.namespaced
                else {}
            )
            return _plain(await self.client.create(_cls(res)(obj), **kw))
        except Exception as e:
            raise _convert(e) from None

    async def update(self, res: Resource, obj: Obj) -> Obj:
        try:
            kw = {"namespace": obj["metadata"].get("namespace")} if res.namespaced else {}
            return _plain(await self.client.replace(_cls(res)(obj), **kw))
        except Exception as e:
            raise _convert(e) from None

    async def update_status(self, res: Resource, obj: Obj) -> Obj:
        try:
            kw = {"namespace": obj["metadata"].get("namespace")} if res.namespaced else {}
            return _plain(await self.client.replace(_cls(res).Status(obj), obj["metadata"]["name"], **kw))
        except Exception as e:
            raise _convert(e) from None

    async def patch(
        self, res: Resource, name: str, patch: Obj, namespace: str | None = None, *, status: bool = False
    ) -> Obj:
        try:
            target = _cls(res).Status if status else _cls(res)
            kw = {"namespace": namespace} if res.namespaced else {}
            return _plain(await self.client.patch(target, name, patch, patch_type=PatchType.MERGE, **kw))
        except Exception as e:
            raise _convert(e) from None

    async def delete(
        self, res: Resource, name: str, namespace: str | None = None, *, uid: str | None = None
    ) -> None:
        # lightkube's delete takes no body, so the uid precondition cannot be sent;
        # the loops only delete objects they just read, by their unique name.
        try:
            kw = {"namespace": namespace} if res.namespaced else {}
            await self.client.delete(_cls(res), name, **kw)
        except Exception as e:
            raise _convert(e) from None
