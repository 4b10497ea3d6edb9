"""Fault trials for BENCHMARKS.md: SIGKILL at four moments, then the same command again until it finishes.

    python benchmarks/fault_trials.py                    # all trials (about 5 minutes on 2 cores) -> BENCHMARKS.md
    python benchmarks/fault_trials.py --chains export    # rerun some; the others' rows are kept (results.json)

Moments: during a training step; while a checkpoint is written (the kill is sent the moment a `.tmp-step-*`
folder appears); during `lrc prepare` and during the tokenising at the start of a run under torchrun; during
`lrc export`. Runs use 1 process and 2 (torchrun, gloo) where the command has both. Every kill is SIGKILL to
the process and all its descendants at once (torchrun and its workers), as a job scheduler ends a job. After
each kill the *same command* is started again; each distill and prepare chain ends with a run that is not
killed, and its result is compared with the same command run once without a kill: the weights of the last
checkpoint and every logged step (distill), the token files (prepare). Each export is killed once and then
finished by the same command (or found complete), and compared file by file with an export never killed.
The teacher is a tiny random Llama (hidden 64, 2 layers) with the demo's BPE tokenizer; the corpus is the
demo's plays.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from _markdown import write_block

ROOT = Path(os.environ.get("LRC_FAULTS", "/tmp/lrc-faults"))
LRC = [sys.executable, "-m", "lrc"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lrc"]
START, END = "<!-- fault_trials:start -->", "<!-- fault_trials:end -->"
STEPS = 150


def setup() -> tuple[Path, Path, Path]:
    """(teacher, small corpus for training, larger corpus for tokenising) under ROOT, made once."""
    from data_pipeline import plays_and_teacher

    teacher = ROOT / "teacher"
    plays = plays_and_teacher(teacher)
    paragraphs = [p.strip() for play in plays for p in play.split("\n\n") if p.strip()]
    rng = random.Random(0)
    small, large = ROOT / "small.jsonl", ROOT / "large.jsonl"
    for path, docs in ((small, 300), (large, 1500)):
        if not path.is_file():
            with path.open("w") as f:
                for _ in range(docs):
                    f.write(json.dumps({"text": "\n\n".join(rng.choices(paragraphs, k=rng.randint(20, 80)))}) + "\n")
    return teacher, small, large


def distill_cmd(teacher: Path, data: Path, out: Path) -> list[str]:
    return ["distill", "--method", "lrc",
            "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--hidden-size", "32",
            "--seq-len", "64", "--batch-size", "4", "--max-steps", str(STEPS), "--save-every", "1",
            "--eval-every", "0", "--log-every", "1", "--lr", "auto", "--init", "refit", "--precision", "fp32",
            "--resume"]


def env(cache: Path) -> dict[str, str]:
    return dict(os.environ, LRC_CACHE=str(cache), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def steps_logged(run: Path) -> int:
    try:
        return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"split": "train"' in line)
    except OSError:
        return 0


def leftovers(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("step-")) if root.is_dir() else []


def start(cmd: list[str], cache: Path, log: Path) -> subprocess.Popen:
    with log.open("a") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(cache))


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the process and all its descendants at once, as a job scheduler ends a job (torchrun's workers
    survive a SIGKILL of torchrun alone: they run in sessions of their own)."""
    if proc.poll() is not None:
        return False
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [proc.pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return True


def finish(cmd: list[str], cache: Path, log: Path) -> int:
    """The same command again, not killed; returns its exit status."""
    proc = start(cmd, cache, log)
    return proc.wait(timeout=1800)


def last_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(str(last / "trainable.safetensors"))


def same_run(a: Path, b: Path) -> bool:
    def logged(run: Path) -> list:
        return [{k: r[k] for k in ("step", "tokens", "loss", "grad_norm", "lr")}
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]

    wa, wb = last_weights(a), last_weights(b)
    return logged(a) == logged(b) and wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def same_tree(a: Path, b: Path, skip: tuple[str, ...] = ()) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name not in skip)
    if names != sorted(p.name for p in b.iterdir() if p.name not in skip):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names if (a / n).is_file())


