"""The ``tunelab`` command: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.config import PRECISIONS
from tunelab.errors import TunelabError
from tunelab.text_safety import visible


def cmd_init(args: argparse.Namespace) -> int:
    from tunelab.config import starter_config_text

    path = Path(args.path)
    if path.is_dir():
        raise TunelabError(f"{path} is a folder. Give a file path: tunelab init {path}/run.yaml")
    if path.exists() and not args.force:
        raise TunelabError(
            f"{path} already exists. Pass --force to replace it, or give another "
            "path: tunelab init my-run.yaml"
        )
    from tunelab.files import atomic_write_text

    if path.exists():
        print(f"Replacing {path} (--force).")
    atomic_write_text(path, starter_config_text())
    print(f"Wrote {path}. Set dataset_path, then run: tunelab train {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.api import FineTuner
    from tunelab.config import load_config

    config = load_config(args.config, args.set)
    tuner = FineTuner(config)
    results = tuner.train(resume=args.resume, overwrite=args.overwrite)
    from tunelab.training.distributed import current_world, exit_worker

    world = current_world()
    if world.active:  # a torchrun worker: report once, then end
        if world.is_main:
            _report(results, config.output_dir)
        exit_worker(0)
    _report(results, config.output_dir)
    return 0


def _report(results: dict, output_dir: str) -> None:
    print(
        f"Trained {results['steps']} steps on {results['train_tokens']:,} tokens in "
        f"{results['train_runtime_seconds']:.1f} s ({results['tokens_per_second']:.0f} tokens/s)"
        f"; final train loss {results['final_train_loss']:.4f}"
    )
    for warning in results.get("warnings", []):
        print(f"Warning: {warning}")
    if "eval_perplexity" in results:
        before = results.get("initial_eval_loss")
        change = f" (base model: {before:.4f})" if before is not None else ""
        print(
            f"Eval loss {results['eval_loss']:.4f}, perplexity "
            f"{results['eval_perplexity']:.2f}{change}"
        )
    elif "eval_loss" in results:  # a preference run: TRL's reward metrics, no perplexity
        from tunelab.training.preference import format_eval_metrics

        line = format_eval_metrics(results["eval_loss"], results, prefix="eval_")
        if "initial_eval_loss" in results:
            base = format_eval_metrics(
                results["initial_eval_loss"], results, prefix="initial_eval_"
            )
            line += f" (base model: {base.removeprefix('eval ')})"
        print(line[0].upper() + line[1:])
    print(f"Run folder: {visible(str(output_dir))}")


def _load(args: argparse.Namespace):  # noqa: ANN202
    from tunelab.generation import load_for_inference

    return load_for_inference(
        args.target,
        precision=args.precision,
        use_adapter=not args.base,
        # a run keeps its own setting unless the flag allows custom code here
        trust_remote_code=True if args.trust_remote_code else None,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.generation import generate

    loaded = _load(args)
    answers = generate(
        loaded,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )
    for prompt, answer in zip(args.prompt, answers, strict=True):
        if len(args.prompt) > 1:
            print(visible(f"### {prompt}"))
        print(visible(answer))  # a model can emit escape sequences learned from its data
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.generation import chat_loop

    chat_loop(
        _load(args),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tunelab.shipping.merge import merge_run

    out = merge_run(args.run_dir, args.out_dir, overwrite=args.overwrite)
    print(f"Merged model written to {out} (loads with transformers alone).")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from tunelab.models import run_trust_remote_code
    from tunelab.shipping.gguf_export import check_gguf_target, export_gguf
    from tunelab.shipping.merge import merge_run

    run_dir = Path(args.run_dir)
    out_dir = run_dir
    if not run_dir.exists():  # a model name (the default model's, say), as serve takes
        from tunelab.models import resolve_model

        resolved = Path(resolve_model(args.run_dir))
        if resolved.is_dir():  # the name's cached folder: the file goes here, not into a cache
            run_dir, out_dir = resolved, Path.cwd()
    out = Path(args.out or out_dir / f"{Path(args.run_dir).name}-{args.type}.gguf")
    trust = run_trust_remote_code(run_dir)
    check_gguf_target(out, run_dir, args.overwrite)  # before the minutes a merge takes
    if args.format == "ollama":  # refuse before writing anything, and before the slow part
        from tunelab.shipping.ollama import (
            chat_settings,
            check_modelfile_target,
            translate_chat_template,
        )

        check_modelfile_target(out.parent / "Modelfile", out, args.overwrite)
        tokenizer, system_prompt = chat_settings(run_dir)
        translate_chat_template(tokenizer, system_prompt)
    with tempfile.TemporaryDirectory(prefix="tunelab-export-") as scratch:
        source = run_dir
        if (run_dir / "adapter_config.json").is_file():
            source = merge_run(run_dir, Path(scratch) / "model")
        export_gguf(source, out, args.type, args.overwrite, trust)
        print(f"Wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type}).")
        if args.format == "ollama":
            from tunelab.shipping.ollama import write_modelfile

            modelfile = write_modelfile(
                out, tokenizer, system_prompt, out.parent / "Modelfile", args.overwrite
            )
            print(f"Wrote {modelfile}: ollama create NAME -f {modelfile}")
        if not args.no_check:
            _check_export(out, run_dir, source, args.type, Path(scratch))
    return 0


def _check_export(out: Path, run_dir: Path, source: Path, out_type: str, scratch: Path) -> None:
    """Run the file in llama.cpp and say what it found; a quantized file's perplexity is set
    beside an f16 export's."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("Not checked in llama.cpp: install llama-cpp-python (pip install 'tunelab[gguf]').")
        return
    from tunelab.shipping.gguf_export import export_gguf
    from tunelab.shipping.llama_cpp_check import check_in_llama_cpp, held_out_perplexity

    result = check_in_llama_cpp(out, run_dir)
    print(result.summary())
    if out_type not in ("f32", "f16", "bf16"):
        reference = export_gguf(source, scratch / "reference-f16.gguf", "f16")
        f16 = held_out_perplexity(reference, run_dir)
        print(
            f"Held-out perplexity: {out_type} {result.perplexity:.3f}, f16 {f16:.3f} "
            f"({(result.perplexity / f16 - 1) * 100:+.1f}%)."
        )
        if result.near_tie:
            print(f"({out_type} rounds the weights, so a near-tie can change a greedy token.)")


