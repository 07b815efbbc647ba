"""The `es-mpi` command line (click). Thin: options -> Config -> es_mpi.commands."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

import click

from es_mpi import __version__
from es_mpi.config import FIELDS, Config, check_settings, load_toml
from es_mpi.errors import EsError

_TYPES = {"int": int, "float": float, "str": str}


class ConfigOption(click.Option):
    """A flag made from a Config field by config_options; `config_field` names the field."""

    def __init__(self, *decls, config_field: str, **kw):
        super().__init__(*decls, **kw)
        self.config_field = config_field


def _known(name: str) -> str:
    """The names a setting takes, where the help should list them (the built-in tasks)."""
    if name != "task":
        return ""
    from tasks import TASKS

    return f" Built-in tasks: {', '.join(sorted(TASKS))}."


def config_options(*names: str, flags: dict[str, str] | None = None,
                   shown: str = "{default}") -> Callable[[Callable], Callable]:
    """A decorator: one --flag per Config field (`names`; every field when none are given),
    its help, type, choices and default from the field (es_mpi.config.Config).

    Every flag's default is None, so a flag given overrides the value from elsewhere (a
    TOML file, a preset, a run file) and one not given leaves it there, or at Config's
    default; the command checks the values it got through Config (config.check_settings),
    so a bad one gives Config's error line, whichever command it came through.
    `flags`: a flag name other than the field's (bench's --prompts is batch_size).
    `shown`: the default as the help states it; {default} is Config's default (eval's
    "the run's, or {default}": a run file's value comes first).
    """
    fields = [FIELDS[n] for n in names] if names else list(FIELDS.values())
    renamed = flags or {}

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields):
            flag = renamed.get(f.name, "--" + f.name.replace("_", "-"))
            default = shown.format(default=f.default if f.default != "" else "none")
            given = "required: here or in --config" if f.metadata.get("required") else \
                f"default: {default}"
            kw = {"cls": ConfigOption, "config_field": f.name, "default": None,
                  "help": f"{f.metadata['help']}{_known(f.name)} [{given}]"}
            if f.type == "bool":
                opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, **kw)
            elif f.metadata.get("choices"):
                opt = click.option(flag, f.name, type=click.Choice(f.metadata["choices"]),
                                   **kw)
            else:
                metavar = {"model": "DIR", "run": "RUN.h5", "task_data": "PATH",
                           "reward": "MODULE:FN"}.get(f.name)
                opt = click.option(flag, f.name, type=_TYPES[f.type], metavar=metavar, **kw)
            fn = opt(fn)
        return fn

    return decorate


def _given(values: dict) -> dict:
    """The settings flags that were given (config_options' flags default to None)."""
    return {k: v for k, v in values.items() if v is not None}


def _run(body: Callable) -> None:
    """Run a command body on this rank: one error line from rank 0 and exit 2 on bad input."""
    from es_mpi.dist import Dist, run_guarded

    try:
        dist = Dist()
    except EsError as exc:
        click.echo(f"es-mpi: error: {_one_line(exc)}", err=True)
        sys.exit(2)
    from es_mpi.stop import EXIT_STOPPED, Stopped

    try:
        run_guarded(dist, lambda: body(dist))
    except EsError as exc:
        abort = getattr(exc, "abort_job", False)
        if dist.is_root or abort:
            click.echo(f"es-mpi: error: {_one_line(exc)}", err=True)
        if abort:
            dist.abort(2)  # raised on some ranks alone (a failed write): nobody else knows
        sys.exit(2)
    except Stopped:
        sys.exit(EXIT_STOPPED)


def verbosity_options(fn: Callable) -> Callable:
    """--quiet / --verbose: how much rank 0 prints while training."""
    fn = click.option("-v", "--verbose", is_flag=True,
                      help="Also print each generation's phase timings and per-rank "
                           "evaluation times.")(fn)
    return click.option("-q", "--quiet", is_flag=True,
                        help="Print only errors and the final summary.")(fn)


def _configure_progress(dist, quiet: bool, verbose: bool) -> None:
    from es_mpi import progress

    if quiet and verbose:
        raise EsError("--quiet and --verbose: choose one")
    progress.configure(progress.QUIET if quiet else progress.VERBOSE if verbose
                       else progress.NORMAL, root=dist.is_root)


def _presets_epilog() -> str:
    from es_mpi import presets

    return ("Presets (--preset NAME; shipped TOML files in es_mpi/presets/; --config and "
            "flags override them; give --model DIR):\n\n\b\n" + presets.help_text())


# line breaks other than \n (str.splitlines splits on them too), shown escaped
_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def _one_line(text: object) -> str:
    """An error message on one line (paths or library messages may hold line breaks)."""
    return re.sub(r"\s*\n\s*", " ", str(text).strip()).translate(_BREAKS)


def _launcher_rank() -> int:
    """This process's MPI rank from the launcher's environment (0 when run alone)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _Cli(click.Group):
    """click's usage errors (unknown flag, bad value, missing argument) as one line,
    `es-mpi: error: ...` and exit 2, printed by rank 0 only, like every other bad input."""

    def main(self, *args, standalone_mode: bool = True, **kw):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kw)
        try:
            code = super().main(*args, standalone_mode=False, **kw)
        except click.ClickException as exc:
            if _launcher_rank() == 0:
                ctx = getattr(exc, "ctx", None)
                hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
                click.echo(f"es-mpi: error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Cli,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="es-mpi")
def cli() -> None:
    """Fine-tune language models with Evolution Strategies on MPI.

    Run under `mpiexec -n K` (or srun) for K ranks, each with a full model replica,
    or alone for one rank. Only rank 0 prints and writes the run file.
    """


@cli.command(epilog=_presets_epilog())
@click.option("--preset", metavar="NAME", default=None,
              help="Start from a shipped preset (listed below), e.g. countdown.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of settings (keys as the flags below, with _ or -); "
                   "flags given here override it.")
@verbosity_options
@config_options()
def train(preset: str | None, config_file: str | None, quiet: bool, verbose: bool,
          **flags) -> None:
    """Run ES on a model and task, writing every generation to a run file.

    If the run file exists and was made with the same settings (those that shape the
    weights), the run continues from it; otherwise it is left untouched and this fails.
    """
    def body(dist):
        from es_mpi import commands, presets

        _configure_progress(dist, quiet, verbose)
        values = presets.load(preset) if preset else {}
        values.update(load_toml(config_file) if config_file else {})
        values.update({k: v for k, v in flags.items() if v is not None})
        commands.train(Config.from_dict(values), dist)

    _run(body)


@cli.command()
@click.argument("run_file", metavar="RUN.h5")
@config_options("generations", shown="the run's target")
@click.option("--model", metavar="DIR", default=None,
              help="Base model directory, if it moved since the run started "
                   "(its weights must match the run's fingerprint).")
@verbosity_options
def resume(run_file: str, generations: int | None, model: str | None, quiet: bool,
           verbose: bool) -> None:
    """Continue a run: base model + latest checkpoint + replay of the logged generations.

    The weights are bit-identical to an uninterrupted run on the same hardware, whatever
    the number of ranks before and after.
    """
    def body(dist):
        from es_mpi import commands

        _configure_progress(dist, quiet, verbose)
        check_settings(_given({"generations": generations}))
        commands.resume(run_file, generations, model, dist)

    _run(body)


@cli.command()
@click.argument("run_file", metavar="RUN.h5")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--generation", type=int, default=None,
              help="Export the weights after this many generations (0 = the base model) "
                   "[default: the last complete one].")
@click.option("--model", metavar="DIR", default=None,
              help="Base model directory, if it moved since the run started.")
@click.option("--gpus-per-rank", type=int, default=None,
              help="GPUs to lay the model over while rebuilding it [default: as many as "
                   "the run's ranks had].")
def export(run_file: str, out_dir: str, generation: int | None, model: str | None,
           gpus_per_rank: int | None) -> None:
    """Write one generation's weights as a Hugging Face directory (safetensors + tokenizer)."""
    def body(dist):
        from es_mpi import commands

        commands.export(run_file, out_dir, generation, model, dist, gpus_per_rank)

    _run(body)


# eval's settings: Config's fields, a run file's value unless given (--batch-size: the
# held-out evaluation's prompts per generate call)
EVAL_FIELDS = ("task", "task_data", "reward", "max_new_tokens", "eval_batch_size", "dtype",
               "prompt_format")


@cli.command(name="eval")
@click.argument("target", metavar="MODEL_DIR|RUN.h5[@G]")
@click.option("--limit", type=int, default=0, show_default=True,
              help="Score at most N held-out examples (0 = all).")
@config_options(*EVAL_FIELDS, flags={"eval_batch_size": "--batch-size"},
                shown="the run's, or {default}")
@click.option("--model", metavar="DIR", default=None,
              help="Base model directory of a run file, if it moved since the run started.")
@click.option("--samples", type=int, default=0, show_default=True,
              help="Also draw K samples per example (seeded) and report pass@K and their "
                   "mean reward next to greedy (0 = greedy only).")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Sampling temperature for --samples (plain sampling: no top-k/top-p).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the samples; the same seed gives the same samples on any number "
                   "of ranks.")
