"""Daemon addresses as users type them: "host:port", or "h1:p1,h2:p2" for replicas.

Checked at once, before any connection is tried, so that a typo is one clear
line instead of ten seconds of retries ("127.0.0.1" alone would quietly mean
port 443 to gRPC; "http://..." ends in "Misformatted domain name").
"""

from __future__ import annotations

import re
import socket

from lutstore.errors import UserError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")
_BRACKETED = re.compile(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$")   # [::1]:50051
EXAMPLE = "127.0.0.1:50051"


class AddressError(UserError, ValueError):
    """A malformed daemon address (a ValueError too, as the client raised before)."""


def _check_one(part: str) -> str:
    if _SCHEME.match(part):
        scheme = _SCHEME.match(part).group(1)
        rest = part.split("://", 1)[-1].rstrip("/")
        raise AddressError(f"lutstore address {part!r} is a URL: give host:port without '{scheme}://' (e.g. {rest})")
    if _BRACKETED.match(part):
        port = _BRACKETED.match(part).group(2)
    else:
        host, sep, port = part.rpartition(":")
        if not sep or not host:
            raise AddressError(f"lutstore address {part!r} has no port: give host:port (e.g. {part}:50051, "
                               f"the port `lutstore serve` uses by default)")
        if ":" in host:
            raise AddressError(f"lutstore address {part!r}: write an IPv6 host in brackets, e.g. [::1]:50051")
        if any(c.isspace() or c in "/@?#" for c in host):
            raise AddressError(f"lutstore address {part!r}: {host!r} is not a host name")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"lutstore address {part!r}: port {port!r} is not a number in 1..65535")
    return part


def parse_addresses(text: str) -> list[str]:
    """The "host:port" entries of a daemon address ("h1:p1,h2:p2" lists replicas); AddressError
    (one line naming the entry and the fix) for anything else."""
    if not isinstance(text, str):
        raise AddressError(f"lutstore address must be a string like {EXAMPLE!r}, not {type(text).__name__}")
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise AddressError(f"empty lutstore address: give host:port, e.g. {EXAMPLE}")
    if not all(parts):
        raise AddressError(f"lutstore address {text!r} has an empty entry between commas")
    return [_check_one(p) for p in parts]


def _split(address: str) -> tuple[str, int]:
    m = _BRACKETED.match(address)
    if m:
        return m.group(1), int(m.group(2))
    host, _, port = address.rpartition(":")
    return host, int(port)


def why_unreachable(addresses: list[str], timeout: float = 0.5) -> str | None:
    """None if a TCP connection to any address opens within `timeout`; else why not (for a
    "connecting to ... (retrying for N s)" line while the gRPC client keeps trying)."""
    reasons = []
    for address in addresses:
        host, port = _split(address)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return None
        except socket.gaierror:
            reasons.append(f"cannot resolve {host!r}")
        except socket.timeout:
            reasons.append("no answer yet")
        except OSError as e:
            reasons.append(e.strerror or str(e))
    return "; ".join(dict.fromkeys(reasons))
