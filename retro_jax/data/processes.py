"""Whether a process of this host is still alive: what the clean-up of files left by a killed
process decides by (build-db's combine lock, export's side folders)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True if process `pid` of this host exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
