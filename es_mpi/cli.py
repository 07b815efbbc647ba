"""The `es-mpi` command line (click). Thin: options -> Config -> es_mpi.commands."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import click

from es_mpi import __version__
from es_mpi.config import Config, load_toml
from es_mpi.errors import EsError

_TYPES = {"int": int, "float": float, "str": str}


def config_options(fn: Callable) -> Callable:
    """One --flag per Config field, help and choices from the field's metadata.

    Every default is None here, so a flag overrides the TOML file only when given.
    """
    for f in reversed(dataclasses.fields(Config)):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f"{f.metadata['help']} [default: {default if default != '' else 'none'}]"
        if f.type == "bool":
            opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
        elif f.metadata.get("choices"):
            opt = click.option(flag, f.name, type=click.Choice(f.metadata["choices"]),
                               default=None, help=help_text)
        else:
            metavar = {"model": "DIR", "run": "RUN.h5"}.get(f.name)
            opt = click.option(flag, f.name, type=_TYPES[f.type], default=None,
                               help=help_text, metavar=metavar)
        fn = opt(fn)
    return fn


def _run(body: Callable) -> None:
    """Run a command body on this rank: one error line from rank 0 and exit 2 on bad input."""
    from es_mpi.dist import Dist, run_guarded

    try:
        dist = Dist()
    except EsError as exc:
        click.echo(f"es-mpi: error: {exc}", err=True)
        sys.exit(2)
    from es_mpi.stop import EXIT_STOPPED, Stopped

    try:
        run_guarded(dist, lambda: body(dist))
    except EsError as exc:
        if dist.is_root:
            click.echo(f"es-mpi: error: {exc}", err=True)
        sys.exit(2)
    except Stopped:
        sys.exit(EXIT_STOPPED)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="es-mpi")
def cli() -> None:
    """Fine-tune language models with Evolution Strategies on MPI.

    Run under `mpiexec -n K` (or srun) for K ranks, each with a full model replica,
    or alone for one rank. Only rank 0 prints and writes the run file.
    """


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of settings (keys as the flags below, with _ or -); "
                   "flags given here override it.")
@config_options
def train(config_file: str | None, **flags) -> None:
    """Run ES on a model and task, writing every generation to a run file.

    If the run file exists and was made with the same settings (those that shape the
    weights), the run continues from it; otherwise it is left untouched and this fails.
    """
    def body(dist):
        from es_mpi import commands

        values = load_toml(config_file) if config_file else {}
        values.update({k: v for k, v in flags.items() if v is not None})
        commands.train(Config.from_dict(values), dist)

    _run(body)


@cli.command()
@click.argument("run_file", metavar="RUN.h5")
@click.option("--generations", type=int, default=None,
              help="Continue until this many generations in total [default: the run's target].")
@click.option("--model", metavar="DIR", default=None,
              help="Base model directory, if it moved since the run started "
                   "(its weights must match the run's fingerprint).")
def resume(run_file: str, generations: int | None, model: str | None) -> None:
    """Continue a run: base model + latest checkpoint + replay of the logged generations.

    The weights are bit-identical to an uninterrupted run on the same hardware, whatever
    the number of ranks before and after.
    """
    def body(dist):
        from es_mpi import commands

        if generations is not None and generations < 1:
            raise EsError(f"--generations {generations}: must be >= 1")
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
def export(run_file: str, out_dir: str, generation: int | None, model: str | None) -> None:
    """Write one generation's weights as a Hugging Face directory (safetensors + tokenizer)."""
    def body(dist):
        from es_mpi import commands

        commands.export(run_file, out_dir, generation, model, dist)

    _run(body)


@cli.command(name="eval")
@click.argument("target", metavar="MODEL_DIR|RUN.h5[@G]")
@click.option("--task", default=None,
              help="Task to score (default: the run's task, or conciseness for a model dir).")
@click.option("--task-data", default=None, metavar="PATH",
              help="JSON/JSONL file of examples for the task.")
@click.option("--reward", default=None, metavar="MODULE:FN",
              help="Reward function for --task jsonl:PATH.")
@click.option("--limit", type=int, default=0, show_default=True,
              help="Score at most N held-out examples (0 = all).")
@click.option("--max-new-tokens", type=int, default=None,
              help="Tokens generated per prompt [default: the run's, or 64].")
@click.option("--batch-size", type=int, default=None,
              help="Prompts per generate call [default: 16].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default=None, help="Replica dtype [default: the run's, or auto].")
@click.option("--model", metavar="DIR", default=None,
              help="Base model directory of a run file, if it moved since the run started.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def eval_command(target: str, task, task_data, reward, limit, max_new_tokens, batch_size, dtype,
                 model, as_json) -> None:
    """Score a model dir, or generation G of a run file, on the task's held-out examples.

    Greedy decoding, batched, the examples shared out across the MPI ranks. Prints the mean
    reward and, for tasks with a notion of solved, the accuracy.
    """
    def body(dist):
        from es_mpi import commands

        if limit < 0:
            raise EsError(f"--limit {limit}: must be >= 0")
        overrides = {"task": task, "task_data": task_data, "reward": reward,
                     "max_new_tokens": max_new_tokens, "eval_batch_size": batch_size,
                     "dtype": dtype, "model": model}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        commands.evaluate_target(target, overrides, limit, as_json, dist)

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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
