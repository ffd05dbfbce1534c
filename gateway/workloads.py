"""Is a workload still there? Named network namespaces are files under /run/netns;
processes are /proc/<pid>, recognised by their start time so that a PID the kernel
reused for another process does not keep a dead endpoint alive."""

from __future__ import annotations

from pathlib import Path

from fedgw.models import Workload
from gateway.errors import WorkloadNotFound


class WorkloadProbe:
    def __init__(
        self, netns_dir: Path = Path("/run/netns"), proc_dir: Path = Path("/proc")
    ) -> None:
        self.netns_dir = netns_dir
        self.proc_dir = proc_dir

    def _start_ticks(self, pid: int) -> int | None:
        try:
            stat = (self.proc_dir / str(pid) / "stat").read_text()
        except OSError:
            return None
        # "pid (comm) state ppid ..."; comm may hold spaces and ')', so split after the
        # last ')'. starttime is field 22 of the line, the 20th after the comm.
        fields = stat.rpartition(")")[2].split()
        try:
            return int(fields[19])
        except (IndexError, ValueError):
            return None

    def identify(self, workload: Workload) -> Workload:
        """The workload as it should be recorded; raises if it does not exist."""
        if workload.netns is not None:
            if not (self.netns_dir / workload.netns).exists():
                raise WorkloadNotFound(
                    f"network namespace {workload.netns!r} does not exist "
                    f"(no {self.netns_dir / workload.netns})"
                )
            return workload
        assert workload.pid is not None
        ticks = self._start_ticks(workload.pid)
        if ticks is None:
            raise WorkloadNotFound(f"no process with pid {workload.pid}")
        return workload.model_copy(update={"pid_start_ticks": ticks})

    def alive(self, workload: Workload) -> bool:
        if workload.netns is not None:
            return (self.netns_dir / workload.netns).exists()
        assert workload.pid is not None
        ticks = self._start_ticks(workload.pid)
        return ticks is not None and (
            workload.pid_start_ticks is None or ticks == workload.pid_start_ticks
        )
