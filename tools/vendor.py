# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""vendor: make, or upgrade, a team's copy of buckd under the team's own names.

    python3 tools/vendor.py DEST --tool acme --daemon acmed

The upstream files are found beside this script (its parent directory), whatever the cwd.
Into DEST (created if need be) it copies UPSTREAM over any older copies; writes the team's
file workload.py from upstream's sample, the names replaced, only if DEST has none (never
overwriting it), and DEST/.gitignore likewise; generates the stubs with this Python's
grpc_tools; compiles the bytecode; writes the launcher DEST/<tool>; and records the release
vendored in DEST/VENDORED.json. Run again over the same DEST (with a newer upstream), it
upgrades in place and prints the release it replaced and the new one. Standard library only.
"""
import ast
import compileall
import datetime
import hashlib
import importlib.util
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))    # upstream's checkout
# The one list of what a vendored copy needs from upstream, besides the team's workload.py:
# the code, the lifecycle tests and what they import (tools/lifecycle.py, where test_buckd.py
# looks for it), the license and the changelog. Each is overwritten at every upgrade.
UPSTREAM = ("buck.py", "buckd.py", "buck_commands.py", "daemon.proto", "test_buckd.py",
            "tools/lifecycle.py", "LICENSE-MIT", "LICENSE-APACHE", "CHANGELOG.md")
TEAM_FILE = "workload.py"           # the team's: written once from upstream's sample, then theirs
STUBS = ("daemon_pb2.py", "daemon_pb2_grpc.py")     # generated from daemon.proto, here
RECORD = "VENDORED.json"            # what was vendored: release, checksum, date, names, files
GITIGNORE = ".gitignore"            # written once, then the team's (to commit the stubs, say)
NAMES_LINE = re.compile(r'^TOOL, DAEMON = .*$', re.M)    # in workload.py, the names block
NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
USAGE = "python3 tools/vendor.py DEST --tool NAME --daemon NAME"
LAUNCHER = """#!/usr/bin/env python3
# {tool}: runs the {tool} vendored beside this file (its real path), from any directory or repository.
# Written by buckd's tools/vendor.py at every vendoring: never edit it.
import os, sys
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import buck
buck.entry()
"""
IGNORED = """# Written by buckd's tools/vendor.py, then yours. The stubs are regenerated at every
# vendoring; to commit them instead, drop their lines: they then need grpcio >= the
# grpcio-tools that generated them (GRPC_GENERATED_VERSION in daemon_pb2_grpc.py).
__pycache__/
.pytest_cache/
/daemon_pb2.py
/daemon_pb2_grpc.py
"""


class Fail(Exception):
    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def say(message):
    print(message, flush=True)


def parse(argv):
    """DEST, tool, daemon from the command line, or Fail(..., 2)."""
    if argv in (["-h"], ["--help"]):
        say(f"usage: {USAGE}")
        sys.exit(0)
    dest, names, args = None, {}, list(argv)
    while args:
        arg = args.pop(0)
        key, eq, value = arg.partition("=")
        if key in ("--tool", "--daemon"):
            if not eq:
                if not args:
                    raise Fail(f"{key} needs a value", 2)
                value = args.pop(0)
            if key in names:
                raise Fail(f"{key} given twice", 2)
            names[key] = value
        elif arg.startswith("-") and arg != "-":
            raise Fail(f"unknown option {arg}", 2)
        elif dest is not None:
            raise Fail(f"one DEST only, not {dest!r} and {arg!r}", 2)
        else:
            dest = arg
    if not dest:
        raise Fail("DEST is missing", 2)
    for key in ("--tool", "--daemon"):
        if key not in names:
            raise Fail(f"{key} is missing", 2)
        if not NAME.fullmatch(names[key]):
            raise Fail(f"{key} {names[key]!r} is not a plain name (a lowercase letter, then "
                       f"lowercase letters, digits, '-' or '_'; 40 at most)", 2)
    tool, daemon = names["--tool"], names["--daemon"]
    if tool == daemon:
        raise Fail(f"--tool and --daemon must differ, not both {tool!r}", 2)
    taken = {name.split("/")[0] for name in (*UPSTREAM, *STUBS, TEAM_FILE, RECORD)}
    if tool in taken:
        raise Fail(f"--tool {tool!r} would be the launcher's name, and DEST/{tool} is upstream's", 2)
    return os.path.abspath(dest), tool, daemon


def literal(path, name):
    """The string value a module at path assigns to `name` at its top level (`TOOL, DAEMON =
    "a", "b"` too), or None: read, never imported."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = [(target, value)]
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                pairs = list(zip(target.elts, value.elts))
            for t, v in pairs:
                if isinstance(t, ast.Name) and t.id == name and isinstance(v, ast.Constant):
                    return v.value
    return None


