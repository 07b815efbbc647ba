"""What each CLI command does, on every rank. Cheap checks first, then the model."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from es_mpi import devices, lowrank, progress, runfile, summary, tracking
from es_mpi import model as hf
from es_mpi.config import Config
from es_mpi.dist import Dist, set_threads
from es_mpi.errors import EsError
from es_mpi.evaluators import member_groups
from es_mpi.heldout import eval_examples, evaluate
from es_mpi.loop import train_loop
from es_mpi.noise import derive_seed
from es_mpi.replay import rebuild
from es_mpi.session import (
    check_task,
    decide_batches,
    examples_fingerprint,
    kl_base_model,
    n_prompts,
    open_session,
)
from es_mpi.stop import Stopped
from tasks import Task


def _existing_run(cfg: Config) -> runfile.RunInfo | None:
    """Rank 0: None for a new run file, or the info of one this config may continue."""
    path = Path(cfg.run)
    if not path.exists():
        runfile.check_writable(path)
        return None
    runfile.check_unlocked(path)  # first: a file that a run is writing may not read cleanly
    info = runfile.read_info(path)
    diffs = _auto_as_recorded(cfg, info).trajectory_differences(info.config)
    if diffs:
        detail = "; ".join(f"{d}: {getattr(info.config, d)!r} in the file, "
                           f"{getattr(cfg, d)!r} now" for d in diffs)
        raise EsError(f"run file {path} exists and was made with another config ({detail}); "
                      f"pass another --run path, or continue it with: es-mpi resume {path}")
    if not os.access(path, os.W_OK):
        raise EsError(f"run file {path} is not writable")
    return info


def _auto_as_recorded(cfg: Config, info: runfile.RunInfo) -> Config:
    """member_batch 0 (auto) means the value the run file recorded when it started."""
    if cfg.member_batch == 0:
        return cfg.replace(member_batch=info.config.member_batch)
    return cfg


def _prechecks(cfg: Config) -> tuple[Task, list]:
    """Cheap checks on every rank before any model is loaded: (task, training examples)."""
    hf.check_model_dir(cfg.model)
    _check_context(cfg)
    if cfg.prompt_format == "chat" and not hf.has_chat_template(cfg.model):
        raise EsError(f"--prompt-format chat: model {cfg.model} has no chat template "
                      "(none in tokenizer_config.json or chat_template.jinja); use "
                      "--prompt-format raw, or auto (chat where there is a template)")
    if cfg.mode == "lowrank":
        lowrank.check_layout(cfg.model)
    tracking.check(cfg.tensorboard)
    return check_task(cfg)


def _check_context(cfg: Config) -> None:
    """Completions must fit the model's context window (from config.json, before loading)."""
    config = json.loads((Path(cfg.model) / "config.json").read_text())
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    limit = next((config[k] for k in ("max_position_embeddings", "n_positions")
                  if isinstance(config.get(k), int)), None)
    if limit is not None and cfg.max_new_tokens >= limit:
        raise EsError(f"max_new_tokens {cfg.max_new_tokens} does not fit the context of model "
                      f"{cfg.model} ({limit} positions, prompt included); use fewer new tokens")


def _absolute(path: str) -> str:
    """A path setting made absolute; "" (not set) stays ""."""
    return str(Path(path).resolve()) if path else ""


def train(cfg: Config, dist: Dist) -> None:
    """Start a run, or continue the one in cfg.run if it was made with the same config."""
    task, train_examples = dist.collective(lambda: _prechecks(cfg))
    # absolute paths: resume and export may run from another directory
    cfg = cfg.replace(model=_absolute(cfg.model), task_data=_absolute(cfg.task_data),
                      tensorboard=_absolute(cfg.tensorboard))
    info = dist.bcast(dist.root_first(lambda: _existing_run(cfg)))
    if info is not None:
        _continue(_auto_as_recorded(cfg, info), info, task, train_examples, dist)
        return
    set_threads(dist)
    s = _open(cfg, dist, task, train_examples, None)
    cfg = s.cfg  # member_batch and generate_batch decided
    _measure_rounding(cfg, s)

    def create():
        writer = runfile.RunWriter.create(
            cfg.run, cfg, cfg.model, s.fingerprint, examples_fingerprint(train_examples),
            n_prompts(cfg, train_examples))
        writer.add_hardware(0, dist.size, s.machine)
        return writer

    writer = dist.root_first(create)
    show = progress.current(dist.is_root)
    show.info(f"es-mpi: {cfg.population} members x {n_prompts(cfg, train_examples)} prompts, "
              f"{dist.size} rank(s), task {cfg.task}, mode {_mode(cfg)}; run file {cfg.run}")
    _note_idle_ranks(cfg, dist, show)
    _note_rounding(cfg, s, show)
    _run_loop(cfg, dist, s, writer, 0, fresh=True)


