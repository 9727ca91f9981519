"""Log output of the daemon: human text (default) or one JSON object per line
(`--log-format json`) for log shippers (Loki, Elasticsearch, Cloud Logging)."""

from __future__ import annotations

import json
import logging
import time

# Attributes every LogRecord has; anything else came in through `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...extra fields, "exc"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def use_format(fmt: str) -> None:
    """Switch every root handler (set up by the CLI) to `fmt`: "text" or "json"."""
    if fmt == "json":
        root = logging.getLogger()
        if not root.handlers:
            logging.basicConfig()
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
