"""The client's IP address, seen through trusted reverse proxies only.

``X-Forwarded-For`` and ``Forwarded`` are set by whoever sends the request, so they are believed
only when the TCP peer is one of ``server.trusted_proxies``. Then the addresses are read from the
right (the nearest hop first): each trusted proxy is skipped, and the first address that is not a
trusted proxy is the client's. Anything unreadable ends the walk at the last address believed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Final

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Most hops looked at in one header (a forged list can be long).
MAX_HOPS: Final = 32
_FOR: Final = re.compile(r'for="?\[?([^\]";,]+)\]?(?::\d+)?"?', re.IGNORECASE)


def networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The config's addresses/CIDRs as networks (validated by the config already)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _address(text: str) -> IPAddress | None:
    text = text.strip().strip('"').strip("[]")
    if text.count(":") == 1 and "." in text:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: IPAddress, trusted: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def _hops(headers: Mapping[str, str]) -> list[str]:
    """Forwarded ``for=`` values, else X-Forwarded-For's, nearest last."""
    forwarded = headers.get("Forwarded")
    if forwarded:
        return _FOR.findall(forwarded[:4096])
    xff = headers.get("X-Forwarded-For")
    if xff:
        return [part for part in xff[:4096].split(",") if part.strip()]
    return []


def client_ip(peer: str | None, headers: Mapping[str, str], trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address: the TCP ``peer``'s, or through trusted proxies the forwarded one."""
    address = _address(peer or "")
    if address is None:
        return peer or ""
    if not trusted or not _trusted(address, trusted):
        return str(address)
    for hop in reversed(_hops(headers)[-MAX_HOPS:]):
        forwarded = _address(hop)
        if forwarded is None:
            break
        address = forwarded
        if not _trusted(address, trusted):
            break
    return str(address)