@click.option("--kl/--no-kl", default=True, show_default=True,
              help="Also measure the per-token KL to the base model along the greedy "
                   "completions (a run file's base model, or --base); loads a second copy "
                   "of the model.")
@click.option("--base", metavar="DIR", default=None,
              help="Base model to measure KL against when TARGET is a model directory "
                   "(e.g. the model an RL baseline started from).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def eval_command(target: str, limit, model, samples, temperature, seed, kl, base, as_json,
                 **settings) -> None:
    """Score a model dir, or generation G of a run file, on the task's held-out examples.

    Greedy decoding (whatever the model's generation config says), batched, the examples
    shared out across the MPI ranks. Prints the mean reward and, for tasks with a notion of
    solved, the accuracy; with --samples K also the mean reward and pass@K of K seeded
    samples per example. The settings flags (--task ... --prompt-format) are train's, with
    its checks; those not given are the run file's (for a model dir: train's defaults).
    """
    def body(dist):
        import math

        from es_mpi import commands
        from es_mpi.config import MAX_SEED

        overrides = _given(settings)
        check_settings(overrides)  # each value by Config's rules, before anything loads
        if limit < 0:
            raise EsError(f"--limit {limit}: must be >= 0")
        if not 0 <= samples <= 10_000:
            raise EsError(f"--samples {samples}: must be in 0..10000 (0 = greedy only)")
        if not (math.isfinite(temperature) and 0 < temperature <= 100):
            raise EsError(f"--temperature {temperature}: must be in (0, 100]")
        if not 0 <= seed <= MAX_SEED:
            raise EsError(f"--seed {seed}: must be in 0..{MAX_SEED}")
        if model is not None:
            overrides["model"] = model
        commands.evaluate_target(target, overrides, limit, as_json, dist, samples,
                                 temperature, seed, kl, base)

    _run(body)


