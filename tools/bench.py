#!/usr/bin/env python3
"""bench: the client's overhead and buckd's start, restart and hashing, as ratios. A
development tool, not part of buck.

    .venv/bin/python tools/bench.py          (make bench)

Method. Each row compares a command A with a baseline B measured in the same run, on the
same machine, with the same interpreter (sys.executable): the floor Python imposes (`python
-c pass`, the grpc imports), a real peer (mypy's dmypy) or sha256sum. A and B alternate
(A B A B ...) so that the machine's drift hits both alike; after warm-up we take the median
of each and print the ratio A/B beside its target. Times are only ever compared with their
baselines, never with fixed numbers: these machines are noisy. Row 1 also times, in the same
alternation, a vendored launcher's `version` (tools/vendor.py's `acme`) and the release
before issue 14 (git archive OLD_RELEASE of this checkout, its stubs generated here; the
rows are skipped, said so, where the checkout has no such history).

All runs use a temp HOME and a temp repository (a .buckconfig), the buck.py of the parent
dir of tools/, none of buck's environment variables inherited. "Cold" means after an
untimed `buck kill`, "warm" with a buckd running. mypy goes into a temp venv (the row is
skipped if that fails). On exit, even on Ctrl-C, every daemon is stopped, then any process
still carrying the temp HOME is killed, and the temp dirs are removed. Rows take RUNS
measured runs after WARMUP; the 12-client race and the hashing rows, which take seconds
per run, take fewer (said in the row) to keep the whole bench under 4 minutes.
"""
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import lifecycle                    # beside us in tools/: load_buck(), other_version()

ROOT, BUCK, PY = lifecycle.ROOT, lifecycle.BUCK, sys.executable
buck = lifecycle.load_buck()        # `import buck` from ROOT: its names (MARKER, LOG_ENV...)
RUNS, WARMUP, RACE_RUNS, HASH_RUNS, CLIENTS, RPCS, BUSY = 15, 1, 4, 3, 12, 2000, 100
OLD_RELEASE = "23371b3"             # the release before issue 14: issue 21's "old release"
STDLIB = sysconfig.get_paths()["stdlib"]
HEADER = ("row", "A ms", "B ms", "A/B", "target", "result")


class Bench:
    """The temp HOME and repo, running commands in them, and the table's rows."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="bench.")
        self.home, self.repo = self.mkdir("home"), self.mkdir("repo")
        open(os.path.join(self.repo, buck.MARKER), "w").close()
        self.env = lifecycle.clean_env(buck, HOME=self.home)
        self.rows, self.dmypy, self.channels = [], None, []

    def mkdir(self, name):
        path = os.path.realpath(os.path.join(self.tmp, name))
        os.makedirs(path)
        return path

    def run(self, argv, cwd=None, stdout=subprocess.DEVNULL, expect=None, env=None):
        """Run argv in the temp repo and HOME; its wall time in seconds. Fails loudly."""
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd or self.repo, env=env or self.env, stdout=stdout,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        err = proc.stderr.decode(errors="replace")
        if proc.returncode != 0 or (expect and expect not in err):
            raise SystemExit(f"bench: {' '.join(argv)} failed ({proc.returncode}): {err.strip()}")
        return elapsed

    def buck(self, *args, script=BUCK, **kw):
        return self.run([PY, script, *args], **kw)

    def status(self):
        out = subprocess.run([PY, BUCK, "status", "--json"], cwd=self.repo, env=self.env,
                             capture_output=True, check=True).stdout
        return None if out.startswith(f"no {buck.DAEMON}".encode()) else json.loads(out)

    def other_version(self):
        """A copy of buck.SOURCES with one more line: another buck version. Its buck.py."""
        other = os.path.join(self.tmp, "other-version")
        if not os.path.isdir(other):
            lifecycle.other_version(BUCK, other)
        return os.path.join(other, "buck.py")

    def fresh_daemon(self):
        self.buck("kill")
        self.buck("server")
        return self.status()

    def row(self, name, a, b, target, ok):
        cells = [f"{v:.1f}" if isinstance(v, float) else v for v in (a, b)]
        verdict = "" if ok is None else ok if isinstance(ok, str) else "PASS" if ok else "MISS"
        self.rows.append((name, *cells, f"{a / b:.2f}x" if b else "", target, verdict))
        print("   ", *self.rows[-1], file=sys.stderr, flush=True)


def alternate(*measures, runs=RUNS, warmup=WARMUP):
    """Run the measures in turn (A B A B ...); the median of each, in ms, after warm-up."""
    times = [[] for _ in measures]
    for i in range(warmup + runs):
        for samples, measure in zip(times, measures):
            elapsed = measure()
            if i >= warmup:
                samples.append(elapsed)
    return [statistics.median(samples) * 1000 for samples in times]


def old_release(b):
    """OLD_RELEASE's buck.py, in a temp dir with its stubs and bytecode; or why not."""
    old = b.mkdir("old")
    archive = subprocess.run(["git", "-C", ROOT, "archive", OLD_RELEASE], capture_output=True)
    if archive.returncode != 0:
        return None, f"no {OLD_RELEASE} in this checkout's history (a shallow clone?)"
    subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
    subprocess.run([PY, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "daemon.proto"], cwd=old, check=True)
    subprocess.run([PY, "-m", "compileall", "-q", old], check=True)
    return os.path.join(old, "buck.py"), None


