"""What a server serves and how it protects itself: one dataclass, checked when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InputError


@dataclass
class ServerConfig:
    """The models served (loaded once at start) and the server's limits.

    - ``base``, ``base_config``, ``image_encoder``, ``motion_adapter``: as for ``ipadapter generate``; requests
      never name them. ``adapters`` (at least one) and ``controlnets``: what requests may pick, by the names
      given here (the first adapter is the default).
    - ``host``: 127.0.0.1 by default (this machine only). ``token``: a bearer token every ``/v1`` request must
      send (None: open). ``max_queue``: jobs waiting or running at most; more get 429.
    - ``max_body_bytes``: largest request body (413). ``max_pixels``: largest decoded input image, and largest
      output image (width x height), in pixels (422).
    - ``body_timeout``: seconds a client has, once its headers are in, to send the whole body; slower get 408. No
      queue slot is held while a body arrives, so slow senders cannot lock other clients out.
    - ``keep_finished`` / ``keep_seconds``: finished ``/v1/jobs`` results are kept for polling, at most this many,
      for at most this long.
    - ``compile``: compile each denoiser (``torch.compile``) and warm it up at start with one generation at the
      native size, so the first requests of that size do not wait for the compiler.
    """

    base: str
    adapters: list[str]
    base_config: str | None = None
    image_encoder: str | None = None
    controlnets: list[str] = field(default_factory=list)
    motion_adapter: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 32
    token: str | None = None
    max_body_bytes: int = 32 * 2**20
    body_timeout: float = 30.0
    max_pixels: int = 4096 * 4096
    device: str = "auto"
    dtype: str | None = None
    keep_finished: int = 64
    keep_seconds: float = 600.0
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base.strip():
            raise InputError(
                "server: no base model; give the base to serve (a folder, hub id or single file)"
            )
        for key in ("adapters", "controlnets"):
            names = getattr(self, key)
            if not isinstance(names, list | tuple) or not all(
                isinstance(n, str) and n.strip() for n in names
            ):
                raise InputError(f"server: {key} must be a list of non-empty names; got {names!r}")
            if len(set(names)) != len(names):
                raise InputError(f"server: {key} {list(names)} name one model twice; give each once")
            setattr(self, key, list(names))
        if not self.adapters:
            raise InputError("server: no adapter; give at least one adapter to serve (--adapter)")
        for key, low in (
            ("port", 0),
            ("max_queue", 1),
            ("max_body_bytes", 1),
            ("max_pixels", 64),
            ("keep_finished", 0),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"server: {key} is {value!r}; expected a whole number >= {low}")
        if not 0 <= self.port <= 65535:
            raise InputError(f"server: port {self.port} is outside 0-65535")
        timeout = self.body_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise InputError(f"server: body_timeout is {timeout!r}; expected a number of seconds > 0")
        if not self.keep_seconds > 0:
            raise InputError(f"server: keep_seconds is {self.keep_seconds!r}; expected a number > 0")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise InputError("server: the token is empty; give a non-empty token or none (an open server)")
