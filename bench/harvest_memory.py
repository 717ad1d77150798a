"""Memory of a harvest from a dataset several times larger than the memory it may use.

    sudo python bench/harvest_memory.py [--dataset-mb 4096] [--limit-mb 1024] [--contexts 512]

Writes a JSON-lines file of ``--dataset-mb`` and runs the whole ``harvest`` stage on it (HF datasets converts the
file to memory-mapped Arrow, reading all of it; the packer then reads the documents the contexts need; the forward
to ``blocks.0.mlp.hook_post`` of the shipped model; shards written) in a memory cgroup limited to ``--limit-mb``
(cgroup v1 or v2; needs root). A harvest that held the dataset in memory would be killed by the kernel; one that
streams finishes. Prints whether it finished, its time, and the peak of its memory sampled every 0.1 s from
/proc: anonymous (heap: what the limit cannot reclaim) and file-backed (mapped Arrow pages, which it can), with
the cgroup's own peak and OOM count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harvest_dataset import ROOT, _HARVEST, write_jsonl  # noqa: E402


class MemoryCgroup:
    """A fresh memory cgroup with a hard limit, v2 where mounted, else v1."""

    def __init__(self, limit_bytes: int) -> None:
        name = f"monosemantic-bench-{os.getpid()}"
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():
            self.version, self.path = 2, Path("/sys/fs/cgroup") / name
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit_bytes))
            (self.path / "memory.swap.max").write_text("0")
        elif Path("/sys/fs/cgroup/memory").is_dir():
            self.version, self.path = 1, Path("/sys/fs/cgroup/memory") / name
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        else:
            raise SystemExit("no memory cgroup here (neither v2 nor v1 is mounted)")

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text()) if (self.path / name).exists() else -1

    def oom_kills(self) -> int:
        if self.version == 2:
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            return int(events.get("oom_kill", 0))
        control = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return int(control.get("oom_kill", 0))

    def remove(self) -> None:
        self.path.rmdir()


def sample(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
    except OSError:
        return {}
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile") if k in fields}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-mb", type=float, default=4096)
    parser.add_argument("--limit-mb", type=float, default=1024)
    parser.add_argument("--contexts", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        data = tmp / "large.jsonl"
        started = time.perf_counter()
        write_jsonl(data, args.dataset_mb)
        print(f"wrote {data.stat().st_size / 2**20:,.0f} MiB of JSON lines in {time.perf_counter() - started:.0f} s", flush=True)
        group = MemoryCgroup(int(args.limit_mb * 2**20))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
        peaks: dict[str, int] = {}
        try:
            started = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-c", _HARVEST, str(tmp / "h"), str(args.contexts), str(data)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                       preexec_fn=group.enter)
            while process.poll() is None:
                for key, value in sample(process.pid).items():
                    peaks[key] = max(peaks.get(key, 0), value)
                time.sleep(0.1)
            out, err = process.communicate()
            seconds = time.perf_counter() - started
            result = {
                "dataset_mib": data.stat().st_size / 2**20, "limit_mib": args.limit_mb, "finished": process.returncode == 0,
                "exit_code": process.returncode, "seconds": round(seconds, 1),
                "peak_rss_mib": peaks.get("VmRSS", 0) / 2**20, "peak_anonymous_mib": peaks.get("RssAnon", 0) / 2**20,
                "peak_file_backed_mib": peaks.get("RssFile", 0) / 2**20,
                "cgroup_peak_mib": group.peak_bytes() / 2**20, "oom_kills": group.oom_kills(),
                "harvest": json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else err[-2000:],
            }
        finally:
            group.remove()
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
