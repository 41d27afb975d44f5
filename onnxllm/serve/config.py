"""What a server is started with: models, address, limits. Parsed and checked before anything loads."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import OnnxLLMError

DEFAULT_KEEP_ALIVE_S = 300.0  # ollama's keep_alive default: 5 minutes


@dataclass(frozen=True)
class ServeOptions:
    models: tuple[str, ...] = ()  # catalog names, package paths or names in the cache folder; () = catalog default
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 64  # requests that may wait for one model behind the one it is running
    keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S  # idle seconds before a model is unloaded; None: never
    cors_origins: tuple[str, ...] = ()  # CORS stays off unless origins are given
    max_body_bytes: int = 4 << 20  # a 4 MiB JSON body holds ~1M tokens of text: far past any context here
    device: str = "auto"
    threads: int | None = None
    context: int | None = None

    def validate(self) -> "ServeOptions":
        if not 0 <= self.port <= 65535:
            raise OnnxLLMError(f"--port must be 0-65535, got {self.port}")
        if self.max_queue < 0:
            raise OnnxLLMError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise OnnxLLMError("--api-key is empty; give a key or leave the option out")
        if self.max_body_bytes < 1024:
            raise OnnxLLMError(f"the body limit must be at least 1024 bytes, got {self.max_body_bytes}")
        for origin in self.cors_origins:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise OnnxLLMError(f"--cors takes an origin like http://localhost:3000 (or *), got {origin!r}")
        return self

    def warnings(self) -> list[str]:
        """What an operator should know before exposing the server."""
        out = []
        if not is_loopback(self.host) and self.api_key is None:
            out.append(f"listening on {self.host} without --api-key: anyone who can reach this address can use "
                       "the models; pass --api-key KEY (or set ONNXLLM_API_KEY)")
        if "*" in self.cors_origins:
            out.append("--cors '*' lets every web page in a browser on this machine call the server")
        return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """'300', '30s', '5m', '1h', '1m30s' -> seconds; a negative value ('-1') -> None (never unload)."""
    value = str(text).strip().lower()
    if re.fullmatch(r"-\d+(\.\d+)?[a-z]*", value):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise OnnxLLMError(f"--keep-alive takes a duration like 300, 30s, 5m, 1h or -1 (never unload), got {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)