def distill_chain(moment: str, nproc: int, kills: int, teacher: Path, data: Path, rng: random.Random) -> list[dict]:
    """`kills` SIGKILLs of one distill command ("step": after a random number of new steps; "checkpoint": the
    moment a checkpoint's temporary folder appears), then the command once more to the end."""
    work = ROOT / f"{moment}-{nproc}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    launcher = LRC if nproc == 1 else TORCHRUN
    out, cache, log = work / "run", ROOT / "cache", work / "log.txt"
    cmd = [*launcher, *distill_cmd(teacher, data, out)]
    ref = ROOT / f"ref-{nproc}"
    if not (ref / "config.yaml").is_file() or steps_logged(ref) < STEPS:
        shutil.rmtree(ref, ignore_errors=True)
        assert finish([*launcher, *distill_cmd(teacher, data, ref)], cache, work / "ref.txt") == 0
    rows = []
    for _ in range(kills):
        before = steps_logged(out)
        proc = start(cmd, cache, log)
        t0 = time.time()
        target = before + rng.randint(1, max(1, (STEPS - before) // 4))
        seen = None
        while proc.poll() is None and time.time() - t0 < 600:
            if moment == "step":
                if steps_logged(out) >= target:
                    time.sleep(rng.uniform(0, 0.05))
                    break
            elif steps_logged(out) >= target:
                root = out / "checkpoints"
                try:
                    seen = next((e.name for e in os.scandir(root) if e.name.startswith(".tmp-")), None)
                except OSError:
                    seen = None
                if seen:
                    break
            time.sleep(0.0005 if moment == "checkpoint" else 0.005)
        landed = kill(proc)
        left = leftovers(out)
        kept = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
        rows.append({"moment": moment, "processes": nproc, "killed": landed,
                     "at": f"after step {steps_logged(out)}" + (f", {seen} being written" if seen else ""),
                     "left": ", ".join(left) if left else "no leftover",
                     "resumes_from": kept[-1].name if kept else "(no checkpoint: starts again)"})
    rc = finish(cmd, cache, log)
    ok = rc == 0 and same_run(out, ref) and not leftovers(out)
    for r in rows:
        r["outcome"] = "same weights and log as never killed" if ok else f"DIFFERENT (exit {rc})"
    return rows


def prepare_chain(kills: int, teacher: Path, data: Path, rng: random.Random) -> list[dict]:
    work = ROOT / "prepare"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    clean, out, log = work / "clean", work / "prepared", work / "log.txt"
    cmd = [*LRC, "prepare", "--teacher", str(teacher), "--data", str(data), "--seq-len", "64"]
    t0 = time.time()
    assert finish([*cmd, "--out", str(clean)], work / "cache-clean", log) == 0
    took = time.time() - t0
    rows = []
    for _ in range(kills):
        proc = start([*cmd, "--out", str(out)], work / "cache", log)
        when = rng.uniform(0.3, took)
        time.sleep(when)
        landed = kill(proc)
        rows.append({"moment": "prepare", "processes": 1, "killed": landed, "at": f"{when:.1f} s of {took:.1f} s",
                     "left": ", ".join(sorted(p.name for p in out.iterdir())) if out.is_dir() else "nothing",
                     "resumes_from": "the same command"})
    rc = finish([*cmd, "--out", str(out)], work / "cache", log)
    ok = rc == 0 and same_tree(out, clean)
    for r in rows:
        r["outcome"] = "same token files as never killed" if ok else f"DIFFERENT (exit {rc})"
    return rows


def tokenising_chain(kills: int, teacher: Path, data: Path, rng: random.Random) -> list[dict]:
    """Killed while torchrun's 2 processes tokenise the data at the start of a run (a fresh cache)."""
    work = ROOT / "tokenising"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out, log, cache = work / "run", work / "log.txt", work / "cache"
    cmd = [*TORCHRUN, *distill_cmd(teacher, data, out), "--max-steps", "20"]
    ref = work / "ref"
    t0 = time.time()
    assert finish([*TORCHRUN, *distill_cmd(teacher, data, ref), "--max-steps", "20"], work / "cache-ref", log) == 0
    took = time.time() - t0
    rows = []
    for _ in range(kills):
        proc = start(cmd, cache, log)
        when = rng.uniform(3.5, took * 0.7)  # start-up (imports, teacher) takes about 3 s of it
        time.sleep(when)
        first_step = steps_logged(out) > 0
        landed = kill(proc)
        rows.append({"moment": "tokenising (distill start)", "processes": 2, "killed": landed,
                     "at": f"{when:.1f} s of {took:.1f} s" + (" (training had begun)" if first_step else ""),
                     "left": f"cache: {len(list(cache.rglob('*')))} entries" if cache.exists() else "nothing",
                     "resumes_from": "the same command"})
    rc = finish(cmd, cache, log)
    ok = rc == 0 and same_run(out, ref)
    for r in rows:
        r["outcome"] = "same weights and log as never killed" if ok else f"DIFFERENT (exit {rc})"
    return rows


def export_chain(kills: int, rng: random.Random) -> list[dict]:
    """Each trial: `lrc export` into a new folder, killed (the moment its hidden folder appears, or at a random
    time); --out must then be absent or the complete model; the same command finishes it where absent."""
    work = ROOT / "export"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = ROOT / "ref-1"
    clean, log = work / "clean", work / "log.txt"
    t0 = time.time()
    assert finish([*LRC, "export", str(run), "--out", str(clean)], ROOT / "cache", log) == 0
    took = time.time() - t0
    rows = []
    for i in range(kills):
        out = work / f"model-{i}"
        partial = work / f".model-{i}.partial"
        cmd = [*LRC, "export", str(run), "--out", str(out)]
        proc = start(cmd, ROOT / "cache", log)
        if i % 2 == 0:  # the moment the model starts being written
            while proc.poll() is None and not partial.exists():
                time.sleep(0.0005)
            at = "as the model folder was started"
        else:
            when = rng.uniform(0.5, took)
            time.sleep(when)
            at = f"{when:.1f} s of {took:.1f} s"
        landed = kill(proc)
        complete = out.exists()
        left = ("--out complete (killed after the rename)" if complete else "no --out") + \
            ("; hidden partial folder" if partial.exists() else "")
        rc = 0 if complete else finish(cmd, ROOT / "cache", log)
        ok = rc == 0 and same_tree(out, clean, skip=("README.md",)) and not partial.exists()  # the card names --out
        rows.append({"moment": "export", "processes": 1, "killed": landed, "at": at, "left": left,
                     "resumes_from": "nothing to do" if complete else "the same command",
                     "outcome": "same files as never killed" if ok else f"DIFFERENT (exit {rc})"})
    return rows


def report(rows: list[dict], md: Path, seconds: float) -> None:
    killed = sum(r["killed"] for r in rows)
    good = sum(r["killed"] and not r["outcome"].startswith("DIFFERENT") for r in rows)
    lines = [START, "", "| # | moment | processes | killed at | what the kill left | restarted from | outcome |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['moment']} | {r['processes']} | {r['at']}{'' if r['killed'] else ' (had exited)'}"
                     f" | {r['left']} | {r['resumes_from']} | {r['outcome']} |")
    lines += ["", f"{killed} kills landed ({len(rows)} tried), {good} of them restarted by the same command to the "
              f"result of a run never killed; {seconds / 60:.0f} minutes in all.", "", END]
    print(write_block(md, START, END, lines, "Runs that survive being killed (issue 25)"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--markdown", default="BENCHMARKS.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chains", nargs="*", help="rerun only these (default: all); the others' rows are kept")
    args = p.parse_args()
    rng = random.Random(args.seed)
    teacher, small, large = setup()
    saved = ROOT / "results.json"
    chains = json.loads(saved.read_text()) if saved.is_file() else {}
    runs = {**{f"{m}-{n}": (lambda m=m, n=n: distill_chain(m, n, 3, teacher, small, rng))
               for m in ("step", "checkpoint") for n in (1, 2)},
            "prepare": lambda: prepare_chain(3, teacher, large, rng),
            "tokenising": lambda: tokenising_chain(3, teacher, large, rng),
            "export": lambda: export_chain(4, rng)}
    for name in args.chains or list(runs):
        t1 = time.time()
        chains[name] = {"rows": runs[name](), "seconds": time.time() - t1}
        print(name, json.dumps(chains[name]), flush=True)
        saved.write_text(json.dumps(chains, indent=1))
    rows = [r for name in runs if name in chains for r in chains[name]["rows"]]
    report(rows, Path(args.markdown), sum(c["seconds"] for c in chains.values()))


if __name__ == "__main__":
    main()
