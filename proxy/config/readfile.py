"""Reading the config file: one bounded read (a huge or endless file is refused, not loaded)."""

from __future__ import annotations

import os
import stat

from proxy.config.errors import ConfigError
from proxy.config.units import parse_size

MAX_CONFIG_SIZE = 4 * 1024 * 1024
SIZE_ENV = "CANARY_PROXY_MAX_CONFIG_SIZE"  # the cap of the first read (the file's own key: reloads)


def _env_size() -> int:
    raw = os.environ.get(SIZE_ENV, "")
    try:
        return parse_size(raw) if raw else MAX_CONFIG_SIZE
    except ValueError:
        return MAX_CONFIG_SIZE


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "Is a directory"  # what reading one used to say (strerror of EISDIR)
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special"
    return f"not a regular file ({kind})"



def read_config_bytes(path: str, max_size: int | None = None) -> bytes:
    """The file's bytes: only a regular file (after following symlinks), at most `max_size` bytes.
    Raises ConfigError. Opened non-blocking, so a FIFO in its place never hangs the caller."""
    limit = max_size if max_size is not None else _env_size()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError([f"cannot read config file: {e.strerror or e}"], path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([f"cannot read config file: {_file_kind(st.st_mode)}"], path)
        if st.st_size > limit:
            raise ConfigError([f"config file too big: {st.st_size} bytes, the limit is {limit}"], path)
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:  # it grew while we read
            raise ConfigError([f"config file too big: over {limit} bytes"], path)
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError([f"cannot read config file: {e.strerror or e}"], path) from None
    finally:
        os.close(fd)