def cmd_serve(args: argparse.Namespace) -> int:
    from tunelab.serving.app import serve

    serve(
        args.targets,
        args.host,
        args.port,
        args.precision,
        args.max_batch_size,
        continuous=not args.no_continuous_batching,
    )
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from tunelab.ui.serve import run_ui

    run_ui(args.folder, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    return 0


def _name_value(text: str, what: str) -> tuple[str, str]:
    if "=" not in text:
        raise TunelabError(f"{what} expects NAME=VALUE, got {text!r}.")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from tunelab.shipping.adapters import describe, format_table

    print(visible(format_table([describe(path) for path in args.runs])))
    return 0


def cmd_adapters_generate(args: argparse.Namespace) -> int:
    from tunelab.generation import generate
    from tunelab.shipping.adapters import AdapterSet

    adapters = dict(_name_value(a, "--adapter") for a in args.adapter)
    adapter_set = AdapterSet(adapters)
    if args.combine:
        weights = {}
        for part in args.combine.split(","):
            name, value = _name_value(part, "--combine")
            try:
                weights[name] = float(value)
            except ValueError:
                raise TunelabError(
                    f"--combine weight for {name!r} is {value!r}, not a number. "
                    "Example: --combine a=0.7,b=0.3"
                ) from None
        names = [adapter_set.combine(weights)]
    else:
        names = [args.use] if args.use else adapter_set.names
    for name in names:
        adapter_set.use(name)
        answers = generate(adapter_set.loaded(), args.prompt, max_new_tokens=args.max_new_tokens)
        for prompt, answer in zip(args.prompt, answers, strict=True):
            print(visible(f"[{name}] {prompt}\n{answer}\n"))
    return 0


def cmd_methods_compare(args: argparse.Namespace) -> int:
    from tunelab.method_comparison import compare_methods

    methods = args.methods.split(",") if args.methods else None
    compare_methods(args.config, methods, args.set, args.tokens, args.out)
    return 0


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        help="A run folder (output_dir of 'tunelab train'), a model "
        "folder, a .gguf file, or 'smollm2-135m-instruct'.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Longest answer.")
    parser.add_argument("--sample", action="store_true", help="Sample instead of greedy.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature.")
    parser.add_argument("--top-p", type=float, default=0.9, help="Nucleus sampling mass.")
    parser.add_argument("--top-k", type=int, default=None, help="Sample from the k best.")
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling.")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="Above 1 discourages repeating tokens (1 = off).",
    )
    parser.add_argument(
        "--base",
        action="store_true",
        help="Use a run's base model without its adapter (for comparison).",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Run Python code shipped with the model (auto_map); off unless a run allowed it.",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="Inference precision (fp32 matches plain transformers exactly).",
    )


