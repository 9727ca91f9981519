"""The Python client library: LutClient, its sessions and fetchers, the answer checks and retry
policy, the shared-memory client side. Never imports the daemon or the storage (nor rocksdict)."""

from lutstore.client.lut_client import LutClient
from lutstore.errors import LutError

__all__ = ["LutClient", "LutError"]
