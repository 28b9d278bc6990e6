#!/usr/bin/env python3
"""bench_buckd: the client's overhead and buckd's start, restart and hashing, as ratios.

Method. Every row compares a command A with a baseline B measured in the same run, on the
same machine, with the same interpreter (sys.executable): the floor Python imposes (`python
-c pass`, the grpc imports), a real peer (mypy's dmypy), or sha256sum. A and B alternate
(A B A B ...) so that the machine's drift hits both alike; after warm-up runs we take the
median of each and print the ratio A/B beside its target. Times are never compared with
fixed numbers, only with their baselines: these machines are noisy.

Everything runs in a temp HOME with a temp repository (a .buckconfig), so the daemon dir is
fresh; "cold" means `buck kill` (untimed) first, "warm" a buckd already running. mypy is
installed in a temp venv (the row is skipped if that fails). On exit, even on Ctrl-C, every
daemon is killed, then any process still carrying the temp HOME, and the temp dirs removed.
Run counts: RUNS measured runs after WARMUP for most rows; fewer, said in the row name, for
the 12-client race and for hashing, which take seconds per run.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY, BUCK = sys.executable, os.path.join(HERE, "buck.py")
RUNS, WARMUP, RACE_RUNS, HASH_RUNS, CLIENTS, RPCS = 15, 1, 4, 3, 12, 2000
SCRIPTS = ("buck.py", "buckd.py", "daemon.proto", "daemon_pb2.py", "daemon_pb2_grpc.py")
STDLIB = sysconfig.get_paths()["stdlib"]


class Bench:
    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="bench_buckd.")
        self.home, self.repo = self.mkdir("home"), self.mkdir("repo")
        open(os.path.join(self.repo, ".buckconfig"), "w").close()
        self.env = dict(os.environ, HOME=self.home)
        self.rows, self.dmypy = [], None

    def mkdir(self, name):
        path = os.path.realpath(os.path.join(self.tmp, name))
        os.makedirs(path)
        return path

    def run(self, argv, cwd=None, stdout=subprocess.DEVNULL, expect=None):
        """Run argv in the temp repo and HOME; its wall time in seconds. Fails loudly."""
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd or self.repo, env=self.env, stdout=stdout,
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
        return None if out.startswith(b"no buckd") else json.loads(out)

    def fresh_daemon(self):
        self.buck("kill")
        self.buck("server")
        return self.status()

    def row(self, name, a, b, target, ok):
        ratio = f"{a / b:.2f}x" if b else ""
        fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        self.rows.append((name, fmt(a), fmt(b), ratio, target, verdict))
        print(f"  {name}: {fmt(a)} vs {fmt(b)} {ratio} {verdict}", file=sys.stderr, flush=True)


def alternate(*measures, runs=RUNS, warmup=WARMUP):
    """Run the measures in turn (A B A B ...); the median of each, in ms, after warm-up."""
    times = [[] for _ in measures]
    for i in range(warmup + runs):
        for samples, measure in zip(times, measures):
            elapsed = measure()
            if i >= warmup:
                samples.append(elapsed)
    return [statistics.median(samples) * 1000 for samples in times]


def measure_client_floor(b):
    """Row 1: commands answered without grpc vs starting Python at all."""
    version, help_, floor = alternate(lambda: b.buck("version"), lambda: b.buck("help"),
                                      lambda: b.run([PY, "-c", "pass"]))
    b.row("buck version vs python -c pass", version, floor, "<= 1.5x", version <= 1.5 * floor)
    b.row("buck help vs python -c pass", help_, floor, "<= 1.5x", help_ <= 1.5 * floor)


def measure_warm_status(b):
    """Row 2: a warm `buck status` vs only the imports every grpc client pays."""
    b.buck("server")
    imports = f"import sys; sys.path.insert(0, {HERE!r}); import grpc, daemon_pb2, daemon_pb2_grpc"
    status, floor = alternate(lambda: b.buck("status"), lambda: b.run([PY, "-c", imports]))
    b.row("warm buck status vs grpc+stub imports", status, floor, "<= 1.0x", status <= floor)
    return status


def start_dmypy(b):
    """A temp venv with mypy, and dmypy serving a one-file project. Why not, or None."""
    venv, project = os.path.join(b.tmp, "venv"), b.mkdir("mypy-project")
    subprocess.run([PY, "-m", "venv", "--without-pip", venv], check=True)
    pip = subprocess.run([PY, "-m", "pip", "--python", os.path.join(venv, "bin", "python"),
                          "install", "--quiet", "--disable-pip-version-check", "mypy"],
                         capture_output=True, text=True)     # the user's pip config: real HOME
    if pip.returncode != 0:
        return "pip install mypy failed: " + (pip.stderr.strip().splitlines() or ["?"])[-1]
    with open(os.path.join(project, "a.py"), "w") as f:
        f.write("x: int = 1\n")
    b.dmypy = ([os.path.join(venv, "bin", "dmypy")], project)
    b.run(b.dmypy[0] + ["start", "--", "a.py"], cwd=project)
    return None


def measure_vs_dmypy(b):
    """Row 3: warm `buck status` vs warm `dmypy status`, a real Python daemon's client."""
    why_not = start_dmypy(b)
    if why_not:
        b.rows.append(("warm buck status vs dmypy status", "", "", "", "faster", f"skipped: {why_not}"))
        return
    b.buck("server")
    status, dmypy = alternate(lambda: b.buck("status"),
                              lambda: b.run(b.dmypy[0] + ["status"], cwd=b.dmypy[1]))
    b.row("warm buck status vs dmypy status", status, dmypy, "< 1.0x (faster)", status < dmypy)


