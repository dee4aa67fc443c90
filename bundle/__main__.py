"""Dispatch ``python -m bundle <command>`` to one small module per command.

Each command lives in ``bundle/<module>.py`` as a function; only the chosen module is imported, so a quick command
does not pay for torch. Bad input (:class:`custom_components.errors.InputError`) ends with one ``error:`` line and
exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import fire

COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("bundle.synth", "synth", "write a synthetic chest-CT cohort in LUNA16's format"),
    "insert-nodules": ("bundle.insert_nodules", "insert_nodules", "real chest CTs with synthetic nodules inserted"),
    "prepare-luna16": ("bundle.prepare_luna16", "prepare_luna16", "LUNA16-style folder -> datalist JSON"),
    "froc": ("bundle.froc", "froc", "score a submission CSV as LUNA16 does (FROC[luna], FROC[new])"),
    "bench-preprocess": ("bundle.bench_preprocess", "bench_preprocess", "time and memory of preprocessing a scan"),
    "bench-froc": ("bundle.bench_froc", "bench_froc", "time of scoring a LUNA16-sized submission"),
    "bench-infer": ("bundle.bench_infer", "bench_infer", "time and memory of whole-scan inference"),
    "bench-train": ("bundle.bench_train", "bench_train", "training throughput in patches per second"),
    "model-info": ("bundle.model_info", "model_info", "parameters and FLOPs of the network presets"),
    "cross-validate": ("bundle.cross_validate", "cross_validate", "train the 5 folds and score them together"),
    "realism": ("bundle.realism", "realism", "generated vs real scans: lung HU, vessel calibres, noise, slices PNG"),
    "ensemble": ("bundle.cross_validate", "ensemble", "score several models' averaged detections on a fold"),
}


def _usage() -> str:
    lines = ["usage: python -m bundle <command> [--flag value ...]   (python -m bundle <command> --help)", ""]
    lines += [f"  {name:<18} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, attr, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module), attr)
    from custom_components.errors import exit_status

    return exit_status(lambda: fire.Fire(func, command=argv[1:], name=f"python -m bundle {name}"))


if __name__ == "__main__":
    sys.exit(main())