def checksum(base, files):
    """sha256 of the named files' names and contents: the upstream files vendored."""
    sha = hashlib.sha256()
    for name in files:
        with open(os.path.join(base, name), "rb") as f:
            data = f.read()
        sha.update(b"%s\0%d\0%s" % (name.encode(), len(data), data))
    return sha.hexdigest()


def write(path, data, mode=0o644):
    """Write path atomically (a client running meanwhile sees the old file or the new one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".vendor-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read(path):
    with open(path, "rb") as f:
        return f.read()


def previous(dest):
    """What DEST held: its record (a dict), {} for nothing vendored there yet."""
    path = os.path.join(dest, RECORD)
    if not os.path.exists(path):            # none, or a copy made by hand: its buck.py says
        made = os.path.join(dest, "buck.py")
        if not os.path.isfile(made):
            return {}
        whole = all(os.path.isfile(os.path.join(dest, name)) for name in UPSTREAM)
        return {"release": literal(made, "RELEASE") or "(before 1.0.0)",
                "checksum": checksum(dest, UPSTREAM) if whole else None}
    try:
        record = json.loads(read(path))
        assert isinstance(record, dict) and isinstance(record.get("release"), str)
        return record
    except (ValueError, AssertionError):
        raise Fail(f"{path} is not a record that vendor.py wrote: move it away to vendor afresh")


def check_team_file(dest, tool, daemon):
    """DEST's workload.py, if any, is of the 1.0.0 layout and names this tool and daemon."""
    path = os.path.join(dest, TEAM_FILE)
    if not os.path.exists(path):
        return False
    try:
        names = literal(path, "TOOL"), literal(path, "DAEMON")
    except SyntaxError as e:
        raise Fail(f"{path}: line {e.lineno}: {e.msg}: fix the team's file, then run this again")
    if names == (None, None) and not re.search(r"^TOOL\b", read(path).decode(errors="replace"), re.M):
        raise Fail(f"{path} has no names block (TOOL, DAEMON = ...): a layout older than 1.0.0; "
                   f"move your names and commands into it as {os.path.join(ROOT, 'CHANGELOG.md')} "
                   f"(1.0.0) says, then run this again")
    if None not in names and names != (tool, daemon):
        raise Fail(f"{path} names the tool {names[0]!r} and daemon {names[1]!r}, not {tool!r} "
                   f"and {daemon!r}: pass the team's names, or change them there first", 2)
    return True


