"""Worker commands under the driver's control: start, measure, watch, stop; and the counter poll."""
import contextlib
import os
import signal
import subprocess
import time

import common
from systems import HERE, SYSTEMS, worker_env

MIB = 1024.0 * 1024.0


class Worker:
    """One unit's worker command(s), each in its own session, output appended to logs/<tag>.log."""

    def __init__(self, name, variant, broker, tag):
        os.makedirs(os.path.join(HERE, "logs"), exist_ok=True)
        self.log_path = os.path.join(HERE, "logs", f"{tag}.log")
        cmds = SYSTEMS[name].variants[variant].cmds
        env = worker_env(name, variant, broker)
        with open(self.log_path, "ab") as log:
            times = f" (x{len(cmds)})" if len(cmds) > 1 else ""
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmds[0])}{times}\n".encode())
            self.log_offset = log.tell()
            self.procs = [subprocess.Popen(cmd, cwd=HERE, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
                          for cmd in cmds]

    def tree(self):
        import psutil

        members = []
        for proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(proc.pid)
                members += [root, *root.children(recursive=True)]
        return members

    def memory(self):
        """Summed RSS, PSS and USS of every process of the worker tree(s), MiB."""
        import psutil

        rss = pss = uss = n = 0
        for p in self.tree():
            try:
                mi = p.memory_full_info()
            except psutil.Error:
                continue
            rss, pss, uss, n = rss + mi.rss, pss + getattr(mi, "pss", 0), uss + mi.uss, n + 1
        return {"procs": n, "rss_mib": round(rss / MIB, 1), "pss_mib": round(pss / MIB, 1),
                "uss_mib": round(uss / MIB, 1)}

    def exit_code(self):
        """The return code of the first command that exited, None while all run."""
        return next((p.returncode for p in self.procs if p.poll() is not None), None)

    def alive(self):
        return any(p.poll() is None for p in self.procs)

    def log_since_start(self):
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace").splitlines()

    def problems(self, tail=25):
        """Error lines this run wrote, and the log's tail when there were any."""
        lines = self.log_since_start()
        bad = [ln for ln in lines if any(w in ln for w in ("ERROR", "CRITICAL", "Traceback"))]
        return {"log_errors": len(bad), "log_tail": lines[-tail:]} if bad else {}

    def stop(self, grace=20.0):
        """SIGTERM to each root (warm shutdown), then SIGKILL to their own process groups."""
        import psutil

        members = self.tree()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        while self.alive() and time.time() < deadline:
            time.sleep(0.1)
        stopped_in_time = not self.alive()
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # each group is a pid we started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for m in members:  # children that left the group
            try:
                if m.is_running() and m.status() != psutil.STATUS_ZOMBIE:
                    m.kill()
            except psutil.Error:
                pass
        return stopped_in_time


def count():
    return int(common.counter().get(common.COUNT_KEY) or 0)


def wait_count(target, timeout, worker=None, stall=60.0, poll=0.01):
    """Poll the counter until it reaches ``target``; (t_done, t_first, count, error)."""
    t_first = None
    start = t_change = time.perf_counter()
    last = 0
    while True:
        c = count()
        now = time.perf_counter()
        if c and t_first is None:
            t_first = now
        if c >= target:
            return now, t_first, c, None
        if c != last:
            last, t_change = c, now
        error = None
        if worker is not None and worker.exit_code() is not None:
            error = f"worker exited with code {worker.exit_code()}"
        elif now - t_change > stall:
            error = f"no progress for {stall:.0f}s"
        elif now - start > timeout:
            error = f"timeout after {timeout:.0f}s"
        if error:
            return None, t_first, c, f"{error}, counter={c}/{target}"
        time.sleep(poll)
