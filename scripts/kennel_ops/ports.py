"""Free TCP ports on 127.0.0.1, for servers the tools and tests start."""
from __future__ import annotations

import random
import socket

# multi-model-server refuses ports from 32767 up (it keeps them in a Java short), and the
# kernel's own picks for port 0 are above that.
MMS_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A port the kernel says is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_mms_port() -> int:
    """A free port that multi-model-server accepts."""
    for _ in range(200):
        port = random.randint(*MMS_PORT_RANGE)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {MMS_PORT_RANGE[0]} and {MMS_PORT_RANGE[1]}")
