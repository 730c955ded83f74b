"""Run a command with a hung FUSE file system mounted at a path, in a mount namespace of its own.

    unshare --mount --propagation private python hungmount.py MOUNTPOINT COMMAND...

The FUSE connection is opened and mounted but never served: the kernel's first request (INIT)
is never answered, so every stat/open/readdir under MOUNTPOINT blocks, as on a dead NFS or
CephFS mount. The /dev/fuse descriptor is passed to COMMAND (which never reads it), so the mount
stays hung exactly as long as COMMAND runs. Needs root (or CAP_SYS_ADMIN) and /dev/fuse; no
fusermount or FUSE library.
"""

from __future__ import annotations

import ctypes
import os
import sys


def main() -> None:
    mountpoint, argv = sys.argv[1], sys.argv[2:]
    fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"hung", mountpoint.encode(), b"fuse", 0, opts) != 0:
        sys.exit(f"hungmount: mount failed: {os.strerror(ctypes.get_errno())}")
    os.set_inheritable(fd, True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
