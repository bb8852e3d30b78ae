"""The `kiln` command: `kiln run` runs the pipeline flow, `kiln generate` writes PNGs from a stage's checkpoint,
`kiln export` writes a stage's model as a diffusers folder, `kiln compare` tabulates runs from MLflow, `kiln
compare-systems` trains and measures the diffusion systems (flows/systems.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kiln_cli.prefect_server import watch_ephemeral_server

# Prefect reads its settings once, when it is first imported: Kiln's defaults go in before anything imports it.
# The ephemeral API server's first start (database migrations) can take over 20 s on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# No anonymous usage heartbeat from the ephemeral server: offline, each run logged "Failed to send telemetry" as an
# ERROR. This one setting also turns off the client's analytics events (they ask the server's setting first).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _run(args) -> int:
    from kiln.config import load_config

    cfg = load_config(args.preset, args.overrides)  # fail on a bad config or stage name before Prefect starts
    from flows.pipeline import stage_modes

    if args.only and not args.run_name:
        raise ValueError("--only reuses an existing run's outputs: name it with --run-name")
    run_root = Path(cfg.run_dir) / args.run_name if args.run_name else None
    stage_modes(cfg, args.force, args.from_stage, args.only, run_root)
    if cfg.model.pretrained:  # the released weights fit the configured model, before Prefect starts
        from kiln.weights import check_pretrained

        check_pretrained(cfg)
    from flows.pipeline import pipeline

    watch_ephemeral_server()

    outputs = pipeline(preset=args.preset, overrides=args.overrides, run_name=args.run_name, force=args.force,
                       from_stage=args.from_stage, only=args.only)
    from kiln.stage_io import read_stage_manifest

    evaluated = [name for name in outputs if name.startswith("eval-") and read_stage_manifest(Path(outputs[name]))]
    if not evaluated:
        print(f"\nkiln: pipeline finished; outputs under {Path(outputs['data']).parent}")
        return 0
    metrics = read_stage_manifest(Path(outputs[evaluated[-1]]))["metrics"]
    print(f"\nkiln: pipeline finished; outputs under {Path(outputs['data']).parent}")
    for key in sorted(metrics):
        if key.startswith("eval/heldout/") or key.endswith("/correct"):
            print(f"  {key:40s} {metrics[key]:.3f}")
    return 0


def _generate(args) -> int:
    from kiln.vae import vae_for
    from stages.common import pick_device
    from stages.sampling import generate_for_captions, load_stage

    device = pick_device(args.device)
    cfg, model, vae_dir, meta = load_stage(Path(args.from_path), device)
    vae = vae_for(cfg, vae_dir, device)
    resolution = meta.get("resolution") or cfg.train.rungs[-1].resolution
    width, height = args.width or resolution, args.height or resolution
    for side, value in (("width", width), ("height", height)):
        if value % 16:
            raise ValueError(f"--{side} must be a multiple of 16, got {value}")
    images = generate_for_captions(
        cfg, model, vae, [args.prompt] * args.n, width=width, height=height,
        steps=args.steps or cfg.sampler.steps, cfg_scale=cfg.sampler.cfg if args.cfg is None else args.cfg,
        seed=args.seed, negative_prompt=args.negative_prompt, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"{args.seed}-{i:03d}.png"
        image.save(path)
        print(path)
    return 0


def _export(args) -> int:
    from stages.export import export_diffusers

    print(export_diffusers(Path(args.from_path), Path(args.out), merge=args.merge))
    return 0


def _compare(args) -> int:
    from flows.compare import compare

    print(compare(args.runs, args.experiment, Path(args.grid) if args.grid else None))
    if args.grid:
        print(f"sample grid: {args.grid}")
    return 0


def _compare_systems(args) -> int:
    from kiln.config import load_config

    for name in ("compare-base", *(args.systems or ())):  # a bad name or override fails before Prefect starts
        load_config(name, args.overrides)
    from flows.systems import compare_systems

    watch_ephemeral_server()

    result = compare_systems(systems=args.systems, steps=args.steps, overrides=args.overrides, run_name=args.run_name)
    print(f"table: {result['table']}\nplot: {result['plot']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Train Qwen-Image-style text-to-image models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline (Prefect flow, MLflow tracking)")
    run.add_argument("--preset", default="tiny", help="preset name in configs/ or a YAML path (default: tiny)")
    run.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE",
                     help="override a config value, e.g. --set train.rungs.0.steps=100 (repeatable)")
    run.add_argument("--run-name", default=None, help="folder name under run_dir and MLflow run name")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rerun STAGE even if its output is current (repeatable); later stages rerun if it changed")
    run.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                     help="rerun STAGE and every stage after it")
    run.add_argument("--only", action="append", default=[], metavar="STAGE",
                     help="run only STAGE (repeatable), reusing the run's existing outputs of every other stage")
    run.set_defaults(func=_run)

    gen = sub.add_parser("generate", help="write PNGs from a stage's checkpoint")
    gen.add_argument("--from", dest="from_path", required=True, help="stage output folder or checkpoint folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--n", type=int, default=4)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--cfg", type=float, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--out", required=True)
    gen.set_defaults(func=_generate)

    export = sub.add_parser("export", help="write a stage's model as a diffusers QwenImagePipeline folder")
    export.add_argument("--from", dest="from_path", required=True, help="stage output folder or checkpoint folder")
    export.add_argument("--out", required=True, help="a new folder")
    export.add_argument("--merge", action="store_true",
                        help="a LoRA stage: write the adapter fused into full weights, not the base plus "
                             "pytorch_lora_weights.safetensors")
    export.set_defaults(func=_export)

    cmp = sub.add_parser("compare", help="stage-by-stage evaluation table of pipeline runs, from MLflow")
    cmp.add_argument("runs", nargs="+", help="pipeline run names (the folders under runs/)")
    cmp.add_argument("--experiment", default="kiln", help="MLflow experiment (config `experiment`)")
    cmp.add_argument("--grid", default=None, help="also write a side-by-side sample grid to this .png")
    cmp.set_defaults(func=_compare)

    systems = sub.add_parser("compare-systems", help="train and evaluate the diffusion systems (DDPM .. Qwen-Image) "
                                                     "at several sampling-step counts (Prefect flow, MLflow)")
    systems.add_argument("--systems", nargs="+", default=None, metavar="PRESET",
                         help="system presets (default: ddpm sd1 sd2 dit sd3 qwen-image-tiny)")
    systems.add_argument("--steps", nargs="+", type=int, default=None, metavar="N",
                         help="sampling-step counts to evaluate (default: 5 10 25 50 100)")
    systems.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE",
                         help="override a value in every system's config (repeatable)")
    systems.add_argument("--run-name", default=None, help="folder name under run_dir and MLflow run name")
    systems.set_defaults(func=_compare_systems)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"kiln: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
