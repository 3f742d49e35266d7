"""isoFLOP experiment at small scale: vanilla, recursive and MoR models trained to equal FLOPs, with controls.

``mor-bench isoflop`` reproduces the design of the paper's isoFLOP study (App. Tab. scaling_law) on a CPU: for
each FLOPs budget, every model of one base shape (default the ``tiny`` presets: hidden 64, 8 unrolled layers)
trains for the steps that spend the budget (FLOPs per token from :mod:`mor_megatron.model.flops`, paper scope
by default: forward-only accounting without LM head or router, ``x3`` not applied, as the paper counts its
2e18 / 5e18 budgets; ``--flops-scope training`` counts 3 x forward with the LM head). MoR runs fewer FLOPs per
token, so it sees more tokens for the budget; its **equal-tokens control** (vanilla's step count) separates
"more tokens per FLOP" from "better per token". Each configuration runs with several seeds (``--seeds``) for a
noise estimate.

Every run is a normal ``mor-pretrain`` job (one process) tracked in one MLflow experiment, with the paper's
recipe scaled down (AdamW lr 3e-3, betas 0.9/0.95, wd 0.1, clip 1, WSD with 5% warmup and a 20% linear
decay) and ``train.eval_mode=fixed``: every evaluation of every run scores the same validation sequences, so
curves compare across runs. Output: a table (unique parameters, FLOPs/token, steps, tokens, epochs over the
training split, final validation NLL with top-k and causal routing, mean and spread over seeds), a PNG of
validation loss against training FLOPs, both printed/saved and logged as artifacts of a summary run.

Data: ``--data-prefix`` and ``--tokenizer`` (a ``mor-data preprocess`` output), else the embedded corpus (the
Python standard library, 4 MB, 2048-piece tokenizer) built once under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mor_megatron.config import ModelConfig, RecursionConfig, preset
from mor_megatron.model.flops import count_parameters, flops_per_token, paper_budget_flops_per_token

MODELS = ("vanilla", "recursive-r2", "recursive-r3", "mor-e-r2", "mor-e-r3", "mor-t-r3")
SPLIT = "96,4,0"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the experiment."""

    model: str
    budget: float
    steps: int
    seed: int
    equal_tokens: bool

    @property
    def name(self) -> str:
        control = "-equal-tokens" if self.equal_tokens else ""
        return f"{self.model}{control}-{self.budget:.0e}-s{self.seed}"


def flops_per_token_in_scope(model: ModelConfig, recursion: RecursionConfig, seq_length: int, scope: str) -> float:
    """FLOPs per training token as the budget counts them (see module doc)."""
    if scope == "paper":
        return paper_budget_flops_per_token(model, recursion, seq_length)
    return flops_per_token(model, recursion, seq_length).training_flops_per_token_with_lm_head


def plan(args: argparse.Namespace) -> list[RunSpec]:
    """Every run: each model at the steps its budget buys, the MoR models also at vanilla's steps, x seeds."""
    tokens_per_step = args.global_batch_size * args.seq_length
    runs = []
    for budget in args.budgets:
        steps = {}
        for name in args.models:
            model, recursion = _model(args, name)
            per_token = flops_per_token_in_scope(model, recursion, args.seq_length, args.flops_scope)
            steps[name] = math.floor(budget / (per_token * tokens_per_step))
            if steps[name] < 20:
                raise ValueError(f"budget {budget:g} buys {name} only {steps[name]} steps of {tokens_per_step} "
                                 "tokens; raise --budgets")
        for seed in args.seeds:
            for name in args.models:
                runs.append(RunSpec(name, budget, steps[name], seed, equal_tokens=False))
                if name.startswith("mor"):
                    runs.append(RunSpec(name, budget, steps["vanilla"], seed, equal_tokens=True))
    return runs


def _model(args: argparse.Namespace, name: str) -> tuple[ModelConfig, RecursionConfig]:
    model, recursion = preset(f"{args.base}-{name}")
    return ModelConfig(**{**model.__dict__, "max_seq_length": max(model.max_seq_length, args.seq_length)}), recursion


