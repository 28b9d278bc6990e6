# SPDX-License-Identifier: MIT OR Apache-2.0. The team's file (buckd's README, "Vendoring"):
# its tool's names and commands, first written from buckd's sample. Upstream never overwrites it.
"""The commands buckd runs: the workload, which buck2's daemon_lifecycle.md never mentions.

buckd loads this module through one seam, COMMANDS: name -> (usage, help, handler). A vendoring
team replaces `hash` with its own commands (upstream's `debug` ones, which the lifecycle tests
use, live in buck_commands.py). The client makes its usage and its parser from the same table.

- usage: "[--x]" a flag, "[--x=V]" an option with a value, "P" an operand, "P..." one or more,
  "[P...]" any number. help: one line for `buck help`, or None for a hidden command.
- handler(call) is a generator that buckd runs in a thread of its own, one per running
  command. call.args: the operands (bytes: file names need not be UTF-8); call.options:
  {name: value}, "" for a flag; call.cwd: the client's cwd (bytes; buckd's own is "/");
  call.stop: an Event set when the command must stop (Ctrl-C, a kill); call.open(path, st=None):
  an os.open for reading that never hangs on a FIFO and never drops buckd's lock on buckd.pid
  (use it for every file you read; st, path's stat if you have it, spares one). It yields ("stdout" | "stderr", bytes) and returns its
  exit code, or None if it was stopped. Bad arguments: raise buck.Fail(message,
  buck.EXIT_USAGE); buckd shows it as the client shows its own, with the usage.
- status() returns named figures (name -> int) that `buck status` shows.
An exception of any other kind is a bug: buckd panics.
"""
# --- The names: the command and its daemon (buckd.pid, ~/.buck/buckd/, BUCKD_* follow from
# them), the file that marks a repository's root, and the files besides this one that are part of
# the version (your own modules).
TOOL, DAEMON = "buck", "buckd"
MARKER = f".{TOOL}config"
SOURCES = ("workload.py",)

import _thread                  # (not threading: the client imports us, and must start fast)
import os
import stat
import time

import buck                     # (only inside functions: buck imports us first)

# --- `hash`: sha256sum, with digests cached in buckd between commands

RACY_NS = 20_000_000            # a file changed this close to its hashing may change unseen...
COARSE_RACY_NS = 2_000_000_000  # ...or this close, where timestamps are whole seconds
CACHE_LIMIT = 1_000_000         # digests kept; past that the cache starts afresh
READ_SIZE = 1 << 20             # bytes per read when hashing
CHUNK = 64 * 1024               # bytes of output per event

digests = {}                    # dev << 64 | ino -> stamp() + hex digest
counts = {"files_read": 0}
lock = _thread.allocate_lock()  # guards writes to both; lookups take none


def status():
    return {"cache_entries": len(digests), "files_read": counts["files_read"]}


def cmd_hash(call):
    """`buck hash PATH...`: what sha256sum prints for these paths, a directory standing for
    the regular files below it, sorted; errors in their place on stderr, then exit 1."""
    code, out = 0, bytearray()
    for shown, digest in hash_jobs(call):
        if call.stop.is_set():
            return None
        if isinstance(digest, OSError):
            code = 1
            if out:                 # stdout before stderr, in the order of the paths
                yield "stdout", bytes(out)
                out.clear()
            yield "stderr", f"{buck.TOOL} hash: {buck.printable(shown)}: {digest.strerror}\n".encode()
            continue
        out += sha256sum_line(digest, shown)
        if len(out) >= CHUNK:
            yield "stdout", bytes(out)
            out.clear()
    if out:
        yield "stdout", bytes(out)
    return code


def hash_jobs(call):
    """(path as shown, hex digest or OSError) for each file, in output order."""
    for arg in call.args:
        path = os.path.join(call.cwd, arg)      # the client's cwd, not buckd's ("/")
        try:
            st = os.stat(path) if arg else os.stat(b"")     # "" names no file, as for sha256sum
            if stat.S_ISDIR(st.st_mode):
                shown, path = os.path.join(arg, b""), os.path.join(path, b"")   # both end in "/"
                for rel, st in files_below(path):
                    yield shown + rel, st if isinstance(st, OSError) else digest(call, path + rel, st)
            elif stat.S_ISREG(st.st_mode):
                yield arg, digest(call, path, st)
            else:
                yield arg, OSError(0, "Not a regular file")
        except OSError as e:
            yield arg, e