def resume(path: str, generations: int | None, model: str | None, dist: Dist) -> None:
    """Continue the run in `path` until `generations` in total."""
    def check():
        if Path(path).is_file():
            runfile.check_unlocked(path)  # first: a file being written may not read cleanly
        return runfile.read_info(path)

    info = dist.bcast(dist.root_first(check))
    cfg = info.config.replace(run=str(path))
    if generations is not None:
        cfg = cfg.replace(generations=generations)
    if model is not None:
        cfg = cfg.replace(model=model)
    task, train_examples = dist.collective(lambda: _prechecks(cfg))
    _continue(cfg, info, task, train_examples, dist)


def _continue(cfg: Config, info: runfile.RunInfo, task: Task, train_examples: list,
              dist: Dist) -> None:
    done = info.complete_generations
    if done >= cfg.generations:
        dist.print0(f"es-mpi: run file {cfg.run} already has {done} generations "
                    f"(target {cfg.generations}); pass --generations to go further")
        return
    set_threads(dist)
    s = _open(cfg, dist, task, train_examples, info)
    cfg = s.cfg
    # every rank reads the file (and agrees) before rank 0 opens it for writing
    dist.collective(lambda: rebuild(s, cfg.run, info, done))
    _measure_rounding(cfg, s)  # on the weights the run goes on from

    def reopen():
        writer = runfile.RunWriter.open_append(cfg.run)
        writer.f.attrs["config"] = cfg.to_json()
        writer.add_hardware(done, dist.size, s.machine)
        return writer

    writer = dist.root_first(reopen)
    show = progress.current(dist.is_root)
    show.info(f"es-mpi: resuming {cfg.run} at generation {done} of {cfg.generations} "
              f"on {dist.size} rank(s)")
    if not devices.same_arithmetic(info.machine, s.machine):
        show.info(f"es-mpi: note: generations so far ran on {devices.label(info.machine)}, "
                  f"the next ones run on {devices.label(s.machine)}; they continue exactly "
                  "from the weights, but would round differently there")
    _note_idle_ranks(cfg, dist, show)
    _note_rounding(cfg, s, show)
    _run_loop(cfg, dist, s, writer, done, fresh=False)


def _open(cfg: Config, dist: Dist, task: Task, train_examples: list,
          info: runfile.RunInfo | None):
    """Every rank loads its replica (collective); all must compute on the same kind of
    machine. A run file's recorded replica dtype stands in for dtype auto."""
    recorded = info.machine.get("dtype") if info is not None and info.machine else None
    s = dist.collective(lambda: open_session(cfg, dist, task, train_examples, recorded))
    machines = dist.allgather(s.machine)
    devices.check_uniform(machines)  # the same list on every rank: all raise together
    decide_batches(s)
    return s


def _run_loop(cfg: Config, dist: Dist, s, writer: runfile.RunWriter | None, start: int,
              fresh: bool) -> None:
    s.stop.install()
    board = tracking.TensorBoard(cfg.tensorboard) if cfg.tensorboard and dist.is_root else None
    try:
        train_loop(s, writer, start, fresh, board)
    except Stopped as stopped:
        dist.print0(f"es-mpi: {stopped}; the run file has a checkpoint of generation "
                    f"{stopped.complete}. Continue with: es-mpi resume {cfg.run} "
                    "(or run the same command again)")
        raise
    finally:
        if writer is not None:
            writer.close()
        if board is not None:
            board.close()
    _print_done(cfg, dist)


