"""callme_compat options that cannot work are refused when the object is made."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from txcallme import CallmeServerService, Proxy

pytestmark = pytest.mark.timeout(30)


def test_compat_server_refuses_quorum() -> None:
    """callme declares a classic queue: callme_compat with quorum is a ValueError."""
    with pytest.raises(ValueError, match="queue_type='classic'"):
        CallmeServerService("t-compat-q", callme_compat=True, queue_type="quorum",
                            reactor=MemoryReactorClock())


def test_compat_proxy_refuses_direct_reply_to() -> None:
    """callme servers declare the reply exchange: no Direct Reply-to with callme_compat."""
    with pytest.raises(ValueError, match="direct_reply_to"):
        Proxy(callme_compat=True, direct_reply_to=True, reactor=MemoryReactorClock())


def test_compat_is_off_by_default() -> None:
    """Servers and proxies speak only JSON unless callme_compat=True is given."""
    assert CallmeServerService("t-compat-d", reactor=MemoryReactorClock()).callme_compat \
        is False
    proxy = Proxy(reactor=MemoryReactorClock())
    assert proxy.callme_compat is False
    proxy.close()