def digest(call, path, st):
    """A file's hex digest: cached while its size and times are unchanged, else read and cached
    under what the open file says of itself, unless "racy" (changed so recently that a change
    right after our read could keep its size and times) or on a filesystem whose files lie about
    their size (an empty /proc file may have content later, under the same stat). None if
    stopped midway; an OSError if it cannot be read."""
    entry = digests.get(st.st_dev << 64 | st.st_ino)
    known = stamp(st)
    if entry and entry.startswith(known):
        return entry[len(known):]
    import hashlib
    started, sha, size = time.time_ns(), hashlib.sha256(), 0
    try:
        fd = call.open(path, st=st)     # (st: what the walk saw: no need to stat it again)
        try:
            st = os.fstat(fd)       # the file we read, wherever the path leads now
            while stat.S_ISREG(st.st_mode) and (chunk := os.read(fd, READ_SIZE)):
                if call.stop.is_set():
                    return None
                sha.update(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except OSError as e:
        return e
    if not stat.S_ISREG(st.st_mode):
        return OSError(0, "Not a regular file")
    hexdigest = sha.hexdigest().encode()
    coarse = st.st_mtime_ns % 1_000_000_000 == 0        # (a whole second: maybe a coarse filesystem)
    newest = max(st.st_mtime_ns + (COARSE_RACY_NS if coarse else RACY_NS), st.st_ctime_ns + RACY_NS)
    with lock:
        counts["files_read"] += size > 0        # (an empty read costs nothing)
        if size == st.st_size and newest < started and not lies_about_size(st.st_dev):
            if len(digests) >= CACHE_LIMIT:
                digests.clear()
            digests[st.st_dev << 64 | st.st_ino] = stamp(st) + hexdigest
    return hexdigest


def stamp(st):
    """Size, mtime and ctime, packed: while they are unchanged, so is the digest."""
    return b"%d %d %d:" % (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


PSEUDO_FILESYSTEMS = {b"proc", b"sysfs", b"cgroup", b"cgroup2", b"debugfs", b"tracefs", b"configfs",
                      b"securityfs", b"bpf", b"pstore", b"efivarfs"}
pseudo_devices = {}             # st_dev -> whether it is one of those: from the mount table


def lies_about_size(dev):
    """Is device `dev` a filesystem whose files say 0 bytes, or 4096, whatever they hold (proc,
    sysfs, cgroup...)? Known by the mount table (Linux), once per device; elsewhere: no."""
    if dev not in pseudo_devices:
        mounts = (line.split() for line in (buck.read_file("/proc/self/mounts") or b"").splitlines())
        pseudo_devices[dev] = any(kind in PSEUDO_FILESYSTEMS and same_device(where, dev)
                                  for _, where, kind, *_ in mounts)
    return pseudo_devices[dev]


def same_device(mount_point, dev):
    try:
        return os.stat(mount_point.replace(b"\\040", b" ")).st_dev == dev
    except OSError:
        return False


def files_below(top):
    """(path relative to top, stat or OSError) of each regular file below top (which ends in
    "/"), in the order of their sorted paths: a directory at a time, in which a subdirectory
    sorts as its name and "/", as every path below it begins so."""
    stack = [sorted_entries(top)]
    while stack:
        for entry in stack[-1]:
            if entry.is_dir(follow_symlinks=False):
                try:
                    stack.append(sorted_entries(entry.path + b"/"))
                    break
                except OSError as e:
                    yield entry.path[len(top):] + b"/", e
            elif entry.is_file(follow_symlinks=False):
                try:
                    yield entry.path[len(top):], entry.stat(follow_symlinks=False)
                except OSError as e:            # e.g. removed since we listed it
                    yield entry.path[len(top):], e
        else:
            stack.pop()


def sorted_entries(path):
    with os.scandir(path) as entries:
        return iter(sorted(entries, key=lambda e: e.name + b"/" if e.is_dir(follow_symlinks=False) else e.name))


def sha256sum_line(hexdigest, name):
    """One line as sha256sum prints it: a name with \\, \\n or \\r is escaped, the line
    marked by a leading backslash."""
    if b"\\" in name or b"\n" in name or b"\r" in name:
        name = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\%s  %s\n" % (hexdigest, name)
    return b"%s  %s\n" % (hexdigest, name)


COMMANDS = {
    "hash": ("PATH...", f"print SHA-256 digests as sha256sum does, cached by {DAEMON}", cmd_hash),
}