def build_parser() -> argparse.ArgumentParser:
    from tunelab import __version__

    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune a language model on your own domain data, and prove whether it "
        "helped.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="Show full tracebacks instead of short error messages, and the libraries' "
        "warnings, logging and progress bars.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init",
        help="Write a commented starter config.",
        description="Write a YAML config with every key, its default and meaning.",
    )
    init.add_argument("path", nargs="?", default="tunelab.yaml", help="Where to write it.")
    init.add_argument("--force", action="store_true", help="Replace an existing file.")
    init.set_defaults(func=cmd_init)

    from tunelab.config import keys_help

    train = sub.add_parser(
        "train",
        help="Fine-tune a model as a config describes.",
        description="Fine-tune with the configured method (LoRA by default); writes the "
        "adapter, tokenizer, "
        "config, metrics.jsonl and results.json to output_dir.",
        epilog=keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config (see 'tunelab init').")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config key, e.g. --set learning_rate=1e-4 (repeatable).",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="Replace an existing run in output_dir."
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="Continue the run in output_dir from its last checkpoint.",
    )
    train.set_defaults(func=cmd_train)

    generate = sub.add_parser(
        "generate",
        help="Answer prompts with a run or a model.",
        description="Greedy by default; a run uses the chat template it trained with.",
    )
    _add_inference_options(generate)
    generate.add_argument("--prompt", action="append", required=True, help="A prompt (repeatable).")
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="Chat interactively with a run or a model.")
    _add_inference_options(chat)
    chat.set_defaults(func=cmd_chat, max_new_tokens=256)

    merge = sub.add_parser(
        "merge",
        help="Fold a run's adapter into its base and save a plain transformers model.",
        description="LoRA, DoRA, IA3 and AdaLoRA adapters merge; QLoRA merges into the "
        "full-precision base. The result loads with transformers alone.",
    )
    merge.add_argument("run_dir", help="A run folder (output_dir of 'tunelab train').")
    merge.add_argument("out_dir", help="Where to write the merged model.")
    merge.add_argument("--overwrite", action="store_true", help="Replace a non-empty out_dir.")
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser(
        "export",
        help="Export a run (merged) or a model folder to GGUF.",
        description="Writes a GGUF file with the tokenizer and chat template, readable by "
        "llama.cpp and by transformers' GGUF loader.",
    )
    export.add_argument("run_dir", help="A run folder or a transformers model folder.")
    export.add_argument(
        "--format",
        default="gguf",
        choices=["gguf", "ollama"],
        help="gguf, or ollama: the GGUF file plus a Modelfile with the trained chat template.",
    )
    export.add_argument(
        "--type",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
        help="Weight type of the 2-D tensors (k-quants use llama.cpp's quantizer).",
    )
    export.add_argument(
        "--no-check",
        action="store_true",
        help="Skip running the file in llama.cpp against tunelab generate after writing.",
    )
    export.add_argument(
        "--out",
        default=None,
        help="Output file (default: in run_dir; for a model name, the current folder).",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing GGUF file at --out (and tunelab's Modelfile beside it).",
    )
    export.set_defaults(func=cmd_export)

    serve = sub.add_parser(
        "serve",
        help="Serve runs and their base model with the OpenAI API.",
        description="An OpenAI-compatible server (/v1/models, /v1/chat/completions, "
        "/v1/completions, streaming). Each run folder is served under its folder name on one "
        "shared base model, which is served too; concurrent requests are batched.",
    )
    serve.add_argument(
        "targets", nargs="+", metavar="RUN_OR_MODEL", help="Run folders (one base) or one model."
    )
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    serve.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    serve.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="Inference precision (fp32 answers match 'tunelab generate').",
    )
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="Most requests of one adapter generated together.",
    )
    serve.add_argument(
        "--no-continuous-batching",
        action="store_true",
        help="Run each batch to its end before new requests start (by default a request "
        "joins the running batch at the next token).",
    )
    serve.set_defaults(func=cmd_serve)

    adapters = sub.add_parser("adapters", help="List, switch and combine adapters of runs.")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    listing = adapters_sub.add_parser("list", help="Describe run folders' adapters.")
    listing.add_argument("runs", nargs="+", help="Run folders.")
    listing.set_defaults(func=cmd_adapters_list)
    side = adapters_sub.add_parser(
        "generate",
        help="Load several adapters on one base; answer with each, one, or a weighted sum.",
    )
    side.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="NAME=RUN_DIR",
        help="An adapter to load (repeatable; all on the same base model).",
    )
    side.add_argument("--use", default=None, help="Answer with this adapter only.")
    side.add_argument(
        "--combine",
        default=None,
        metavar="A=W,B=W",
        help="Answer with the weighted sum of these adapters' updates.",
    )
    side.add_argument("--prompt", action="append", required=True, help="A prompt (repeatable).")
    side.add_argument("--max-new-tokens", type=int, default=128, help="Longest answer.")
    side.set_defaults(func=cmd_adapters_generate)

    methods = sub.add_parser("methods", help="Compare adaptation methods.")
    methods_sub = methods.add_subparsers(dest="methods_command", required=True, metavar="ACTION")
    compare = methods_sub.add_parser(
        "compare",
        help="Train each method on the same token budget; table of parameters, memory, speed "
        "and eval loss.",
    )
    compare.add_argument("config", help="A run config with eval_path.")
    compare.add_argument(
        "--methods",
        default=None,
        help="Comma-separated methods (default: every method); also lora+, pissa, olora, eva, "
        "loftq and neftune (LoRA with that extra; loftq on qlora).",
    )
    compare.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="Token budget per method (default: max_steps of the config).",
    )
    compare.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config key for every method.",
    )
    compare.add_argument("--out", default=None, help="Folder for the runs and the table.")
    compare.set_defaults(func=cmd_methods_compare)

    ui = sub.add_parser(
        "ui",
        help="Open the whole loop in a local web app (data, config, runs, chat, shipping).",
        description="Serves a web app over FOLDER (its data, configs and runs) on 127.0.0.1.",
    )
    ui.add_argument("folder", nargs="?", default=".", help="Workspace folder (default: here).")
    ui.add_argument("--port", type=int, default=7860, help="Port to listen on (7860).")
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on; anything but 127.0.0.1 opens the app to the network "
        "(printed as a warning).",
    )
    ui.add_argument(
        "--max-upload-mb",
        type=float,
        default=1024,
        help="Largest data file the page accepts as an upload, in MiB (1024); a file in an "
        "opened folder is read where it is, whatever its size.",
    )
    ui.set_defaults(func=cmd_ui)

    for names, module, register in COMMAND_GROUPS:
        add_command_group(sub, names, module, register)
    return parser


