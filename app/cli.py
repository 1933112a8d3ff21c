"""textgen serve | pull | models | bench | eval | soak."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from app.config import Settings


def _settings(command: str, **overrides: object) -> Settings:
    """The settings, or exit 2 with one line per bad one, naming its environment variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        for error in exc.errors():
            name = "TEXTGEN_" + "_".join(str(part) for part in error["loc"]).upper()
            print(f"textgen {command}: {name}={error.get('input')!s}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    from app.main import create_app
    from app.models.loading.loader import load_model
    from app.models.loading.store import StoreError
    from app.server import serve

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("model", args.model)) if v is not None}
    settings = _settings("serve", **overrides)
    try:
        # Loaded before uvicorn starts so that a model that cannot be had ends the process with one
        # clear line; `uvicorn --factory app.main:create_app` loads it in the lifespan instead.
        loaded = load_model(settings)
    except StoreError as exc:
        print(f"textgen serve: {exc}", file=sys.stderr)
        return 2
    return serve(create_app(settings, loaded=loaded), settings.host, settings.port, args.log_level,
                 settings.shutdown_grace)  # fmt: skip


def _pull(args: argparse.Namespace) -> int:
    from app.models.loading.store import ModelStore, StoreError

    store = ModelStore(_settings("pull").model_store)
    try:
        located = store.pull(args.name, force=args.force, revision=args.revision)
    except StoreError as exc:
        print(f"textgen pull: {exc}", file=sys.stderr)
        return 1
    manifest = located.manifest
    params = f"{manifest.parameters / 1e6:.1f}M parameters" if manifest else ""
    print(f"{args.name}: {located.path} {params}")
    return 0


def _models(_: argparse.Namespace) -> int:
    from app.models.loading.store import BUILTIN, ModelStore

    store = ModelStore(_settings("models").model_store)
    manifests = store.list()
    print(f"model store: {store.root}")
    if not manifests:
        print("  (empty)")
    for m in manifests:
        size = sum((store.path(m.name) / f).stat().st_size for f in m.weights) / 1e6
        licence = f"; licence: {m.licence}" if m.licence else ""
        print(f"  {m.name:32} {m.parameters / 1e6:8.1f}M params {size:8.0f} MB  {m.source}: {m.source_ref}{licence}")
    missing = [name for name in BUILTIN if not store.has(name)]
    if missing:
        print("available offline with 'textgen pull NAME': " + ", ".join(
            f"{name} ({licence})" if (licence := getattr(BUILTIN[name], "licence", "")) else name
            for name in missing))
    print(f"default model: {store.default_model()}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from app.bench import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="textgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server (settings from TEXTGEN_* env vars)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="model name or hub id (default: gpt2 if present, else smollm2-135m-instruct)")
    serve.add_argument("--log-level", default=os.environ.get("TEXTGEN_LOG_LEVEL", "info"))
    serve.set_defaults(func=_serve)

    pull = sub.add_parser("pull", help="fetch a model into the model store")
    pull.add_argument("name", help="a built-in name (textgen models lists them), a Hugging Face Hub id such as "
                      "gpt2, a local .gguf file (converted once) or a local Hugging Face model folder")
    pull.add_argument("--force", action="store_true", help="fetch again even if present")
    pull.add_argument("--revision", help="hub revision (branch, tag or commit)")
    pull.set_defaults(func=_pull)

    models = sub.add_parser("models", help="list the models in the store")
    models.set_defaults(func=_models)

    bench = sub.add_parser("bench", help="load-test a server and print a table")
    from app.bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=_bench)

    evaluate = sub.add_parser("eval", help="measure a running server's task endpoints on public data")
    from app.eval.endpoints import add_arguments as eval_arguments
    from app.eval.endpoints import run_eval

    eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)

    soak = sub.add_parser("soak", help="storm a running server with good and bad traffic; print what happened")
    from app.bench.soak import add_arguments as soak_arguments
    from app.bench.soak import run_soak

    soak_arguments(soak)
    soak.set_defaults(func=run_soak)

    args = parser.parse_args(argv)
    # serve's --log-level is textgen's too (its access log is INFO lines), not only uvicorn's
    level = str(getattr(args, "log_level", None) or "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the bench's table
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