@cli.command()
@click.argument("run_file", metavar="RUN.h5")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def inspect(run_file: str, as_json: bool) -> None:
    """Summarize a run file: config, model, progress, checkpoints, last rewards."""
    def body(dist):
        from es_mpi import commands

        commands.inspect(run_file, as_json, dist)

    _run(body)


@cli.command()
@click.argument("run_files", metavar="RUN.h5 [RUN2.h5 ...]", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", metavar="DIR", default=None,
              help="Directory for the PNGs and summary.md [default: RUN_report/ beside the "
                   "first run file].")
def report(run_files: tuple[str, ...], out_dir: str | None) -> None:
    """Plot run files (PNG) and summarize them (summary.md).

    Plots the population reward per generation (mean, std, min-max), the held-out score,
    the time per generation by phase and each rank's evaluation time (load balance).
    Several run files are overlaid, labelled by the settings that differ between them;
    runs that differ only by seed are drawn as their mean with the spread across seeds.
    """
    def body(dist):
        from pathlib import Path

        from es_mpi.tooling.report import write_report

        if not dist.is_root:
            return
        first = Path(run_files[0])
        out = Path(out_dir) if out_dir else first.with_name(f"{first.stem}_report")
        done = write_report(list(run_files), out)
        top = [f.name for f in done.files if f.parent == out]
        more = f", and each run's plots in {len(run_files)} subdirectories" \
            if len(run_files) > 1 else ""
        click.echo(f"es-mpi: report in {out}/: {', '.join(top)}{more}")

    _run(body)


