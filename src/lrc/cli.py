"""`lrc`: distill, prepare, plan, export, runs, eval, demo, bench. Each subcommand maps onto one plain function.

Bad input raises `UserError` anywhere below; here it becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from transformers.utils import logging as hf_logging

from lrc import log
from lrc.config import FIELDS, add_config_arguments, build_config, check_option, read_yaml
from lrc.data import prepare_tokens
from lrc.data.tokenizer import load_tokenizer
from lrc.demo.pipeline import run_demo
from lrc.distributed.processes import pick_device
from lrc.errors import UserError
from lrc.eval.models import evaluate_models
from lrc.eval.table import format_markdown, format_text
from lrc.model.precision import DTYPES
from lrc.model.teacher import load_teacher_config
from lrc.plan.estimate import NOT_PLANNED, plan_from_config, require_teacher
from lrc.plan.report import format_plan
from lrc.plan.verdict import budget, format_budget, format_verdict, gpu_memory_for, judge, nproc_for
from lrc.publish.folder import export_run
from lrc.train.bench import SHAPES, run_bench
from lrc.train.runs import format_runs, list_checkpoints
from lrc.train.trainer import RunInterrupted, TrainingDiverged, distill


def emit_json(args, payload) -> None:
    """The one thing a `--json` command writes to standard output (everything else goes to stderr, see `main`)."""
    print(json.dumps(payload), file=getattr(args, "json_out", sys.stdout), flush=True)


def cmd_distill(args) -> int:

    values = read_yaml(args.config) if args.config else {}
    values.update({k: getattr(args, k) for k in FIELDS if hasattr(args, k)})
    cfg = build_config(values)
    try:
        distill(cfg, explicit=set(values), resume=args.resume, command=shlex.join(["lrc", *args.argv]))
    except TrainingDiverged as e:
        print(f"lrc: error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        return 128 + e.signum  # the shell convention, so `lrc distill ... && lrc export ...` stops here
    return 0


def cmd_prepare(args) -> int:

    check_option("seq_len", args.seq_len)
    check_option("num_proc", args.num_proc)
    tokenizer = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
    start = time.time()
    ds = prepare_tokens(args.data, tokenizer, Path(args.out), args.seq_len, text_field=args.text_field,
                        num_proc=args.num_proc, chat_template=args.chat_template, train_on=args.train_on)
    secs = time.time() - start
    print(f"prepared {len(ds.doc_starts):,} documents, {len(ds.tokens):,} tokens in {secs:.1f} s "
          f"({len(ds.tokens) / max(secs, 1e-9):,.0f} tokens/s) into {args.out}; train with "
          f"`lrc distill --teacher {args.teacher} --data {args.out} ...`")
    return 0


def cmd_plan(args) -> int:

    values = read_yaml(args.config) if args.config else {}
    values.update({k: getattr(args, k) for k in FIELDS if hasattr(args, k)})
    cfg = build_config(values)
    nproc = nproc_for(args.gpus, args.nproc)
    gpu = gpu_memory_for(args.gpus, args.gpu_memory, args.gpu, args.device_tflops)
    teacher_config = load_teacher_config(require_teacher(cfg), cfg.trust_remote_code)
    plan = plan_from_config(teacher_config, cfg, nproc=nproc, device=gpu.device, device_tflops=gpu.tflops,
                            mfu=args.mfu)
    verdict = None
    if gpu.memory is not None and plan.device == "cuda":
        verdict = judge(plan, teacher_config, cfg, gpu.memory, gpu.source)
    cost = budget(plan, cfg, teacher_config.hidden_size, gpu.tflops, gpu.name)
    nproc_flag = "--nproc" if args.nproc is not None else "--gpus"
    if args.json:
        out = plan.to_dict()
        out["budget"] = asdict(cost)
        out["verdict"] = None if verdict is None else asdict(verdict)
        emit_json(args, out)
        return 0
    text = [format_plan(plan), "", format_budget(plan, cost)]
    if verdict is not None:
        text.append(format_verdict(plan, verdict, args.argv, nproc_flag))
    print("\n".join(text))
    return 0


def cmd_export(args) -> int:

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not an lrc run directory (no config.yaml); pass the --out of `lrc distill`")
    if args.step is not None and args.checkpoint is not None:
        raise UserError("give --step N or --checkpoint PATH, not both")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new --out")
    dtype = DTYPES[args.dtype] if hasattr(args, "dtype") else None
    _, described = export_run(run, out, dtype, step=args.step,
                              checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    print(f"exported {described} to {out}")
    return 0


def cmd_runs(args) -> int:
    listing = [list_checkpoints(Path(r)) for r in args.run_dir]
    if args.json:
        emit_json(args, listing if len(listing) > 1 else listing[0])
    else:
        print(format_runs(listing))
    return 0


def cmd_eval(args) -> int:

    check_option("batch_size", args.batch_size)
    if args.seq_len is not None:
        check_option("seq_len", args.seq_len)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    if args.limit is not None and not args.limit > 0:
        raise UserError(f"--limit must be positive (items per task, or a share below 1), got {args.limit}")
    if not args.tasks and (args.num_fewshot is not None or args.limit is not None):
        raise UserError("--num-fewshot and --limit apply to --tasks; add --tasks NAMES")
    markdown = Path(args.markdown) if args.markdown else None
    if markdown is not None and not markdown.parent.is_dir():
        raise UserError(f"--markdown: folder {markdown.parent} does not exist; create it or choose another path")
    device = pick_device(args.device)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    records = evaluate_models(args.model, args.data, args.tasks, seq_len=args.seq_len, batch_size=args.batch_size,
                              device=device, text_field=args.text_field, num_fewshot=args.num_fewshot, limit=limit,
                              chat_template=args.chat_template, train_on=args.train_on)
    if markdown is not None:
        markdown.write_text(format_markdown(records))
    if args.json:
        emit_json(args, records if len(records) > 1 else records[0])
    else:
        print(format_text(records))
    return 0


def cmd_demo(args) -> int:
    run_demo(Path(args.out), quick=args.quick, tiny=args.tiny)
    return 0


def cmd_bench(args) -> int:
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise UserError(f"unknown bench shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    if args.steps < 1 or any(a < 1 for a in args.accum):
        raise UserError("--steps and --accum must be positive integers")
    rows = run_bench(shapes=args.shapes, steps=args.steps, accums=args.accum)
    if args.json:
        emit_json(args, rows)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown option, `--lr abc`, `--dtype int8`) are UserErrors like any other
    bad input: one line on stderr and exit status 2. Subcommand parsers inherit the class."""

    def error(self, message):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:

    p = _Parser(prog="lrc", description="Low-Rank Clone: distil a Hugging Face causal LM "
                                "into a smaller one whose weights are generated from the teacher's.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("distill", help="train a student (LRC or a baseline) from a teacher",
                       description="Train a student. Every option may also come from --config FILE.yaml "
                       "(keys are the option names); the command line wins.")
    d.add_argument("--config", help="YAML file of options (default: none)")
    d.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(default: False)")
    add_config_arguments(d)
    d.set_defaults(fn=cmd_distill)

    pr = sub.add_parser("prepare", help="tokenise and pack data once, for `lrc distill --data OUT`",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("--teacher", required=True, help="the teacher whose tokenizer is used (directory or hub id)")
    pr.add_argument("--data", nargs="+", required=True, help="files, folders or a hub dataset, as for distill")
    pr.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    pr.add_argument("--num-proc", type=int, default=1, help="tokenising processes")
    pr.add_argument("--seq-len", type=int, default=512, help="checks that the data fills one sequence; "
                    "distill may use any --seq-len")
    pr.add_argument("--text-field", default="text", help="text field of jsonl/json/parquet data")
    pr.add_argument("--chat-template", default=None, help="Jinja chat template file; None: the tokenizer's own")
    pr.add_argument("--train-on", default="all", choices=("all", "assistant"), help="targets of chat rows")
    pr.add_argument("--trust-remote-code", action="store_true", help="allow tokenizer code from the hub")
    pr.set_defaults(fn=cmd_prepare)

    pl = sub.add_parser("plan", help="what an `lrc distill` run will cost (memory, FLOPs), from the teacher's "
                        "config alone",
                        description="Memory per process by part and FLOPs per token of `lrc distill` with the same "
                        "options (and --config FILE.yaml), before anything is loaded: only the teacher's "
                        "config.json is read. --data and --out are not needed; options of `lrc distill` that change no "
                        "figure of the plan (data, learning rate, logging, ...) are accepted and not listed here.")
    pl.add_argument("--config", help="YAML file of options (default: none)")
    pl.add_argument("--nproc", type=int, default=None, help="processes of the run (torchrun: per node x nodes); "
                    "--parallel fsdp divides the teacher over them (default: 1)")
    pl.add_argument("--gpus", type=int, default=None, help="GPUs of the run, one process each (all nodes): "
                    "plans for CUDA and says whether the run fits them (default: none)")
    pl.add_argument("--gpu-memory", default=None, help="memory of one GPU, e.g. 80GiB (default: the local CUDA "
                    "device's, else --gpu's)")
    pl.add_argument("--gpu", default=None, help="the GPU by name (H100, H200, B200, A100, A100-40GB, L40S): its "
                    "memory and peak bf16 TFLOP/s (default: the local CUDA device, if listed)")
    pl.add_argument("--device-tflops", type=float, default=None,
                    help="peak dense TFLOP/s of one device in the run's precision, for a tokens/s estimate "
                    "(default: --gpu's)")
    pl.add_argument("--mfu", type=float, default=0.4, help="assumed share of that peak reached (default: 0.4)")
    pl.add_argument("--json", action="store_true", help="print one JSON object (default: False)")
    add_config_arguments(pl, hidden=NOT_PLANNED)
    pl.set_defaults(fn=cmd_plan)

    e = sub.add_parser("export", help="write a run's student as a standard Hugging Face model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run_dir", help="the --out of `lrc distill`")
    e.add_argument("--out", required=True, help="model directory to write (must be new or empty)")
    e.add_argument("--dtype", default=argparse.SUPPRESS, choices=tuple(DTYPES),
                   help="weight dtype (default: the dtype the teacher is stored in)")
    e.add_argument("--step", type=int, default=None,
                   help="export the checkpoint of this step (`lrc runs RUN_DIR` lists them); None: the latest")
    e.add_argument("--checkpoint", default=None, help="export this checkpoint folder of the run instead")
    e.set_defaults(fn=cmd_export)

    rs = sub.add_parser("runs", help="a run's kept checkpoints with their held-out losses, for `lrc export --step`",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rs.add_argument("run_dir", nargs="+", help="the --out of `lrc distill` (one or more)")
    rs.add_argument("--json", action="store_true", help="print the listing as JSON")
    rs.set_defaults(fn=cmd_runs)

    v = sub.add_parser("eval", help="models side by side: parameters, held-out loss and perplexity, task accuracy",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("model", nargs="+", help="exported/HF model directories, hub ids, or lrc run directories "
                   "(exported in memory)")
    v.add_argument("--data", nargs="+", default=None,
                   help="held-out text/jsonl/json/parquet files or folders (optional with --tasks)")
    v.add_argument("--seq-len", type=int, default=None,
                   help="sequence length; None: the run's --seq-len, else 512")
    v.add_argument("--batch-size", type=int, default=4, help="sequences per batch (held-out loss and lm-eval)")
    v.add_argument("--text-field", default="text", help="text field of jsonl/json/parquet data")
    v.add_argument("--chat-template", default=None,
                   help="Jinja chat template file for chat rows in --data; None: the one stored with the model")
    v.add_argument("--train-on", default=None, choices=("all", "assistant"),
                   help="which tokens of chat rows the held-out loss counts, for every model; None: what the "
                   "first lrc run or export given trained on, else all")
    v.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    v.add_argument("--tasks", nargs="+", default=None,
                   help="zero-shot tasks (needs lm-eval): lrc_next_line (shipped, offline), task YAML files, "
                   "lm-eval task names, or paper (its nine tasks; they fetch data from the hub)")
    v.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (None: the task's)")
    v.add_argument("--limit", type=float, default=None,
                   help="lm-eval items per task (a number below 1: a share of them)")
    v.add_argument("--json", action="store_true", help="print the records as JSON (one object for one model)")
    v.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    v.set_defaults(fn=cmd_eval)

    m = sub.add_parser("demo", help="end-to-end demo on Shakespeare, on CPU, no downloads",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--out", default="demo-out", help="output directory (report.md, plot, exported student)")
    m.add_argument("--quick", action="store_true",
                   help="smaller settings, same steps (about 2.5 minutes on 2 CPU cores)")
    m.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds; for tests
    m.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="overhead of an LRC step against teacher forward + plain training",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--shapes", nargs="+", default=["small", "large"],
                   help="shapes to measure: small, large, large-b8 (see lrc.train.bench.SHAPES)")
    b.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (median)")
    b.add_argument("--accum", type=int, nargs="+", default=[1, 4], help="gradient-accumulation settings")
    b.add_argument("--json", action="store_true", help="also print all rows as JSON")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for the model card and `lrc plan`'s suggestions

        log.configure(int(os.environ.get("RANK", "0")))  # progress of the data pipeline, start-up lines

        hf_logging.disable_progress_bar()  # our own progress lines are enough
        import datasets  # heavy (pandas, pyarrow): only when data is read

        datasets.disable_progress_bars()  # lrc.data shows one bar of its own
        if getattr(args, "json", False):  # stdout holds the JSON alone: every other line goes to stderr
            args.json_out = sys.stdout
            with contextlib.redirect_stdout(sys.stderr):
                return args.fn(args)
        return args.fn(args)
    except UserError as e:
        msg = " ".join(str(e).split())
        sys.stderr.write(f"lrc: error: {msg}\n")  # one write: under torchrun every process may print at once
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
