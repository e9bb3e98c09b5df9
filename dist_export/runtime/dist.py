"""The control plane shared by all stages: process group, device binding, and one helper for every
cross-rank step.

Ranks exchange only small metadata (plans' digests, amax scalars, per-rank results), so the process group is
always gloo, also on GPU nodes (tensor data never crosses ranks). Every cross-rank step goes through
`DistContext.step`: it runs the local part, catches the local error, gathers every rank's status and raises
the same one-line error on all ranks, naming the failed ranks. A background monitor (see `monitor.py`) turns a
killed or hung peer into an error within a bounded time, so no rank waits forever.
"""
from __future__ import annotations

import datetime
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .faults import fire_point_fault
from .launch import srun_task

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """A failure reported identically on every rank (one line, naming the failed ranks)."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 0  # ranks per node (0: all ranks on one node)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_process_group: bool = False
    monitor: object = None  # set by monitor.start_monitor
    stage_seconds: dict = field(default_factory=dict)  # step name -> seconds on this rank (waiting included)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def nnodes(self) -> int:
        """Nodes of the launch (torchrun numbers ranks node by node: node = rank // ranks per node)."""
        per_node = self.local_world_size or self.world_size
        if per_node < 1 or self.world_size % per_node:
            raise ValueError(f"{self.world_size} ranks do not split into nodes of {per_node} ranks; launch the same "
                             f"number of ranks on every node")
        return self.world_size // per_node

    def all_gather_object(self, obj) -> list:
        if not self.is_distributed:
            return [obj]
        out = [None] * self.world_size
        with self._waiting():
            try:
                dist.all_gather_object(out, obj)
            except Exception as e:  # noqa: BLE001 - a peer vanished mid-collective: say which one
                dead = self._dead_peers_after_break()
                cause = "; ".join(dead) if dead else f"a peer left the job ({str(e).splitlines()[0][:160]})"
                job, left = (self.monitor.job, self.monitor.left) if self.monitor is not None else \
                    ("export", "no index was written, rerun with --resume")
                raise ExportError(f"{job} aborted: {cause}; {left}") from e
        return out

    def _dead_peers_after_break(self, within: float = 3.0) -> list[str]:
        """The peers whose death broke a collective. The broken socket can reach us while the killed process is
        still being torn down (it closes its files before it becomes a zombie), so look again for a moment."""
        if self.monitor is None:
            return []
        deadline = time.monotonic() + within
        while True:
            dead = self.monitor.dead_peers()
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _waiting(self):
        """Tell the monitor this rank is blocked on peers (so a slow peer is not mistaken for us hanging)."""
        from contextlib import nullcontext

        return self.monitor.waiting() if self.monitor is not None else nullcontext()

    def long_call(self):
        """Around one long library call that reports no progress (a model load): peers do not count this rank as
        hung meanwhile (they still see it die)."""
        return self._waiting()

    def step(self, name: str, fn, *args, **kwargs) -> list:
        """Run `fn` on every rank; return every rank's result, or raise the same error on all ranks.

        With one rank the original exception propagates unchanged (so a user's ValueError stays one).
        """
        start = time.monotonic()
        try:
            return self._step(name, fn, *args, **kwargs)
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.monotonic() - start

    def agree(self, name: str, fn, digest_of):
        """Run `fn` on every rank, check that every rank's `digest_of(result)` is the same and return this rank's
        result (for a plan: every rank must have computed the same one)."""
        local = []
        digests = self.step(name, lambda: _keep(local, fn(), digest_of))
        if len(set(digests)) != 1:
            raise ExportError(f"{name}: ranks computed different results (digests {sorted(set(digests))}); check "
                              f"that every rank sees the same source, recipe and dist_export version")
        return local[0]

    def local_step(self, name: str, fn, *args, **kwargs):
        """Run `fn` on every rank and return this rank's result; a failure on any rank fails all of them."""
        local = []
        self.step(name, lambda: local.append(fn(*args, **kwargs)))
        return local[0]

    def on_rank0(self, name: str, fn, *args, **kwargs):
        """Run `fn` on rank 0 only (the others wait for it); rank 0 gets its result, the others None."""
        results = self.step(name, lambda: fn(*args, **kwargs) if self.is_rank0 else None)
        return results[0] if self.is_rank0 else None

    def _step(self, name: str, fn, *args, **kwargs) -> list:
        if not self.is_distributed:
            return [fn(*args, **kwargs)]
        status, result, exc = None, None, None
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            exc = e
            status = f"{type(e).__name__}: {e}".splitlines()[0]
        gathered = self.all_gather_object((status, result))
        failed = [(r, s) for r, (s, _) in enumerate(gathered) if s is not None]
        if failed:
            if self.monitor is not None:  # every rank knows the outcome now and may exit at any moment:
                self.monitor.finish()     # stop watching peers and tell them to stop watching us
            ranks = ", ".join(str(r) for r, _ in failed)
            cause = failed[0][1]
            err = ExportError(f"{name} failed on rank {ranks}: {cause}")
            if exc is not None:
                raise err from exc
            raise err
        return [r for _, r in gathered]

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def _keep(store: list, result, digest_of):
    store.append(result)
    return digest_of(result)


def _slurm_head_node() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def launcher_env() -> dict | None:
    """Rank layout and rendezvous address from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or, without torchrun, from
    Slurm's one-task-per-GPU variables; None for a plain single process. Reads the environment, never writes it."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # `dist-export export --nproc-per-node N` names a file store; torchrun uses MASTER_ADDR/PORT
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0)),
                "local_world_size": int(env.get("LOCAL_WORLD_SIZE", 0)),
                "init_method": env.get("DIST_EXPORT_RENDEZVOUS", "env://")}
    if srun_task(env):  # one task of an srun step; a batch script or salloc shell alone is one process
        addr = env.get("MASTER_ADDR") or _slurm_head_node()
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_STEP_NUM_TASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0)), "local_world_size": _slurm_tasks_per_node(env),
                "init_method": f"tcp://{addr}:{port}"}
    return None


def _slurm_tasks_per_node(env) -> int:
    """Tasks per node of a Slurm step (SLURM_NTASKS / SLURM_NNODES, block distribution); 0 when unknown."""
    try:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        return int(env["SLURM_STEP_NUM_TASKS"]) // max(nodes, 1)
    except ValueError:
        return 0


def pick_device(local_rank: int, requested: str | None = None) -> torch.device:
    """cuda:(LOCAL_RANK % device_count) on GPU nodes, else CPU; `requested` ("cpu"/"cuda") overrides."""
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is visible")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def process_age_seconds() -> float | None:
    """Seconds since this process started (interpreter start and imports); Linux only."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def init_distributed(
    device: str | None = None,
    timeout_s: float = 3600.0,
    store: dist.Store | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    startup_timeout_s: float = 20.0,
) -> DistContext:
    """Create the context: from an explicit store (tests), the launcher's environment, or a single process. A
    launched rank waits at most `startup_timeout_s` (--dead-timeout) for its peers to form the group (startup.py)."""
    age = process_age_seconds()
    if store is not None:
        layout = {"rank": rank, "world_size": world_size, "local_rank": rank}
    else:
        layout = launcher_env()
    if layout is None or layout["world_size"] == 1:
        _note_slurm_without_srun()
        return _timed_device(DistContext(stage_seconds={"start-up": age}), 0, device)
    timeout = datetime.timedelta(seconds=timeout_s)
    start = time.monotonic()
    owns = False
    if not dist.is_initialized():
        if store is not None:
            dist.init_process_group("gloo", store=store, rank=layout["rank"], world_size=layout["world_size"],
                                    timeout=timeout)
        else:
            _form_group(layout, timeout, startup_timeout_s)
        owns = True
    ctx = DistContext(layout["rank"], layout["world_size"], layout["local_rank"],
                      local_world_size=layout.get("local_world_size", 0), owns_process_group=owns,
                      stage_seconds={"start-up": age})
    ctx.stage_seconds["process group"] = time.monotonic() - start
    return _timed_device(ctx, layout["local_rank"], device)