# The subcommands registered by their own modules: (command names, module, function).
COMMAND_GROUPS = (
    (("data",), "tunelab.data.cli", "add_data_commands"),
    (("doctor",), "tunelab.diagnostics.cli", "add_doctor_commands"),
    (("runs",), "tunelab.runs.cli", "add_runs_commands"),
    (("eval",), "tunelab.evaluation.cli", "add_eval_commands"),
    (("estimate", "pilot", "sweep"), "tunelab.planning.cli", "add_planning_commands"),
)


def add_command_group(sub: Any, names: tuple[str, ...], module: str, register: str) -> None:
    """Register a module's subcommands; when the module cannot be imported (a package
    missing), the commands stay listed and running one says what to install, instead of
    argparse calling them unknown."""
    import importlib

    try:
        add_commands = getattr(importlib.import_module(module), register)
    except ImportError as error:
        hint = missing_package_hint(error)
        for name in names:
            placeholder = sub.add_parser(name, help=f"(unavailable: {hint})", add_help=False)
            placeholder.add_argument("rest", nargs=argparse.REMAINDER)
            placeholder.set_defaults(func=_unavailable(name, hint))
        return
    add_commands(sub)


def _unavailable(name: str, hint: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise TunelabError(f"'tunelab {name}' is unavailable: {hint}")

    return run


def missing_package_hint(error: ImportError, requirements: list[str] | None = None) -> str:
    """What failed to import and what to install: for a core dependency of tunelab a
    reinstall (or the package in its declared range), else the extra of tunelab that declares
    the package, else the package itself. ``requirements``: tunelab's declared requirements
    (default: its installed metadata)."""
    import re

    missing = (error.name or "").split(".")[0]
    what = f"importing {error.name or 'a module'} failed ({error})"
    reinstall = "pip install --force-reinstall tunelab"
    if not missing or missing == "tunelab":
        return f"{what}. Reinstall tunelab ({reinstall})."
    core, extras = _declared(missing, _requirements() if requirements is None else requirements)
    if core is not None:  # tunelab's install is broken: an extra would not mend it
        wanted = re.split(r"\s*;", core, maxsplit=1)[0].strip()
        return (
            f"{what}. It is a core dependency of tunelab, so the install is incomplete: "
            f"reinstall tunelab ({reinstall}) or install it with: pip install '{wanted}'"
        )
    if extras:
        return f"{what}. Install it with: pip install 'tunelab[{extras[0]}]'"
    return f"{what}. Install it with: pip install {missing}"


def _requirements() -> list[str]:
    from importlib import metadata

    try:
        return metadata.requires("tunelab") or []
    except metadata.PackageNotFoundError:
        return []


def _declared(package: str, requirements: list[str]) -> tuple[str | None, list[str]]:
    """(the core requirement that names ``package``, or None; tunelab's extras other than
    test that list it)."""
    import re

    wanted = re.sub(r"[-_.]+", "-", package).lower()
    core, extras = None, []
    for requirement in requirements:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])
        if name.lower() != wanted:
            continue
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)", requirement)
        if extra is None:
            core = requirement
        elif extra.group(1) != "test":
            extras.append(extra.group(1))
    return core, extras


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        # library chatter (deprecations, bitsandbytes' kernel note, progress bars) is for
        # tunelab's developers, not its users
        from tunelab.library_noise import silence_library_noise

        silence_library_noise()
    try:
        return int(args.func(args) or 0)
    except TunelabError as exc:
        if args.debug:
            raise
        print(f"error: {visible(exc)}", file=sys.stderr)  # messages quote data and paths
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