def prepare_data(args: argparse.Namespace) -> tuple[str, str]:
    """(prefix, tokenizer) given on the command line, else the embedded corpus built once under the output dir."""
    if args.data_prefix:
        return args.data_prefix, args.tokenizer
    from mor_megatron.data.corpus import write_stdlib_corpus
    from mor_megatron.data.preprocess import preprocess
    from mor_megatron.data.tokenizer import train_tokenizer

    root = Path(args.output_dir) / "data"
    prefix, tokenizer_dir = root / "stdlib", root / "tokenizer"
    if not Path(f"{prefix}.idx").exists():
        root.mkdir(parents=True, exist_ok=True)
        corpus = root / "corpus.jsonl"
        write_stdlib_corpus(corpus, max_mb=4.0)
        model = train_tokenizer([corpus], tokenizer_dir, vocab_size=2048, overwrite=True)
        preprocess([corpus], prefix, tokenizer=model, workers=1, progress=False, overwrite=True)
    return str(prefix), str(tokenizer_dir)


def training_split_tokens(prefix: str) -> int:
    """Tokens in the training split of ``prefix`` under :data:`SPLIT` (documents split in order, as megatron)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mor_megatron.data.datasets import split_document_counts

    dataset = IndexedDataset(prefix)  # its lengths are a view of the index's memory map: keep it open while read
    lengths = dataset.sequence_lengths
    train_documents = split_document_counts(len(lengths), SPLIT)[0] or 0
    return int(lengths[:train_documents].sum(dtype="int64"))


def run_one(args: argparse.Namespace, spec: RunSpec, data: tuple[str, str]) -> Path:
    """Train ``spec`` with ``mor-pretrain`` in its own process; returns its output folder."""
    output = Path(args.output_dir) / "runs" / spec.name
    if (output / "metrics.jsonl").exists():
        if _finished(output):
            return output  # done by an earlier invocation: the experiment continues where it stopped
        shutil.rmtree(output)  # an interrupted run starts over (no checkpoints are kept)
    prefix, tokenizer = data
    eval_interval = max(1, spec.steps // args.evaluations)
    model, _ = _model(args, spec.model)  # the model the FLOPs accounting counted
    overrides = [
        f"preset={args.base}-{spec.model}", f"model.max_seq_length={model.max_seq_length}",
        f"data.blend=[{prefix}]", f"data.tokenizer={tokenizer}", f"data.split={SPLIT}",
        f"train.train_steps={spec.steps}", f"train.seq_length={args.seq_length}",
        f"train.global_batch_size={args.global_batch_size}", f"train.micro_batch_size={args.global_batch_size}",
        f"train.eval_interval={eval_interval}", f"train.eval_steps={args.eval_steps}", "train.eval_mode=fixed",
        # The seed varies the initialisation only: data.seed stays, so every run scores the same sequences.
        f"train.log_interval={eval_interval}", f"train.seed={spec.seed}",
        "train.precision=fp32", f"optim.lr={args.lr}", "optim.min_lr=0.0", "optim.schedule=wsd",
        f"optim.warmup_steps={max(1, round(0.05 * spec.steps))}", "optim.decay_fraction=0.2",
        "checkpoint.save_dir=null", f"output_dir={output}",
        f"tracking.tracking_uri={args.tracking_uri}", f"tracking.experiment={args.experiment}",
        f"tracking.run_name={spec.name}", "tracking.system_metrics=false", "tracking.depth_maps=false",
    ]
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(args.threads_per_run)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "stdout.log", "wb") as out, open(output / "stderr.log", "wb") as err:
        done = subprocess.run([sys.executable, "-m", "mor_megatron.pretrain", *overrides], env=env, stdout=out,
                              stderr=err, timeout=args.run_timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"run {spec.name} failed (exit {done.returncode}); see {output / 'stderr.log'}")
    return output


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _finished(output: Path) -> bool:
    return any(r["kind"] == "end" and r["status"] == "FINISHED" for r in _records(output))


def collect(args: argparse.Namespace, spec: RunSpec, output: Path, split_tokens: int) -> dict:
    """The figures of one finished run: final validation NLLs, the validation curve against FLOPs."""
    model, recursion = _model(args, spec.model)
    per_token = flops_per_token_in_scope(model, recursion, args.seq_length, args.flops_scope)
    tokens_per_step = args.global_batch_size * args.seq_length
    curve, final = [], {}
    for record in _records(output):
        if record["kind"] == "metrics" and "val/loss" in record["metrics"]:
            metrics = record["metrics"]
            curve.append((record["step"] * tokens_per_step * per_token, metrics["val/loss"]))
            final = {"val_loss": metrics["val/loss"], "val_loss_causal": metrics["val/loss_causal"]}
    tokens = spec.steps * tokens_per_step
    return {"run": spec.name, "model": spec.model, "budget": spec.budget, "seed": spec.seed,
            "equal_tokens": spec.equal_tokens, "steps": spec.steps, "tokens": tokens,
            "epochs": tokens / split_tokens, "flops_per_token": per_token,
            "unique_params": count_parameters(model, recursion).total, "curve": curve, **final}


def summarize(results: list[dict]) -> list[dict]:
    """One row per (budget, model, control): means and spreads (max - min) over seeds, and the difference to
    vanilla paired by seed (same seed, same data order: what the seed does to every model cancels out)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["budget"], MODELS.index(r["model"]), r["equal_tokens"]), []).append(r)
    vanilla = {(r["budget"], r["seed"]): r["val_loss"] for r in results if r["model"] == "vanilla"}
    rows = []
    for (budget, _, equal_tokens), runs in sorted(groups.items()):
        first = runs[0]
        row = {key: first[key] for key in ("budget", "model", "equal_tokens", "unique_params", "flops_per_token",
                                             "steps", "tokens", "epochs")}
        for key in ("val_loss", "val_loss_causal"):
            values = [r[key] for r in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_spread"] = max(values) - min(values)
        deltas = [r["val_loss"] - vanilla[(budget, r["seed"])] for r in runs]
        row["delta_vs_vanilla"] = statistics.fmean(deltas)
        row["delta_vs_vanilla_spread"] = max(deltas) - min(deltas)
        row["seeds"] = len(runs)
        rows.append(row)
    return rows


def format_table(rows: list[dict], scope: str) -> str:
    header = (f"{'budget':>8} {'model':<26}{'unique params':>14}{'FLOPs/token':>13}{'steps':>7}{'tokens':>11}"
              f"{'epochs':>8}{'val NLL top-k':>19}{'val NLL causal':>19}{'top-k - vanilla':>20}")
    lines = [f"isoFLOP table (FLOPs scope: {scope}; NLL: mean +- spread (max - min) over seeds; the last column "
             "pairs each seed with vanilla's)", header]
    for r in rows:
        name = r["model"] + (" (equal tokens)" if r["equal_tokens"] else "")
        lines.append(f"{r['budget']:>8.1e} {name:<26}{r['unique_params']:>14,}{r['flops_per_token']:>13.3g}"
                     f"{r['steps']:>7}{r['tokens']:>11,}{r['epochs']:>8.2f}"
                     f"{r['val_loss']:>12.4f} +-{r['val_loss_spread']:.4f}"
                     f"{r['val_loss_causal']:>12.4f} +-{r['val_loss_causal_spread']:.4f}"
                     f"{r['delta_vs_vanilla']:>+13.4f} +-{r['delta_vs_vanilla_spread']:.4f}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, scope: str) -> None:
    """Validation loss against training FLOPs, one line per model (seed means), one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in results})
    figure, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for axis, budget in zip(axes[0], budgets, strict=True):
        for model in MODELS:
            for equal_tokens in (False, True):
                runs = [r for r in results if r["budget"] == budget and r["model"] == model
                        and r["equal_tokens"] == equal_tokens]
                if not runs:
                    continue
                points = len(min((r["curve"] for r in runs), key=len))
                xs = [runs[0]["curve"][i][0] for i in range(points)]
                ys = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(points)]
                axis.plot(xs, ys, marker="o", markersize=3, linestyle="--" if equal_tokens else "-",
                          label=model + (" (equal tokens)" if equal_tokens else ""))
        axis.set_title(f"budget {budget:.1e} FLOPs ({scope} scope)")
        axis.set_xlabel("training FLOPs")
        axis.set_ylabel("validation NLL (top-k routing)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _create_experiment(args: argparse.Namespace) -> None:
    """Create the store and the experiment before runs start side by side (two jobs creating one sqlite
    schema at once collide)."""
    from mlflow.tracking import MlflowClient

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(args.tracking_uri)
    if client.get_experiment_by_name(args.experiment) is None:
        client.create_experiment(args.experiment)


def log_summary(args: argparse.Namespace, table: str, rows: list[dict], png: Path) -> str:
    """A summary run in the experiment holding the table (text and JSON) and the plot; returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    # A rerun (more seeds, a finished experiment re-tabled) updates the summary instead of adding one.
    earlier = client.search_runs([experiment.experiment_id], "tags.`mor.isoflop` = 'summary'")
    run = earlier[0] if earlier else client.create_run(experiment.experiment_id, run_name="isoflop-summary",
                                                       tags={"mor.isoflop": "summary"})
    client.log_text(run.info.run_id, table, "isoflop/table.txt")
    client.log_dict(run.info.run_id, rows, "isoflop/table.json")
    client.log_artifact(run.info.run_id, str(png), "isoflop")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mor-bench isoflop", description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[2e12, 5e12],
                        help="FLOPs budgets (in --flops-scope)")
    parser.add_argument("--base", default="tiny", help="base shape of the presets (<base>-vanilla, ...)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="variants of the base shape (vanilla is always the reference)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--evaluations", type=int, default=8, help="evaluations per run (curve points)")
    parser.add_argument("--eval-steps", type=int, default=8, help="validation batches per evaluation")
    parser.add_argument("--flops-scope", choices=["paper", "training"], default="paper",
                        help="paper: forward-only, no LM head (the paper's budgets); training: 3 x forward with "
                             "the LM head")
    parser.add_argument("--data-prefix", help="a mor-data preprocess prefix (default: the embedded corpus)")
    parser.add_argument("--tokenizer", help="its tokenizer (with --data-prefix)")
    parser.add_argument("--output-dir", default="runs/isoflop")
    parser.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///<output-dir>/mlflow.db)")
    parser.add_argument("--experiment", default="mor_isoflop")
    parser.add_argument("--parallel-runs", type=int, default=os.cpu_count() or 1,
                        help="runs trained at the same time (one process each)")
    parser.add_argument("--threads-per-run", type=int, default=1)
    parser.add_argument("--run-timeout-s", type=float, default=3600)
    parser.add_argument("--dry-run", action="store_true", help="print the plan (runs, steps, tokens) and exit")
    args = parser.parse_args(argv)
    if bool(args.data_prefix) != bool(args.tokenizer):
        parser.error("--data-prefix and --tokenizer go together")
    if "vanilla" not in args.models:
        parser.error("--models must include vanilla (the reference and the equal-tokens step count)")
    args.output_dir = str(Path(args.output_dir).resolve())
    args.tracking_uri = args.tracking_uri or f"sqlite:///{args.output_dir}/mlflow.db"
    try:
        runs = plan(args)
    except ValueError as err:  # ConfigError too: an unknown base
        print(f"mor-bench isoflop: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for spec in runs:
            print(f"{spec.name:<40} steps {spec.steps:>6}  tokens {spec.steps * args.global_batch_size * args.seq_length:>10,}")
        return 0
    data = prepare_data(args)
    split_tokens = training_split_tokens(data[0])
    _create_experiment(args)
    with ThreadPoolExecutor(max_workers=args.parallel_runs) as pool:
        outputs = list(pool.map(lambda spec: run_one(args, spec, data), runs))
    results = [collect(args, spec, output, split_tokens) for spec, output in zip(runs, outputs, strict=True)]
    rows = summarize(results)
    table = format_table(rows, args.flops_scope)
    out = Path(args.output_dir)
    (out / "isoflop_table.txt").write_text(table + "\n")
    (out / "isoflop_results.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=1))
    png = out / "isoflop_val_loss.png"
    plot(results, png, args.flops_scope)
    run_id = log_summary(args, table, rows, png)
    print(table)
    print(f"plot: {png}\nMLflow: experiment {args.experiment!r} at {args.tracking_uri}, summary run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