def vendored_launcher(b):
    """tools/vendor.py's launcher of a copy named acme, daemon acmed: its path."""
    dest = os.path.join(b.tmp, "acme")
    subprocess.run([PY, os.path.join(ROOT, "tools", "vendor.py"), dest, "--tool", "acme",
                    "--daemon", "acmed"], check=True, stdout=subprocess.DEVNULL)
    return os.path.join(dest, "acme")


def measure_client_floor(b):
    """Row 1: commands answered without grpc vs starting Python at all: this buck.py, a
    vendored launcher (`#!/usr/bin/env python3`, this Python first on PATH) and the old
    release, all alternating with the floor."""
    old, why_not = old_release(b)
    acme = vendored_launcher(b)
    env = dict(b.env, PATH=os.path.dirname(PY) + os.pathsep + b.env.get("PATH", ""))
    measures = {"version": lambda: b.buck("version"), "help": lambda: b.buck("help"),
                "acme": lambda: b.run([acme, "version"], env=env),
                "floor": lambda: b.run([PY, "-c", "pass"])}
    if old:
        measures.update({"old version": lambda: b.buck("version", script=old),
                         "old help": lambda: b.buck("help", script=old)})
    ms = dict(zip(measures, alternate(*measures.values())))
    floor = ms["floor"]
    for name in ("version", "help"):
        b.row(f"1 buck {name} vs python -c pass", ms[name], floor, "<= 1.45x",
              ms[name] <= 1.45 * floor)
        if old:
            b.row(f"1   old release ({OLD_RELEASE}) {name}", ms[f"old {name}"], floor,
                  "(info)", None)
        else:
            b.row(f"1   old release ({OLD_RELEASE}) {name}", "", "", "", f"skipped: {why_not}")
    b.row("1 vendored launcher: acme version vs python -c pass", ms["acme"], floor, "<= 1.3x",
          ms["acme"] <= 1.3 * floor)


def measure_warm_status(b):
    """Row 2: a warm `buck status` vs the fair floor: the imports every grpc client of this
    API pays, and os._exit as buck.py exits (no interpreter teardown)."""
    b.buck("server")
    floor = (f"import sys; sys.path.insert(0, {ROOT!r}); "
             "import grpc, daemon_pb2, daemon_pb2_grpc, os; os._exit(0)")
    status, imports = alternate(lambda: b.buck("status"), lambda: b.run([PY, "-c", floor]))
    b.row("2 warm buck status vs grpc+stub imports, os._exit", status, imports, "<= 1.0x",
          status <= imports)


