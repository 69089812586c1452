"""python -m swiftd.shapeworld train|export|render|score (see train.py, export.py, score.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftd.shapeworld", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one stage (resumes from --work)")
    train.add_argument("--stage", required=True, choices=("vae", "unet", "controlnet", "lora-outline", "lora-pastel"))
    train.add_argument("--work", type=Path, default=Path(".train/shapes"), help="checkpoints of every stage")
    train.add_argument("--steps", type=int, help="total steps of the stage (default: the stage's)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--save-every", type=int)
    train.add_argument("--threads", type=int, help="torch CPU threads")

    export = commands.add_parser("export", help="write the trained models as a model root")
    export.add_argument("--work", type=Path, default=Path(".train/shapes"))
    export.add_argument("--out", type=Path, required=True)

    evaluate = commands.add_parser("evaluate", help="Diffusers on an exported root, scored on held-out prompts")
    evaluate.add_argument("--root", type=Path, required=True)
    evaluate.add_argument("--count", type=int, default=50)
    evaluate.add_argument("--controlnet", action="store_true", help="with the edges ControlNet and each scene's hint")
    evaluate.add_argument("--lora", choices=("outline", "pastel"))

    evaluate_vae = commands.add_parser("evaluate-vae", help="score the VAE's reconstructions of held-out scenes")
    evaluate_vae.add_argument("--work", type=Path, default=Path(".train/shapes"))
    evaluate_vae.add_argument("--count", type=int, default=100)

    render = commands.add_parser("render", help="draw the scene a caption describes")
    render.add_argument("--caption", required=True)
    render.add_argument("--style", choices=("outline", "pastel"))
    render.add_argument("--size", type=int, default=64)
    render.add_argument("--out", type=Path, required=True, help="PNG of the scene")
    render.add_argument("--edges", type=Path, help="PNG of its edge map (a ControlNet hint)")

    score = commands.add_parser("score", help="judge an image against a prompt (and a control image)")
    score.add_argument("--image", type=Path, required=True)
    score.add_argument("--prompt", required=True)
    score.add_argument("--control", type=Path)

    args = parser.parse_args(argv)
    if args.command == "train":
        import torch

        from swiftd.shapeworld.train import train as train_stage

        if args.threads:
            torch.set_num_threads(args.threads)
        overrides = {
            k: v
            for k, v in dict(
                steps=args.steps, batch_size=args.batch_size, seed=args.seed, save_every=args.save_every
            ).items()
            if v is not None
        }
        summary = train_stage(args.stage, args.work, **overrides)
        print(
            f"[train] {summary['stage']}: {summary['steps']} steps in {summary['seconds'] / 60:.1f} min on {summary['device']}"
        )
    elif args.command == "export":
        from swiftd.shapeworld.export import export as export_root

        summary = export_root(args.work, args.out)
        print(f"[export] {args.out}: {', '.join(summary['stages'])} (code {summary['training_code_version']})")
    elif args.command == "evaluate":
        from swiftd.shapeworld.evaluate import evaluate as run_evaluation

        print(run_evaluation(args.root, args.count, controlnet=args.controlnet, lora=args.lora).describe())
    elif args.command == "evaluate-vae":
        from swiftd.shapeworld.data import held_out_scenes
        from swiftd.shapeworld.evaluate import reconstructions, summarise
        from swiftd.shapeworld.models import fresh_components
        from swiftd.shapeworld.train import load_stage

        parts = fresh_components()
        load_stage(parts, args.work / "vae.pt", ("vae",))
        vae = parts["vae"].eval()
        scenes = held_out_scenes(args.count)
        for style in (None, "outline", "pastel"):
            print(f"{style or 'plain'}: {summarise(reconstructions(vae, scenes, style), scenes).describe()}")
    elif args.command == "render":
        import numpy as np
        from PIL import Image

        from swiftd.shapeworld.render import edge_map
        from swiftd.shapeworld.render import render as draw
        from swiftd.shapeworld.scene import parse_caption

        scene = parse_caption(args.caption)
        Image.fromarray(draw(scene, args.size, style=args.style)).save(args.out)
        if args.edges:
            Image.fromarray(np.asarray(edge_map(scene, args.size))).save(args.edges)
    elif args.command == "score":
        import numpy as np
        from PIL import Image

        from swiftd.shapeworld.scene import parse_caption
        from swiftd.shapeworld.score import score as judge

        image = np.asarray(Image.open(args.image).convert("RGB"))
        control = np.asarray(Image.open(args.control).convert("RGB")) if args.control else None
        scene = parse_caption(args.prompt)
        print(judge(image, scene, control).describe(scene))
    return 0


if __name__ == "__main__":
    sys.exit(main())