def measure_cold_start(b):
    """Row 4: `buck server` with no daemon (killed untimed) vs a warm `buck status`."""
    def cold_server():
        b.buck("kill")
        return b.buck("server", expect="starting buckd")
    cold, warm = alternate(cold_server, lambda: b.buck("status"))
    b.row("cold buck server vs warm buck status", cold, warm, "<= 1.5x", cold <= 1.5 * warm)


def other_version(b):
    """A copy of the scripts with one more line in buckd.py: a different buck version."""
    other = b.mkdir("other-version")
    for name in SCRIPTS:
        shutil.copy(os.path.join(HERE, name), other)
    with open(os.path.join(other, "buckd.py"), "a") as f:
        f.write("# other version\n")
    return os.path.join(other, "buck.py")


def measure_version_restart(b):
    """Row 5: `buck server` of the other version than the running buckd's, alternately."""
    scripts = [BUCK, other_version(b)]
    b.buck("server")
    def restart():
        scripts.reverse()
        return b.buck("server", script=scripts[0], expect="version mismatch")
    restart_ms, warm = alternate(restart, lambda: b.buck("status"))
    b.row("version-mismatch restart vs warm status", restart_ms, warm, "<= 2.5x",
          restart_ms <= 2.5 * warm)


def buckd_pids(b):
    """The pids of the buckd processes (`buck daemon`) carrying our temp HOME."""
    return [pid for pid, cmdline in processes_with_home(b.home)
            if b"daemon" in cmdline.split(b"\0") and b"buck.py" in cmdline]


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
        pids, status = buckd_pids(b), b.status()
        if not status or pids != [status["pid"]]:
            print(f"bench: WARNING: after the race: buckd pids {pids}, status {status}", file=sys.stderr)
        return elapsed
    cold, warm = alternate(lambda: clients("server", True), lambda: clients("status", False),
                           runs=RACE_RUNS, warmup=1)
    b.row(f"{CLIENTS} clients racing cold vs warm ({RACE_RUNS} runs)", cold, warm, "<= 1.5x",
          cold <= 1.5 * warm)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure_daemon_side(b):
    """Row 7: Status RPCs/s in-process over one channel; buckd's RSS idle and after hashing."""
    status = b.fresh_daemon()
    idle = rss_mb(status["pid"])
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    sys.path.insert(0, HERE)
    import grpc, daemon_pb2, daemon_pb2_grpc
    with open(os.path.join(status["daemon_dir"], "buckd.info")) as f:
        info = json.load(f)
    metadata = (("buckd-token", info["auth_token"]),)
    with grpc.insecure_channel(f"127.0.0.1:{info['port']}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = daemon_pb2_grpc.DaemonApiStub(ch)
        for i in range(RPCS // 10 + RPCS):
            if i == RPCS // 10:         # the first tenth warms up
                start = time.perf_counter()
            stub.Status(daemon_pb2.StatusRequest(), metadata=metadata, timeout=5)
        rate = RPCS / (time.perf_counter() - start)
    b.row("in-process Status RPCs/s, one channel", f"{rate:.0f}/s", "", ">= 1000/s", rate >= 1000)
    b.row("buckd RSS after start (MB)", idle, "", "<= 40 MB", idle <= 40)
    with open(os.path.join(b.tmp, "buck.out"), "wb") as out:    # checked by measure_hash
        b.buck("hash", STDLIB, stdout=out)
    b.row("buckd RSS after hashing stdlib (MB)", rss_mb(status["pid"]), "", "(info)", None)


def regular_files(top):
    """All regular files below top, not following symlinks (as `find top -type f`)."""
    found = []
    for entry in os.scandir(top):
        if entry.is_dir(follow_symlinks=False):
            found += regular_files(entry.path)
        elif entry.is_file(follow_symlinks=False):
            found.append(entry.path)
    return found


def measure_hash(b):
    """Row 8: `buck hash STDLIB` cold (fresh daemon) and warm vs sha256sum of the same files;
    then one 256 MB file, cold vs sha256sum."""
    files = sorted(regular_files(STDLIB))
    listing = os.path.join(b.tmp, "files0")
    with open(listing, "wb") as f:
        f.write(b"".join(os.fsencode(p) + b"\0" for p in files))
    def sha256sum(out=subprocess.DEVNULL):
        with open(listing, "rb") as names:
            start = time.perf_counter()
            subprocess.run(["xargs", "-0", "sha256sum"], stdin=names, stdout=out, check=True)
            return time.perf_counter() - start
    outputs = [os.path.join(b.tmp, name) for name in ("buck.out", "sha256sum.out")]
    with open(outputs[1], "wb") as out:
        sha256sum(out)                  # warms up; buck's run was measure_daemon_side's
    lines = [sorted(open(path, "rb").read().splitlines()) for path in outputs]
    if len(lines[0]) != len(lines[1]) or len(lines[0]) != len(files) or lines[0] != lines[1]:
        print(f"bench: WARNING: buck hash printed {len(lines[0])} lines, sha256sum {len(lines[1])}, "
              f"for {len(files)} files; {sum(x != y for x, y in zip(*lines))} differ", file=sys.stderr)
    def cold_hash(path):
        b.fresh_daemon()
        return b.buck("hash", path)
    cold, base = alternate(lambda: cold_hash(STDLIB), sha256sum, runs=HASH_RUNS, warmup=0)
    name = f"buck hash stdlib ({len(files)} files), {HASH_RUNS} runs"
    b.row(f"{name}: cold vs sha256sum", cold, base, "<= 0.5x", cold <= 0.5 * base)
    warm, = alternate(lambda: b.buck("hash", STDLIB), runs=HASH_RUNS, warmup=0)   # cached by now
    b.row(f"{name}: warm vs cold", warm, cold, "<= 0.1x", warm <= 0.1 * cold)
    big = os.path.join(b.tmp, "big")
    block = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(256):
            f.write(block)
    cold, base = alternate(lambda: cold_hash(big), lambda: b.run(["sha256sum", big]), runs=HASH_RUNS, warmup=0)
    b.row(f"buck hash 256 MB file, {HASH_RUNS} runs: cold vs sha256sum", cold, base,
          f"(info: {256e3 / cold:.0f} vs {256e3 / base:.0f} MB/s)", None)


def processes_with_home(home):
    """(pid, cmdline) of every process but ours whose environment has HOME=home."""
    found, needle = [], b"HOME=" + os.fsencode(home)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and int(pid) != os.getpid():
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        found.append((int(pid), c.read()))
        except OSError:
            pass                        # gone, or not ours to read
    return found


def clean_up(b):
    """Kill buckd and dmypy politely, then by pid whatever still carries our HOME."""
    for argv, cwd in [([PY, BUCK, "kill"], b.repo)] + ([(b.dmypy[0] + ["stop"], b.dmypy[1])] if b.dmypy else []):
        subprocess.run(argv, cwd=cwd, env=b.env, capture_output=True, timeout=30)
    for pid, cmdline in processes_with_home(b.home):
        print(f"bench: killing leftover pid {pid}:", *cmdline.decode().split("\0"), file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(b.tmp, ignore_errors=True)


def machine():
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return f"{len(os.sched_getaffinity(0))} cpus ({cpu}), Python {platform.python_version()} ({PY})"


def main():
    started, b = time.monotonic(), Bench()
    print(f"bench_buckd on {machine()}", flush=True)
    try:
        for measure in (measure_client_floor, measure_warm_status, measure_vs_dmypy, measure_cold_start,
                        measure_version_restart, measure_race, measure_daemon_side, measure_hash):
            print(f"[{time.monotonic() - started:3.0f} s] {measure.__doc__.splitlines()[0]}",
                  file=sys.stderr, flush=True)
            measure(b)
    finally:
        clean_up(b)
    widths = [max(len(row[i]) for row in b.rows + [HEADER]) for i in range(6)]
    for row in [HEADER] + b.rows:
        print("  ".join(cell.ljust(w) if i in (0, 4, 5) else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"total {time.monotonic() - started:.0f} s")


HEADER = ("row", "A ms", "B ms", "A/B", "target", "result")

if __name__ == "__main__":
    main()