def start_dmypy(b):
    """mypy in a temp venv, dmypy serving a one-file project; None, or why not."""
    venv, project = os.path.join(b.tmp, "venv"), b.mkdir("mypy-project")
    dmypy = os.path.join(venv, "bin", "dmypy")
    try:
        subprocess.run([PY, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
        pip = subprocess.run([PY, "-m", "pip", "--python", os.path.join(venv, "bin", "python"),
                              "install", "--quiet", "--disable-pip-version-check", "--retries", "1",
                              "--timeout", "15", "mypy"],   # the user's pip config: real HOME
                             capture_output=True, text=True, timeout=120)
        if pip.returncode != 0:
            return "pip install mypy failed: " + (pip.stderr.strip().splitlines() or ["?"])[-1]
        with open(os.path.join(project, "a.py"), "w") as f:
            f.write("x: int = 1\n")
        b.dmypy = ([dmypy], project)
        start = subprocess.run([dmypy, "start", "--", "a.py"], cwd=project, env=b.env,
                               capture_output=True, text=True, timeout=60)
        return None if start.returncode == 0 else f"dmypy start failed: {start.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"


def measure_vs_dmypy(b):
    """Row 3: warm `buck status` vs warm `dmypy status`, a real Python daemon's client."""
    why_not = start_dmypy(b)
    if why_not:
        return b.row("3 warm buck status vs dmypy status", "", "", "<= 1.1x", f"skipped: {why_not}")
    b.buck("server")
    status, dmypy = alternate(lambda: b.buck("status"),
                              lambda: b.run(b.dmypy[0] + ["status"], cwd=b.dmypy[1]))
    b.row("3 warm buck status vs dmypy status", status, dmypy, "<= 1.1x", status <= 1.1 * dmypy)


def measure_cold_start(b):
    """Row 4: `buck server` with no daemon (killed untimed) vs a warm `buck status`."""
    def cold_server():
        b.buck("kill")
        return b.buck("server", expect="starting buckd")
    cold, warm = alternate(cold_server, lambda: b.buck("status"))
    b.row("4 cold buck server vs warm buck status", cold, warm, "<= 1.4x", cold <= 1.4 * warm)


def measure_version_restart(b):
    """Row 5: `buck server` of the other version than the running buckd's, alternately."""
    scripts = [BUCK, b.other_version()]
    b.buck("server")
    def restart():
        scripts.reverse()
        return b.buck("server", script=scripts[0], expect="version mismatch")
    restart, warm = alternate(restart, lambda: b.buck("status"))
    b.row("5 version-mismatch restart vs warm status", restart, warm, "<= 2.5x", restart <= 2.5 * warm)


def measure_race(b):
    """Row 6: CLIENTS `buck server` at once from cold vs CLIENTS warm `buck status` at once."""
    def clients(command, cold):
        if cold:
            b.buck("kill")
        start = time.perf_counter()
        procs = [subprocess.Popen([PY, BUCK, command], cwd=b.repo, env=b.env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(CLIENTS)]
        errors = [p.communicate()[1] for p in procs]
        elapsed = time.perf_counter() - start
        for p, err in zip(procs, errors):
            if p.returncode:
                print(f"bench: WARNING: a racing client failed: {err.decode().strip()}", file=sys.stderr)
        daemons = [p.pid for p in lifecycle.processes(b.home)
                   if p.argv[-1:] == [b"daemon"] and any(a.endswith(b"buck.py") for a in p.argv)]
        status = b.status()
        if not status or daemons != [status["pid"]]:
            print(f"bench: WARNING: after the race: buckd pids {daemons}, status {status}", file=sys.stderr)
        return elapsed
    cold, warm = alternate(lambda: clients("server", True), lambda: clients("status", False),
                           runs=RACE_RUNS, warmup=0)     # rows 1-5 warmed up enough
    b.row(f"6 {CLIENTS} clients racing cold vs warm ({RACE_RUNS} runs)", cold, warm, "<= 1.5x",
          cold <= 1.5 * warm)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def grpc_client(b):
    """(grpc, daemon_pb2, a stub of the running buckd, its metadata), in this process."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    sys.path.insert(0, ROOT)
    import grpc, daemon_pb2, daemon_pb2_grpc
    with open(os.path.join(b.status()["daemon_dir"], buck.INFO_FILE)) as f:
        info = json.load(f)
    channel = grpc.insecure_channel(f"127.0.0.1:{info['port']}", options=[("grpc.enable_http_proxy", 0)])
    b.channels.append(channel)
    return grpc, daemon_pb2, daemon_pb2_grpc.DaemonApiStub(channel), ((buck.TOKEN_KEY, info["auth_token"]),)


def measure_busy_daemon(b):
    """Row 7: warm `buck status` with BUSY commands running in buckd vs the same buckd idle;
    and `buck server` still reuses that buckd."""
    status = b.fresh_daemon()
    idle, = alternate(lambda: b.buck("status"))
    grpc, pb, _, metadata = grpc_client(b)
    stubs = [grpc_client(b)[2] for _ in range(4)]   # a few connections, as clients would
    streams = []
    for i in range(BUSY):
        accepted = threading.Event()
        def messages(accepted=accepted):
            yield pb.CommandRequest(name="debug sleep", args=[b"600"], cwd=b"/")
            accepted.wait()
            yield pb.CommandRequest()
        streams.append((stubs[i % 4].Command(messages(), metadata=metadata, timeout=600), accepted))
    for stream, accepted in streams:
        next(stream)
        accepted.set()
    buck.poll(lambda: b.status()["active_commands"] >= BUSY, 60, 0.05)
    busy, = alternate(lambda: b.buck("status"))
    b.buck("server")
    same = b.status()["pid"] == status["pid"] and b.status()["active_commands"] == BUSY
    for stream, _ in streams:
        stream.cancel()
    b.row(f"7 warm status, {BUSY} commands running vs none", busy, idle, "<= 1.5x, same buckd",
          busy <= 1.5 * idle and same)


def measure_daemon_side(b):
    """Row 8: Status RPCs/s in-process over one channel; buckd's RSS idle."""
    status = b.fresh_daemon()
    idle = rss_mb(status["pid"])
    grpc, pb, stub, metadata = grpc_client(b)
    for i in range(RPCS // 10 + RPCS):
        if i == RPCS // 10:             # the first tenth warms up
            start = time.perf_counter()
        stub.Status(pb.StatusRequest(), metadata=metadata, timeout=5)
    rate = RPCS / (time.perf_counter() - start)
    b.row("8 in-process Status RPCs/s, one channel", f"{rate:.0f}/s", "", ">= 1000/s", rate >= 1000)
    b.row("8 buckd RSS after start (MB)", idle, "", "<= 40 MB", idle <= 40)


def measure_log(b):
    """Row 9: the lifecycle log: a step() call with the log off, and a line with it on
    (in-process); a warm `buck status` with the log on vs off."""
    def per_call(n=20000):
        start = time.perf_counter()
        for _ in range(n):
            buck.step("bench", b.tmp, daemon_pid=1)
        return (time.perf_counter() - start) / n * 1e6
    buck.LOG_PATH = None                # off, whatever our own environment says
    off = per_call()
    buck.LOG_PATH = os.path.join(b.tmp, "bench.log")
    on = per_call()
    buck.LOG_PATH = None
    b.row("9 lifecycle log: step() off, on (us per call)", off, on, "off < 0.5 us", off < 0.5)
    env = dict(b.env, **{buck.LOG_ENV: os.path.join(b.tmp, "status.log")})
    b.buck("server")
    logged, plain = alternate(lambda: b.run([PY, BUCK, "status"], env=env), lambda: b.buck("status"))
    b.row("9 warm status, log on vs off", logged, plain, "<= 1.05x", logged <= 1.05 * plain)


def regular_files(top):
    """All regular files below top, not following symlinks (as `find top -type f`)."""
    found = []
    for entry in os.scandir(top):
        if entry.is_dir(follow_symlinks=False):
            found += regular_files(entry.path)
        elif entry.is_file(follow_symlinks=False):
            found.append(entry.path)
    return found


WALK = """if True:
    import os, sys
    def walk(top, found):
        for entry in os.scandir(top):
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path, found)
            elif entry.is_file(follow_symlinks=False):
                found.append((entry.path, entry.stat(follow_symlinks=False)))
        return found
    sorted(walk(sys.argv[1], []))
    os._exit(0)"""


def measure_hash(b):
    """Row 10: `buck hash` of the stdlib tree cold vs sha256sum, warm vs a bare walk (scandir,
    lstat, sort) of it; buckd's RSS after; a just-written tree hashed twice; a 256 MB file."""
    files = sorted(regular_files(STDLIB))
    listing, outputs = os.path.join(b.tmp, "files0"), [os.path.join(b.tmp, "buck.out"),
                                                        os.path.join(b.tmp, "sha256sum.out")]
    with open(listing, "wb") as f:
        f.write(b"".join(os.fsencode(p) + b"\0" for p in files))
    def sha256sum():
        with open(listing, "rb") as names, open(outputs[1], "wb") as out:
            start = time.perf_counter()
            subprocess.run(["xargs", "-0", "sha256sum"], stdin=names, stdout=out, check=True)
            return time.perf_counter() - start
    def cold_hash(path, out=os.devnull):
        b.fresh_daemon()
        with open(out, "wb") as f:
            return b.buck("hash", path, stdout=f)
    b.buck("hash", STDLIB)              # untimed: the files into the page cache
    cold, base = alternate(lambda: cold_hash(STDLIB, outputs[0]), sha256sum, runs=HASH_RUNS, warmup=0)
    lines = [sorted(open(path, "rb").read().splitlines()) for path in outputs]
    if not len(lines[0]) == len(lines[1]) == len(files) or lines[0] != lines[1]:
        print(f"bench: WARNING: buck hash printed {len(lines[0])} lines, sha256sum {len(lines[1])}, "
              f"for {len(files)} files; {sum(x != y for x, y in zip(*lines))} differ", file=sys.stderr)
    name = f"10 buck hash stdlib ({len(files)} files)"
    b.row(f"{name}: cold vs sha256sum", cold, base, "<= 0.5x", cold <= 0.5 * base)
    warm, walk = alternate(lambda: b.buck("hash", STDLIB), lambda: b.run([PY, "-c", WALK, STDLIB]),
                           runs=HASH_RUNS, warmup=1)
    b.row(f"{name}: warm vs a walk", warm, walk, "<= 1.3x", warm <= 1.3 * walk)
    rss = rss_mb(b.status()["pid"])
    b.row("10 buckd RSS after hashing the stdlib (MB)", rss, "", "<= 75 MB", rss <= 75)
    fresh = os.path.join(b.tmp, "fresh")
    shutil.copytree(os.path.join(STDLIB, "email"), fresh)    # a tree written just now
    before = b.status()["files_read"]
    b.buck("hash", fresh)
    between = b.status()["files_read"]
    b.buck("hash", fresh)
    reread = b.status()["files_read"] - between
    b.row(f"10 a just-written tree ({between - before} files) hashed twice: files re-read",
          f"{reread}", "", "0", reread == 0)
    big, block = os.path.join(b.tmp, "big"), os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(256):
            f.write(block)
    cold, base = alternate(lambda: cold_hash(big), lambda: b.run(["sha256sum", big]),
                           runs=HASH_RUNS, warmup=0)
    b.row("10 buck hash 256 MB file: cold vs sha256sum", cold, base,
          f"(info: {256e3 / cold:.0f} vs {256e3 / base:.0f} MB/s)", None)


def clean_up(b):
    """Stop buckd and dmypy politely, then kill by pid whatever still carries our HOME."""
    for channel in b.channels:
        channel.close()
    stops = [([PY, BUCK, "kill"], b.repo)] + ([(b.dmypy[0] + ["stop"], b.dmypy[1])] if b.dmypy else [])
    for argv, cwd in stops:
        try:
            subprocess.run(argv, cwd=cwd, env=b.env, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"bench: {' '.join(argv)}: {e}", file=sys.stderr)
    for p in lifecycle.processes(b.home):
        print(f"bench: killing leftover pid {p.pid}: {b' '.join(p.argv).decode()}", file=sys.stderr)
        os.kill(p.pid, signal.SIGKILL)
    shutil.rmtree(b.tmp, ignore_errors=True)


def machine():
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return f"{len(os.sched_getaffinity(0))} cpus ({cpu}), Python {platform.python_version()} ({PY})"


def main():
    started, b = time.monotonic(), Bench()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # clean up as on Ctrl-C
    print(f"bench on {machine()}", flush=True)
    try:
        for measure in (measure_client_floor, measure_warm_status, measure_vs_dmypy, measure_cold_start,
                        measure_version_restart, measure_race, measure_busy_daemon, measure_daemon_side,
                        measure_log, measure_hash):
            print(f"[{time.monotonic() - started:3.0f} s] {measure.__doc__.splitlines()[0]}",
                  file=sys.stderr, flush=True)
            measure(b)
    finally:
        clean_up(b)
    widths = [max(len(row[i]) for row in [HEADER] + b.rows) for i in range(len(HEADER))]
    for row in [HEADER] + b.rows:
        print("  ".join(cell.rjust(w) if i in (1, 2, 3) else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
