"""Long-range dependency study: plain tanh RNN vs LSTM vs GRU on the adding problem and the copy task.

Every cell gets the same parameter budget (hidden sizes matched to the LSTM's parameter count), the
same optimiser steps and the same data at every sequence length, over several seeds. The study
reports the final test metric against its trivial baseline and probes the mechanism: the norm of
the loss gradient reaching each time step's input, by distance from the loss, during training.

    seqserve export study [--quick] [--out runs/study]
    python -m seqserve.export.study [--quick] [--out runs/study]

Writes ``results.json``, ``runs.jsonl`` (one line per finished run, as they finish),
``results.md`` and ``study-metrics.png`` / ``study-gradients.png`` to the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqserve.cli import CommandError

from .study_plot import gradient_table, markdown_table, plot_gradients, plot_metrics, summarize
from .study_tasks import CELLS, TASKS, TaskSpec, TrainSpec, matched_hidden_sizes, one_thread, train_job, use_one_thread

DEFAULT_OUT = "runs/study"
_CELL_COST = {"rnn": 1.0, "lstm": 1.0, "gru": 3.0}  # relative CPU time per step, for scheduling only


@dataclass(frozen=True)
class StudyConfig:
    """What the study trains; every (task, cell, length, seed) combination is one run."""

    tasks: tuple[str, ...] = TASKS  # which long-dependency tasks
    cells: tuple[str, ...] = CELLS  # which recurrent cells
    lengths: tuple[int, ...] = (10, 50, 100, 200)  # sequence lengths: 500 does not fit the 30-minute CPU budget
    seeds: tuple[int, ...] = (0, 1, 2)  # model-init and data seeds: the spread across them is reported
    lstm_hidden: int = 32  # sets the parameter budget; the other cells' hidden sizes are matched to it
    probe_length: int | None = None  # length whose seed-0 runs are gradient-probed; None: the longest
    workers: int = 2  # parallel training processes, one thread each (one per CPU core)
    task: TaskSpec = field(default_factory=TaskSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    @property
    def probed_length(self) -> int:
        return self.probe_length or max(self.lengths)


QUICK = StudyConfig(
    lengths=(8, 12),
    seeds=(0,),
    lstm_hidden=8,
    workers=1,
    train=TrainSpec(steps=20, batch=16, test_size=64, probe_size=8, curve_points=5),
)


def validate(config: StudyConfig) -> None:
    """Raise CommandError naming the first setting the study cannot run with."""
    if not config.tasks or set(config.tasks) - set(TASKS):
        raise CommandError(f"tasks must be a non-empty subset of {','.join(TASKS)}, got {','.join(config.tasks)}")
    if not config.cells or set(config.cells) - set(CELLS):
        raise CommandError(f"cells must be a non-empty subset of {','.join(CELLS)}, got {','.join(config.cells)}")
    if not config.lengths or not config.seeds:
        raise CommandError("give at least one length and one seed")
    shortest = 2 * config.task.symbols + 1 if "copy" in config.tasks else 2
    if min(config.lengths) < shortest:
        raise CommandError(
            f"every length must be at least {shortest} (the copy task needs 2*symbols+1), got {min(config.lengths)}"
        )
    if config.probe_length is not None and config.probe_length not in config.lengths:
        raise CommandError(f"probe length {config.probe_length} is not one of the lengths {list(config.lengths)}")
    for name, value in (
        ("steps", config.train.steps),
        ("batch", config.train.batch),
        ("lstm hidden", config.lstm_hidden),
        ("workers", config.workers),
    ):
        if value < 1:
            raise CommandError(f"{name} must be at least 1, got {value}")
    if config.train.lr <= 0:
        raise CommandError(f"learning rate must be positive, got {config.train.lr}")


def plan(config: StudyConfig) -> tuple[dict, list[tuple]]:
    """Matched hidden sizes per task and cell, and the runs to do, costliest first."""
    sizes = {task: matched_hidden_sizes(task, config.lstm_hidden, config.task) for task in config.tasks}
    jobs = [
        (
            task,
            cell,
            length,
            seed,
            sizes[task][cell]["hidden"],
            config.task,
            config.train,
            seed == config.seeds[0] and length == config.probed_length,
        )
        for task in config.tasks
        for cell in config.cells
        for length in config.lengths
        for seed in config.seeds
    ]
    jobs.sort(key=lambda j: -_CELL_COST[j[1]] * j[2])
    return sizes, jobs


def _progress(done: int, total: int, record: dict, started: float) -> str:
    test = record["test"]
    metric = (
        f"mse {test['mse']:.4f} (mean-prediction {test['baseline_mse']:.4f})"
        if record["task"] == "adding"
        else f"accuracy {test['accuracy']:.3f} (chance {test['chance']:.3f})"
    )
    elapsed = time.perf_counter() - started
    return (
        f"[{done}/{total}] {record['task']} {record['cell']} length={record['length']} seed={record['seed']}: "
        f"{metric} in {record['seconds']:.1f}s; elapsed {elapsed / 60:.1f} min"
    )


def run_jobs(jobs: list[tuple], workers: int, journal: Path) -> list[dict]:
    """Train every job (in ``workers`` single-thread processes when > 1), printing a line per run."""
    records, started = [], time.perf_counter()
    with journal.open("w", encoding="utf-8") as log:

        def finish(record: dict) -> None:
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(_progress(len(records), len(jobs), record, started), flush=True)

        if workers == 1:
            with one_thread():
                for job in jobs:
                    finish(train_job(*job))
            return records
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=use_one_thread) as pool:
            futures = [pool.submit(train_job, *job) for job in jobs]
            try:
                for future in as_completed(futures):
                    finish(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return records


def run_study_config(config: StudyConfig, out_dir: Path | str, docs_img: Path | str | None = None) -> dict:
    """Run the whole study and write its JSON, markdown and plots to ``out_dir``; return the results."""
    validate(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes, jobs = plan(config)
    for task, by_cell in sizes.items():
        print(
            f"{task}: "
            + ", ".join(
                f"{c} hidden {s['hidden']} ({s['parameters']} params)" for c, s in by_cell.items() if c in config.cells
            ),
            flush=True,
        )
    print(f"{len(jobs)} runs of {config.train.steps} steps on {config.workers} worker(s)", flush=True)
    started = time.perf_counter()
    runs = run_jobs(jobs, config.workers, out / "runs.jsonl")
    runs.sort(key=lambda r: (r["task"], r["cell"], r["length"], r["seed"]))
    summary = summarize(runs)
    probes = [
        {
            "task": r["task"],
            "cell": r["cell"],
            "length": r["length"],
            "seed": r["seed"],
            "grad_by_distance": r.pop("grad_by_distance"),
        }
        for r in runs
        if "grad_by_distance" in r
    ]
    results: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "parameters": {t: {c: s for c, s in by.items() if c in config.cells} for t, by in sizes.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "gradient_probes": probes,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    images = [plot_metrics(summary, out / "study-metrics.png")]
    if probes:
        images.append(plot_gradients(probes, out / "study-gradients.png"))
    (out / "results.md").write_text(report_markdown(results, [p.name for p in images]), encoding="utf-8")
    if docs_img is not None:
        Path(docs_img).mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copyfile(image, Path(docs_img) / image.name)
    print(
        f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(images)} plot(s) "
        f"in {results['wall_seconds'] / 60:.1f} min",
        flush=True,
    )
    return results


def report_markdown(results: dict, images: list[str]) -> str:
    """results.md: settings, the metric tables, the gradient table and the plots."""
    cfg = results["config"]
    train = cfg["train"]
    lines = [
        "# Long-range dependency study: rnn vs lstm vs gru",
        "",
        f"Lengths {cfg['lengths']}, seeds {cfg['seeds']}; every run: {train['steps']} Adam steps "
        f"(lr {train['lr']}, batch {train['batch']}, gradient clip {train['clip']}, LSTM forget-gate bias "
        f"{train['lstm_forget_bias']}), one recurrent layer, test set of {train['test_size']} sequences. "
        f"Copy task: {cfg['task']['symbols']} letters from {cfg['task']['alphabet']}. "
        f"Wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
        markdown_table(results["summary"], results["parameters"], train["steps"]),
    ]
    if results["gradient_probes"]:
        lines += [
            "Mean ||dL/dx_t|| at distance d from the last step (seed 0, length "
            f"{results['gradient_probes'][0]['length']}), at training step:",
            "",
            gradient_table(results["gradient_probes"]),
        ]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- a served study model


def export_study_model(cell: str, length: int, out_root: Path | str, seed: int = 0, steps: int = 40):
    """Train a small adding-problem model on sequences of ``length`` for ``steps`` steps (seconds)
    and write it as a ``regressor`` bundle ``adding-<cell>``. Returns ``(bundle, torch_model)``."""
    from .package import write_bundle
    from .study_tasks import train_run

    spec = TaskSpec()
    hidden = matched_hidden_sizes("adding", 16, spec)[cell]["hidden"]
    train = TrainSpec(steps=steps, batch=32, test_size=256)
    with one_thread():
        record, model = train_run("adding", cell, length, seed, hidden, spec, train)
    model.eval()
    data = {
        "task": "adding problem",
        "length": length,
        "seed": seed,
        "steps": steps,
        "description": "inputs (value, marker) per step; output at the last step: sum of the two marked values",
    }
    bundle = write_bundle(
        model,
        out_root,
        f"adding-{cell}",
        "regressor",
        labels=None,
        data=data,
        metrics={"test_mse": record["test"]["mse"], "mean_prediction_mse": record["test"]["baseline_mse"]},
    )
    return bundle, model


# ---------------------------------------------------------------- command line


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``seqserve export study``; defaults are the full study's (or --quick's)."""
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--quick", action="store_true", help="tiny lengths and steps, one seed: checks the pipeline in seconds"
    )
    parser.add_argument("--tasks", help=f"comma list from {','.join(TASKS)}")
    parser.add_argument("--cells", help=f"comma list from {','.join(CELLS)}")
    parser.add_argument("--lengths", help="comma list of sequence lengths (default 10,50,100,200)")
    parser.add_argument("--seeds", help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 1500)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 64)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 0.01)")
    parser.add_argument("--lstm-hidden", type=int, help="LSTM hidden size; sets the parameter budget (default 32)")
    parser.add_argument("--lstm-forget-bias", type=float, help="LSTM forget-gate bias at init (default 1.0)")
    parser.add_argument("--probe-length", type=int, help="length whose runs get the gradient probe (default: longest)")
    parser.add_argument("--workers", type=int, help="parallel training processes, one thread each (default 2)")
    parser.add_argument("--docs-img", help="also copy the plots into this folder")


def _parse_list(text: str, kind, what: str) -> tuple:
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise CommandError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise CommandError(f"--{what} is empty")
    return values


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    base = QUICK if args.quick else StudyConfig()
    changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = {}
    for name, kind in (("tasks", str), ("cells", str), ("lengths", int), ("seeds", int)):
        if getattr(args, name) is not None:
            changes[name] = _parse_list(getattr(args, name), kind, name)
    for name in ("lstm_hidden", "probe_length", "workers"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    for name in ("steps", "batch", "lr", "lstm_forget_bias"):
        if getattr(args, name) is not None:
            train_changes[name] = getattr(args, name)
    if train_changes:
        changes["train"] = dataclasses.replace(base.train, **train_changes)
    return dataclasses.replace(base, **changes)


def run_study(args: argparse.Namespace) -> int:
    """``seqserve export study``: run the study with the parsed options; 0 on success."""
    run_study_config(config_from_args(args), args.out, args.docs_img)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqserve.export.study", description=__doc__.splitlines()[0])
    add_study_arguments(parser)
    try:
        return run_study(parser.parse_args(argv))
    except CommandError as exc:
        print(f"seqserve export study: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
