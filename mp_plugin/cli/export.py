"""``mp-plugin export``: pruned model → ONNX, with the 2:4 check, onnxruntime parity and the trtexec line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mp_plugin.cli.common import add_model_args, model_from_args, out_file, positive_int
from mp_plugin.errors import MPPluginError


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"input shape must look like 1,3,224,224, got {text!r}") from exc
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return dims


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    p = sub.add_parser("export", help="export a k:n-pruned model to ONNX and verify the pattern survived")
    add_model_args(p)
    p.add_argument("--plan", help="plan.json giving each layer's pattern (default: --pattern for every target)")
    p.add_argument("--pattern", default="2:4", help="k:n pattern the target layers carry (default: %(default)s)")
    p.add_argument("--out", type=out_file, default="model.onnx", help="ONNX file to write (default: %(default)s)")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), help="e.g. 1,3,224,224")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (exporter default)")
    p.add_argument("--gemm-rewrite", action="store_true", help="rewrite MatMul+bias into Gemm(transB=1)")
    p.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="leave the batch axis free (default: fixed to the example's batch, as a TensorRT engine without profiles)",
    )
    p.add_argument("--fold", action="store_true", help="bake torch parametrizations (unsquashed masks) in")
    p.add_argument(
        "--magnitude-24",
        action="store_true",
        help="demo: magnitude-prune every eligible target layer to 2:4 before exporting (use `mp-plugin prune` for MP budgets)",
    )
    p.add_argument("--trtexec", action="store_true", help="print the trtexec line for a sparse TensorRT engine")
    p.add_argument("--json", dest="json_path", type=out_file, help="also write the verification report as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``export``."""
    try:
        from mp_plugin.integrations.onnx import export_onnx
    except ImportError as exc:
        raise MPPluginError(f"ONNX export needs onnx and onnxruntime: pip install 'mp-plugin[onnx]' ({exc})") from exc
    model = model_from_args(args)
    plan = None
    if args.plan:
        from mp_plugin.planning.build import PrunePlan

        plan = PrunePlan.load(args.plan)
    if args.magnitude_24:
        from mp_plugin.masks.select import magnitude_kn_

        print(f"magnitude-pruned {len(magnitude_kn_(model, 2, 4))} layers to 2:4")
    report = export_onnx(
        model,
        args.out,
        args.input_shape,
        dtype=args.dtype,
        pattern=args.pattern,
        plan=plan,
        opset=args.opset,
        gemm_rewrite=args.gemm_rewrite,
        dynamic_batch=args.dynamic_batch,
        fold=args.fold,
        show_progress=True,
    )
    print(f"wrote {report.path} ({report.exporter} exporter, opset {report.opset}, {report.export_seconds:.1f} s)")
    print(report.to_text())
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report.to_dict(), indent=1))
        print(f"wrote {args.json_path}")
    if args.trtexec:
        from mp_plugin.integrations.tensorrt import trtexec_command

        print("TensorRT (sparse engine; --sparsity=force would only give an upper bound):")
        print("  " + trtexec_command(report.path, sparse=True, fp16=args.dtype == "fp16"))
        if args.dtype != "fp16":
            print("  note: sparse tensor-core kernels run in fp16/int8; export with --dtype fp16 for TensorRT")
    return 0