def vendor(dest, tool, daemon):
    if sys.version_info < (3, 11):
        raise Fail(f"needs Python 3.11 or newer (buckd's floor), not {sys.version.split()[0]}")
    if importlib.util.find_spec("grpc_tools") is None:
        raise Fail(f"{sys.executable} has no grpc_tools, to generate the stubs: "
                   f"`{sys.executable} -m pip install 'grpcio-tools>=1.85,<2'`, then run this again")
    if os.path.realpath(dest) == ROOT:
        raise Fail(f"DEST {dest} is upstream's own checkout")
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise Fail(f"DEST {dest} exists and is not a directory")
    missing = [name for name in (*UPSTREAM, TEAM_FILE) if not os.path.isfile(os.path.join(ROOT, name))]
    if missing:
        raise Fail(f"upstream {ROOT} lacks {', '.join(missing)}: vendor from a full checkout")
    release = literal(os.path.join(ROOT, "buck.py"), "RELEASE")
    if not isinstance(release, str):
        raise Fail(f"upstream {os.path.join(ROOT, 'buck.py')} has no RELEASE = \"X.Y.Z\"")
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:
        raise Fail(f"cannot make DEST {dest}: {e.strerror}")
    old = previous(dest)
    kept = check_team_file(dest, tool, daemon)
    new_sum = checksum(ROOT, UPSTREAM)

    for name in UPSTREAM:                                   # upstream's: a plain overwrite
        write(os.path.join(dest, name), read(os.path.join(ROOT, name)))
    for name in old.get("files", ()):                       # an older release's, not this one's
        path = os.path.normpath(os.path.join(dest, str(name)))
        if name not in UPSTREAM and os.path.commonpath([dest, path]) == dest and os.path.isfile(path) \
                and os.path.basename(path) not in (TEAM_FILE, GITIGNORE, RECORD, tool):
            os.unlink(path)
    if not kept:                                            # the team's file: written once
        sample = read(os.path.join(ROOT, TEAM_FILE)).decode()
        text, n = NAMES_LINE.subn(f'TOOL, DAEMON = "{tool}", "{daemon}"', sample, count=1)
        if n != 1:
            raise Fail(f"upstream {os.path.join(ROOT, TEAM_FILE)} has no `TOOL, DAEMON = ...` line")
        write(os.path.join(dest, TEAM_FILE), text.encode())
    if not os.path.exists(os.path.join(dest, GITIGNORE)):
        write(os.path.join(dest, GITIGNORE), IGNORED.encode())
    grpc_version = generate_stubs(dest)
    write(os.path.join(dest, tool), LAUNCHER.format(tool=tool).encode(), 0o755)
    # checked-hash bytecode: valid while the source's hash matches, whatever the mtimes say (an
    # upgrade within a second of the last vendoring, a file of the same size, a restored backup)
    if not compileall.compile_dir(dest, maxlevels=0, quiet=2, force=True,
                                  invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH):
        raise Fail(f"could not compile the modules in {dest}: run `{sys.executable} -m compileall "
                   f"-l {dest}` to see why")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {"release": release, "checksum": new_sum, "date": date, "tool": tool,
              "daemon": daemon, "grpcio_tools": grpc_version, "files": list(UPSTREAM)}
    write(os.path.join(dest, RECORD), (json.dumps(record, indent=2) + "\n").encode())

    if not old:
        say(f"{tool}: vendored upstream {release} into {dest}")
    elif old["release"] != release:
        say(f"{tool}: upstream {old['release']} -> {release} (see CHANGELOG.md for what to do)")
    elif old.get("checksum") != new_sum:
        say(f"{tool}: upstream {release} again, but its files changed")
    else:
        say(f"{tool}: upstream {release} again, unchanged")
    say(f"{tool}: {TEAM_FILE} kept: the team's file" if kept else
        f"{tool}: {TEAM_FILE} written from upstream's sample: replace its `hash` with your commands")
    say(f"{tool}: stubs generated by grpcio-tools {grpc_version}: they need grpcio >= {grpc_version}")
    say(f"{tool}: run it as {os.path.join(dest, tool)}")


def generate_stubs(dest):
    """daemon_pb2*.py from DEST's daemon.proto, by this Python's grpc_tools, moved into place
    whole. Returns the grpcio-tools version (the grpcio floor the stubs check)."""
    tmp = tempfile.mkdtemp(dir=dest, prefix=".vendor-")
    try:
        shutil.copy(os.path.join(dest, "daemon.proto"), tmp)
        r = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                            "--grpc_python_out=.", "daemon.proto"], cwd=tmp, capture_output=True,
                           stdin=subprocess.DEVNULL, text=True)
        if r.returncode != 0:
            said = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            raise Fail(f"grpc_tools.protoc failed on {dest}/daemon.proto: {said}")
        for name in STUBS:
            os.replace(os.path.join(tmp, name), os.path.join(dest, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return literal(os.path.join(dest, "daemon_pb2_grpc.py"), "GRPC_GENERATED_VERSION") or "?"


def main(argv):
    try:
        vendor(*parse(argv))
        return 0
    except Fail as e:
        message, code = str(e), e.code
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        message, code = f"{where}{e.strerror or e}", 1
    except (SyntaxError, UnicodeError) as e:        # a file vendor.py reads but does not run
        message, code = f"{getattr(e, 'filename', None) or 'a file'}: not Python it can read ({e})", 1
    except KeyboardInterrupt:
        return 130
    tail = f" (usage: {USAGE})" if code == 2 else ""
    print(f"vendor.py: {message}{tail}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