# bench's settings: Config's fields, with train's defaults and checks (--prompts is
# train's --batch-size: training prompts per generation, 0 = all of the task's)
BENCH_FIELDS = ("task", "task_data", "population", "batch_size", "max_new_tokens", "sigma",
                "lr", "rank", "antithetic", "dtype", "generate_batch", "master",
                "member_batch")


@cli.command()
@click.option("--model", metavar="DIR", required=True, help="Hugging Face model directory.")
@config_options(*BENCH_FIELDS, flags={"batch_size": "--prompts"})
@click.option("--threads", type=int, default=0,
              help="Torch threads per mode [default: all cores available].")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="Interleaved rounds of every mode in one process, for the times and "
                   "ratios (medians, with min-max); 0 = each mode's single run alone.")
@click.option("--scaling", is_flag=True,
              help="Also measure strong and weak scaling: real `mpiexec -n 1` and `-n 2` "
                   "training runs (one thread per rank) in full and lowrank mode at these "
                   "settings; prints speedup and parallel efficiency (es_mpi.tooling.scaling).")
@click.option("--modes", default=",".join(("inference", "lowrank", "full", "paper")),
              show_default=True, help="Comma-separated modes to measure.")
@click.option("--json", "json_out", metavar="FILE", default=None,
              help="Write the full report (seconds, phases, memory, ratios) as JSON.")
@click.option("--timeout", type=float, default=0, show_default=True, metavar="SECONDS",
              help="Seconds the per-mode processes may take in all (0 = no limit); the one "
                   "running when they are spent is killed and bench stops with an error. "
                   "--scaling's runs are not bounded by it.")
@click.option("--checkpoint/--no-checkpoint", default=True, show_default=True,
              help="Also time writing a checkpoint of the fp32 master after each mode's "
                   "single run (at 7B about 30 GB of compressed HDF5: minutes).")
def bench(model, threads, repeat, scaling, modes, json_out, timeout, checkpoint,
          **settings) -> None:
    """Time one ES generation per mode against pure batched inference of the same sequences.

    Each mode runs alone in a fresh single process (one rank), for its memory: inference
    (the N x P sequences in one generate), lowrank, full, and paper (the paper scripts'
    loop, the baseline). Then --repeat interleaved rounds of every mode in one process
    give the times and ratios (median, min-max). Prints a table of seconds, tokens/s,
    ratios, phase split and peak memory per rank.

    The settings flags are train's, with its defaults and checks (--prompts is train's
    --batch-size). --antithetic is off unless given, as in train (before, bench paired
    members by default); pairs apply to the lowrank and full modes, not the paper loop,
    and cost full mode one noise per pair instead of two.
    """
    import json
    import os

    from es_mpi.model import check_model_dir
    from es_mpi.tooling.bench import MODES, table
    from es_mpi.tooling.bench import bench as run_bench

    try:
        # every setting by train's rules first, as train checks them before its model
        cfg = check_settings({"model": model, **_given(settings)})
        check_model_dir(model)
        chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
        unknown = [m for m in chosen if m not in MODES]
        if unknown or not chosen:
            raise EsError(f"--modes: unknown mode(s) {', '.join(unknown) or '(none)'}; "
                          f"choose from {', '.join(MODES)}")
        for name, value in (("repeat", repeat), ("timeout", timeout)):
            if value < 0:
                raise EsError(f"--{name} {value:g}: must be >= 0")
        opts = {"model": os.path.abspath(model), "task": cfg.task,
                "task_data": os.path.abspath(cfg.task_data) if cfg.task_data else "",
                "population": cfg.population, "prompts": cfg.batch_size,
                "max_new_tokens": cfg.max_new_tokens, "sigma": cfg.sigma, "lr": cfg.lr,
                "rank": cfg.rank, "antithetic": cfg.antithetic, "dtype": cfg.dtype,
                "generate_batch": cfg.generate_batch, "master": cfg.master,
                "member_batch": cfg.member_batch, "checkpoint": checkpoint,
                "threads": threads or len(os.sched_getaffinity(0))}
        echo = lambda m: click.echo(m, err=True)  # noqa: E731
        report = run_bench(opts, chosen, echo=echo, repeat=repeat, timeout=timeout)
        if scaling:
            from es_mpi.tooling.bench import scaling_report

            report["scaling"] = scaling_report(opts, max(repeat, 1), echo)
    except EsError as exc:
        click.echo(f"es-mpi: error: {_one_line(exc)}", err=True)
        sys.exit(2)
    click.echo(table(report))
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(report, fh, indent=2)
        click.echo(f"wrote {json_out}")