def _form_group(layout: dict, timeout: datetime.timedelta, startup_timeout_s: float) -> None:
    """init_process_group's own rendezvous and group, with this rank's check-in in between, under a StartupWatch."""
    from .startup import StartupWatch

    rank, world = layout["rank"], layout["world_size"]
    with StartupWatch(rank, world, startup_timeout_s, layout["init_method"]) as watch:
        fire_point_fault("start", rank)
        store, rank, world = next(dist.rendezvous(layout["init_method"], rank, world, timeout=timeout))
        store.set_timeout(timeout)
        watch.joined(store)
        fire_point_fault("join", rank)
        dist.init_process_group("gloo", store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                                timeout=timeout)


def _note_slurm_without_srun() -> None:
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
    if tasks and tasks.isdigit() and int(tasks) > 1:
        log.warning("SLURM_NTASKS=%s is set but this process was not started by srun (no SLURM_STEP_NUM_TASKS): "
                    "exporting as one process; for one rank per GPU run `srun dist-export ...` or add "
                    "--nproc-per-node N", tasks)


def _timed_device(ctx: DistContext, local_rank: int, requested: str | None) -> DistContext:
    start = time.monotonic()
    ctx.device = pick_device(local_rank, requested)
    if ctx.device.type == "cuda":
        torch.empty(1, device=ctx.device)  # the CUDA context, timed here rather than inside the first stage
    ctx.stage_seconds["device"] = time.monotonic() - start
    return ctx