def _note_idle_ranks(cfg: Config, dist: Dist, show) -> None:
    """Groups are dealt round-robin: fewer groups than ranks leaves ranks without work."""
    groups = len(member_groups(cfg))
    if groups < dist.size:
        spread = -(-cfg.population // dist.size)
        show.warn(f"es-mpi: note: {groups} group(s) of members for {dist.size} ranks: "
                  f"{dist.size - groups} rank(s) idle each generation; --member-batch "
                  f"{spread} gives every rank a group (smaller batches)")


ROUNDING_NOTE = 0.05  # a 16-bit replica losing more of a perturbation than this is told


def _measure_rounding(cfg: Config, s) -> None:
    """Full mode on a 16-bit replica: what the dtype rounds away of a member's
    perturbation (es_mpi.es.Replica.rounding_loss), recorded with the machine. Training
    only: eval, export and bench have no use for it."""
    if cfg.mode == "full" and s.machine["dtype"] != "float32":
        s.machine.update(s.replica.rounding_loss(derive_seed(cfg.seed, "rounding")))


def _note_rounding(cfg: Config, s, show) -> None:
    """One line where a 16-bit replica rounds away much of full mode's perturbation
    (measured on the real weights at start-up, es_mpi.es.Replica.rounding_loss, and
    recorded with the machine in the run file)."""
    unmoved = s.machine.get("unmoved")
    if unmoved is None or unmoved <= ROUNDING_NOTE:
        return
    credit = ("the update credits only what moved" if cfg.credit == "realized" else
              "--credit intended credits the noise anyway")
    show.warn(f"es-mpi: note: {s.machine['dtype']} replica: at sigma {cfg.sigma:g}, "
              f"{unmoved:.0%} of the weights round back and do not move under a member's "
              f"noise (cosine {s.machine['noise_cosine']:.3f} to the intended noise); "
              f"{credit}. A larger --sigma, --dtype float32 or --mode lowrank keeps more")


def _mode(cfg: Config) -> str:
    if cfg.mode == "lowrank":
        return f"lowrank (rank {cfg.rank}, {cfg.member_batch} members per batch)"
    return cfg.mode


def _print_done(cfg: Config, dist: Dist) -> None:
    """The final summary (also under --quiet): how the run went and what to do next."""
    if not dist.is_root:
        return
    try:
        line = summary.summary_line(cfg.run) + "\n"
    except EsError:  # the run is done and safe; its summary is a nicety
        line = "\n"
    me = command_name()
    print(f"es-mpi: done. {line}"
          f"  run file: {cfg.run}\n"
          f"  inspect: {me} inspect {cfg.run}\n"
          f"  report:  {me} report {cfg.run}      (plots, PNG)\n"
          f"  resume:  {me} resume {cfg.run} --generations {cfg.generations * 2}\n"
          f"  export:  {me} export {cfg.run} OUT_DIR", flush=True)


def command_name() -> str:
    """How to run es-mpi again from this shell, for the commands printed to copy: `es-mpi`
    where that is the one on PATH, else the path this one was started by (a venv that is
    not activated: `.venv/bin/es-mpi`), or `python -m es_mpi.cli`."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if started is None or started.suffix == ".py" or not started.is_file():
        return f"{sys.executable} -m es_mpi.cli"
    on_path = shutil.which("es-mpi")
    if on_path and Path(on_path).resolve() == started.resolve():
        return "es-mpi"
    return shlex.quote(str(started))


def export(path: str, out_dir: str, generation: int | None, model: str | None,
           dist: Dist, gpus_per_rank: int | None = None) -> None:
    """Rank 0 writes the weights of one generation as a Hugging Face directory, rebuilt on
    as many GPUs as the run's ranks had (a model that needed two needs them here too) or
    `gpus_per_rank`."""
    if not dist.is_root:
        return
    info = runfile.read_info(path)
    done = info.complete_generations
    generation = done if generation is None else generation
    if not 0 <= generation <= done:
        raise EsError(f"run file {path} has generations 0..{done}; cannot export {generation}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EsError(f"output directory {out} exists and is not empty; choose a new one")
    cfg = info.config.replace(model=model or info.config.model,
                              gpus_per_rank=gpus_per_rank or info.config.gpus_per_rank)
    task, train_examples = _prechecks(cfg)
    if not os.access(out.resolve().parent if not out.exists() else out, os.W_OK):
        raise EsError(f"cannot write {out}: parent directory not writable")
    set_threads(dist)
    s = _open(cfg, Dist.serial(), task, train_examples, info)
    rebuild(s, path, info, generation)
    s.model.save_pretrained(out)
    s.tokenizer.save_pretrained(out)
    (out / "es_mpi_export.json").write_text(json.dumps({
        "run_file": str(Path(path).resolve()), "generation": generation,
        "checksum": f"{s.replica.checksum():016x}", "base_model": info.model_path,
    }, indent=2) + "\n")
    _readable_as_any_file(out)
    print(f"es-mpi: wrote generation {generation} of {path} to {out}", flush=True)


def _readable_as_any_file(out: Path) -> None:
    """safetensors writes its files 0600, where every other file gets the umask's mode
    (0644 under the usual 022): an export on a shared cluster would be the owner's alone.
    Give every exported file the mode a new file gets here."""
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def evaluate_target(target: str, overrides: dict, limit: int, as_json: bool, dist: Dist,
                    samples: int = 0, temperature: float = 1.0, seed: int = 0,
                    kl: bool = True, base: str | None = None) -> None:
    """Score a model directory or a run file's generation (RUN.h5[@G]) on held-out examples:
    greedy, and with `samples` > 0 also K seeded samples per example (pass@K).

    `kl`: the greedy evaluation also measures the per-token KL to the base model
    (es_mpi.kl): `base`, or a run file's own base model; a model directory without
    `base` gets none."""
    path, at, gen_text = target.rpartition("@") if "@" in target else (target, "", "")
    info, generation = None, None
    if Path(path).is_file():
        info = dist.bcast(dist.root_first(lambda: runfile.read_info(path)))
        cfg = info.config.replace(**overrides)
        generation = info.complete_generations
        if at:
            if not gen_text.isdecimal() or int(gen_text) > generation:
                raise EsError(f"{target}: generation must be an integer in 0..{generation}")
            generation = int(gen_text)
    elif at:
        raise EsError(f"run file {path} does not exist")
    else:
        if "model" in overrides:
            raise EsError("--model applies to a run file; pass the model directory as TARGET")
        cfg = Config.from_dict({"model": target, **overrides})
    if base is not None:
        if not kl:
            raise EsError("--base gives the model to measure KL against; drop --no-kl")
        dist.collective(lambda: hf.check_model_dir(base))
    task, train_examples = dist.collective(lambda: _prechecks(cfg))
    examples = dist.collective(lambda: eval_examples(task, limit))
    set_threads(dist)
    s = _open(cfg, dist, task, train_examples, info)
    if info is not None:
        dist.collective(lambda: rebuild(s, path, info, generation))
    kl_to = base or (cfg.model if info is not None else None)
    base_model = dist.collective(lambda: kl_base_model(s, kl_to)) if kl and kl_to else None
    greedy = evaluate(s, examples, cfg.eval_batch_size, base_model=base_model)
    sampled = None
    if samples:
        sampled = evaluate(s, examples, cfg.eval_batch_size, samples, temperature, seed)
    what = f"{path}@{generation}" if info is not None else target
    if as_json:
        out = {"target": what, "task": cfg.task, "n_examples": greedy.n,
               "mean_reward": greedy.mean_reward, "accuracy": _number(greedy.accuracy),
               "max_new_tokens": cfg.max_new_tokens, "seconds": greedy.seconds,
               "rewards": greedy.rewards.tolist(), "completions": greedy.completions,
               "kl": _number(greedy.kl), "kl_base": kl_to if base_model is not None else None,
               "kls": None if greedy.kls is None else greedy.kls.tolist()}
        if sampled is not None:
            out["sampled"] = {"samples": samples, "temperature": temperature, "seed": seed,
                              "mean_reward": sampled.mean_reward,
                              f"pass_at_{samples}": _number(sampled.accuracy),
                              "seconds": sampled.seconds, "rewards": sampled.rewards.tolist(),
                              "completions": sampled.completions}
        dist.print0(json.dumps(out))
    else:
        dist.print0(f"eval {cfg.task} on {what}: greedy: {greedy.summary()} "
                    f"({cfg.max_new_tokens} new tokens, {greedy.seconds:.1f} s)")
        if sampled is not None:
            dist.print0(f"eval {cfg.task} on {what}: sampled (temperature {temperature:g}, "
                        f"seed {seed}): {sampled.summary()} ({sampled.seconds:.1f} s)")


def _number(value: float) -> float | None:
    return None if np.isnan(value) else value


DIAGNOSTIC_FIELDS = ("pair_disagree", "pair_gap", "distinct_rewards", "update_coef_norm")


def inspect_summary(path: str) -> dict:
    """Everything `es-mpi inspect` shows, as plain JSON-able data."""
    info = runfile.read_info(path)
    rows = runfile.read_generations(path)
    evals = runfile.read_evals(path)
    done = info.complete_generations
    last = [{"generation": g, "reward_mean": float(rows["reward_mean"][g]),
             "reward_min": float(rows["reward_min"][g]),
             "reward_max": float(rows["reward_max"][g]),
             **{k: _number(float(rows[k][g])) for k in DIAGNOSTIC_FIELDS if k in rows}}
            for g in range(max(0, done - 5), done)]
    return {
        "path": str(path),
        "file_bytes": os.path.getsize(path),
        "format_version": info.format_version,
        "es_mpi_version": info.es_mpi_version,
        "created": info.created,
        "model": {"path": info.model_path, "fingerprint": info.model_fingerprint},
        "task": info.config.task,
        "task_fingerprint": info.task_fingerprint,
        "config": json.loads(info.config.to_json()),
        "generations_complete": done,
        "generations_target": info.config.generations,
        "checkpoints": info.checkpoints,
        "hardware": info.hardware,
        "world_sizes": sorted({int(w) for w in rows["world_size"]}),
        "seconds_total": float(np.sum(rows["time_total"])),
        "last_generations": last,
        "evals": [{"generation": int(g), "mean_reward": float(m),
                   "accuracy": None if np.isnan(a) else float(a), "n_examples": int(n),
                   "kl": None if np.isnan(kl) else float(kl), "completions": texts}
                  for g, m, a, n, kl, texts in zip(evals["generation"], evals["mean_reward"],
                                                   evals["accuracy"], evals["n_examples"],
                                                   evals["kl"],
                                                   runfile.read_eval_completions(path),
                                                   strict=True)],
    }


def inspect(path: str, as_json: bool, dist: Dist) -> None:
    if not dist.is_root:
        return
    info = inspect_summary(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    cfg = info["config"]
    print(f"run file     {info['path']} ({info['file_bytes'] / 2**20:.1f} MiB, format "
          f"{info['format_version']}, es-mpi {info['es_mpi_version']}, created {info['created']})")
    print(f"model        {info['model']['path']} (fingerprint {info['model']['fingerprint']})")
    print(f"task         {info['task']}, mode {cfg['mode']}, population {cfg['population']}, "
          f"sigma {cfg['sigma']}, lr {cfg['lr']}, shaping {cfg['shaping']}, "
          f"antithetic {cfg['antithetic']}, seed {cfg['seed']}")
    print(f"generations  {info['generations_complete']} of {info['generations_target']} "
          f"complete, {info['seconds_total']:.1f} s, world sizes {info['world_sizes']}")
    print(f"checkpoints  {info['checkpoints'] or 'none'}")
    for hw in info["hardware"]:
        print(f"machine      from generation {hw['generation']}: {hw['world_size']} rank(s) "
              f"on {devices.label(hw)}, {hw.get('dtype', '?')} replicas")
    if info["last_generations"]:
        print(f"last {len(info['last_generations'])} generation(s) (every generation: "
              "es-mpi report, or the run file's /generations)")
    for g in info["last_generations"]:
        diag = "".join(f", {k} {g[k]:.3g}" for k in DIAGNOSTIC_FIELDS
                       if g.get(k) is not None)
        print(f"  gen {g['generation'] + 1}: reward mean {g['reward_mean']:.4g} "
              f"min {g['reward_min']:.4g} max {g['reward_max']:.4g}{diag}")
    for e in info["evals"]:
        acc = "" if e["accuracy"] is None else f", accuracy {e['accuracy']:.3f}"
        kl = "" if e["kl"] is None else f", KL to base {e['kl']:.4g} nats/token"
        print(f"held-out     after {e['generation']} generations: mean reward "
              f"{e['mean_reward']:.4g}{acc}{kl} ({e['n_examples']} examples)")