# plan's settings: Config's fields that the memory depends on, with train's defaults and
# checks (es_mpi.tooling.plan.CONFIG_FIELDS, not imported here: it imports torch)
PLAN_FIELDS = ("mode", "dtype", "master", "decay_to", "credit", "population", "member_batch",
               "rank", "antithetic", "max_new_tokens", "generate_batch", "eval_kl")


@cli.command(name="plan")
@click.option("--model", metavar="DIR|CONFIG.json|NAME", required=True,
              help="A Hugging Face model directory, its config.json, or a shipped config: "
                   "qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b, llama-3.1-8b "
                   "(the -instruct models). Only the config is read, never weights.")
@config_options(*PLAN_FIELDS)
@click.option("--prompts", type=int, default=16, show_default=True,
              help="Training prompts per generation (es-mpi train --batch-size, or the "
                   "task's training set when that is 0).")
@click.option("--prompt-tokens", type=int, default=128, show_default=True,
              help="Tokens of the longest prompt (the batch is padded to it).")
@click.option("--eval-batch-size", type=int, default=0, show_default=True,
              help="Held-out prompts per generate call, as es-mpi train --eval-batch-size, "
                   "when the run evaluates held-out examples (--eval-every > 0); 0 = none.")
@click.option("--eval-prompt-tokens", type=int, default=0, show_default=True,
              help="Tokens of the longest held-out prompt (0 = as --prompt-tokens).")
@click.option("--gpu-memory", default="80GB", show_default=True, metavar="SIZE",
              help="Memory of one GPU, with its unit: 80GB, 141GB (10^9 bytes), 80GiB or "
                   "80G (2^30), 512MiB ...")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda",
              show_default=True, help="Plan a GPU rank, or a CPU rank (everything in RAM).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with every term in bytes.")
def plan_command(model, prompts, prompt_tokens, eval_batch_size, eval_prompt_tokens,
                 gpu_memory, device, as_json, **settings) -> None:
    """Estimate the memory one rank needs, before anything loads.

    Bytes per rank for the weights, the KL base model, the fp32 master, the decay
    anchor, noise buffers, lowrank factors, the KV cache and the activations of generate
    and, on a GPU, the caching allocator's reserve, on the device and on the host, from
    the model's config alone; then whether it fits in --gpu-memory and, if not, what to
    change. Estimates calibrated against peaks measured on the CPU; the GPU's allocator
    reserve and CUDA context are assumed. The settings flags (--mode ... --eval-kl) are
    es-mpi train's, with its defaults and checks; --dtype auto is bfloat16 on a GPU rank,
    float32 with --device cpu.
    """
    import json

    from es_mpi.tooling import plan as planner

    try:
        settings = planner.Settings(
            **_given(settings), prompts=prompts, prompt_tokens=prompt_tokens,
            eval_batch_size=eval_batch_size, eval_prompt_tokens=eval_prompt_tokens,
            gpu_memory=planner.parse_size(gpu_memory, "--gpu-memory"), device=device)
        planner.resolve(model)  # a bad name fails here, before transformers is imported
        shape = planner.shape_of(model)
        result = planner.plan(shape, settings)
        tips = planner.suggestions(shape, result)
    except EsError as exc:
        click.echo(f"es-mpi: error: {_one_line(exc)}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "suggestions": tips}))
    else:
        click.echo(planner.report(shape, result))


class _ClosedPipeSafe:
    """stdout that outlives its reader: once the pipe's reader has gone (`es-mpi inspect
    RUN | head -2`, or a training run piped into head), the rest of the output goes to
    /dev/null instead of ending the command with BrokenPipeError. A run goes on to its
    end; nothing it prints can stop it."""

    def __init__(self, stream):
        self._stream = stream

    def _to_devnull(self) -> None:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # later writes, ours or C code's, land there
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return self._stream.write(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main() -> None:
    if not isinstance(sys.stdout, _ClosedPipeSafe) and hasattr(sys.stdout, "fileno"):
        sys.stdout = _ClosedPipeSafe(sys.stdout)
    cli()


if __name__ == "__main__":
    main()
