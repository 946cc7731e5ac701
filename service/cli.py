"""The ``normcore`` command: serve, and talk to a running server.

    normcore serve [--port 8000 ...]          same as python -m service
    normcore stats [LAYER]                    print statistics as JSON
    normcore normalize LAYER FILE.npy [--mode train] [--out OUT.npy]
    normcore reset LAYER | delete LAYER
    normcore export LAYER OUT.safetensors | import LAYER IN.safetensors
    normcore export-model PREFIX OUT.safetensors   a catalog model's state, by module path

The URL and token come from --url/--token or NORMCORE_URL/NORMCORE_API_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .client import Client, ClientError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normcore", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("NORMCORE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("NORMCORE_API_TOKEN"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start the server (flags as python -m service)",
                   add_help=False)
    stats = sub.add_parser("stats", help="print statistics")
    stats.add_argument("layer", nargs="?")
    norm = sub.add_parser("normalize", help="normalize a .npy array")
    norm.add_argument("layer")
    norm.add_argument("file")
    norm.add_argument("--mode", choices=("eval", "train"), default="eval")
    norm.add_argument("--out", help="write the output to this .npy file")
    for name in ("reset", "delete"):
        sub.add_parser(name, help=f"{name} a layer").add_argument("layer")
    export = sub.add_parser("export", help="download a layer's state as safetensors")
    export.add_argument("layer")
    export.add_argument("path")
    model = sub.add_parser("export-model", help="download a catalog model's state as "
                           "safetensors, keyed by module path (load_state_dict-ready)")
    model.add_argument("prefix", help="the [[model]] entry's name_prefix, e.g. digits.")
    model.add_argument("path")
    upload = sub.add_parser("import", help="upload a layer's state from safetensors")
    upload.add_argument("layer")
    upload.add_argument("path")
    return parser


def _run(args: argparse.Namespace, client: Client) -> object:
    if args.command == "stats":
        return client.stats(args.layer)
    if args.command == "normalize":
        result = client.normalize(args.layer, np.load(args.file), args.mode)
        if args.out:
            np.save(args.out, result.output)
        return {"shape": list(result.output.shape),
                "batch_stats": {k: v.tolist() for k, v in result.stats.items()},
                "num_batches_tracked": result.num_batches_tracked}
    if args.command == "reset":
        return client.reset_layer(args.layer)
    if args.command == "delete":
        client.delete_layer(args.layer)
        return {"deleted": args.layer}
    if args.command in ("export", "export-model"):
        data = (client.download_state(args.layer) if args.command == "export"
                else client.download_model_state(args.prefix))
        with open(args.path, "wb") as f:
            f.write(data)
        return {"written": args.path}
    with open(args.path, "rb") as f:  # import
        return client.upload_state(args.layer, f.read())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from .__main__ import main as serve

        return serve(argv[1:])
    args = _parser().parse_args(argv)
    try:
        with Client(args.url, args.token) as client:
            print(json.dumps(_run(args, client), indent=2))
    except ClientError as exc:
        print(f"normcore: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
