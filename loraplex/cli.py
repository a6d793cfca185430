"""`loraplex serve | accounts | finetunes | jobs | run | generate | model-path` (jobs: cli_jobs.py).

Failures the user can act on (a refusal from the server, no server at the URL, something else on
the port, a missing model package) print one line `error: …` on stderr and exit 1, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from loraplex import cli_jobs, config, env
from loraplex.config import DEFAULT_HOST, DEFAULT_PORT, HttpConfig, engine_config, engine_settings
from loraplex.logs import LOG_FORMATS


def _generate(args: argparse.Namespace) -> int:
    from loraplex import LLM, SamplingParams

    llm = LLM(args.model, **_engine_settings(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.raw:
        out = llm.generate([args.prompt], params)[0]
    else:
        out = llm.chat([[{"role": "user", "content": args.prompt}]], params)[0]
    print(out.text)
    return 0


def _dev_account(data_dir: Path, registry_url: str | None) -> tuple[str, str | None]:
    """The development account of this data dir: (account id, its token) when created now, (id,
    None) when it existed. Its token is kept in dev-account.json (mode 0600) for the developer to
    look up; it is printed once, when created, never on later starts. Real accounts' tokens are
    shown once and never stored."""
    from loraplex.adapters.registry import open_registry

    path = data_dir / "dev-account.json"
    registry = open_registry(data_dir, registry_url)
    if path.is_file():
        saved = json.loads(path.read_text())
        if any(row[0] == saved["account_id"] for row in registry.list_accounts()):
            return saved["account_id"], None
    account_id, token = registry.create_account("dev")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"account_id": account_id, "token": token}, f)
    return account_id, token


def _print_dev_help(data_dir: Path, account_id: str, token: str | None, url: str, model_name: str) -> None:
    saved = data_dir / "dev-account.json"
    if token is None:
        print(f"dev account: export LORAPLEX_ACCOUNT_ID={account_id}  (its token is in {saved})", flush=True)
        return
    base = f"{url}/client/v4/accounts/{account_id}/ai"
    print(f"""
dev account created (shown this once; kept in {saved}):
  export LORAPLEX_ACCOUNT_ID={account_id}
  export LORAPLEX_API_TOKEN={token}
try:
  curl -s {base}/run/{model_name} \\
    -H "Authorization: Bearer $LORAPLEX_API_TOKEN" -d '{{"prompt": "What is the capital of France?"}}'
""", flush=True)


def _server_options(args: argparse.Namespace):
    from loraplex.api.server import ServerOptions

    return ServerOptions(
        data_dir=args.data_dir, engine=engine_config(args.model, **_engine_settings(args)), model_name=args.model_name,
        max_pending=args.max_pending,
        max_finetunes_per_account=args.max_finetunes_per_account, registry=args.registry,
        max_adapter_bytes=args.max_adapter_size,
        admin_token=env.admin_token(),
        http=HttpConfig(max_connections=args.max_connections, header_timeout_s=args.header_timeout,
                        body_timeout_s=args.body_timeout, keep_alive_timeout_s=args.keep_alive_timeout),
        metrics_token=args.metrics_token or os.environ.get("LORAPLEX_METRICS_TOKEN") or None, docs=args.docs,
    )


def _serve(args: argparse.Namespace) -> int:
    """Start-up lines, then only uvicorn's access lines and loraplex's structured ones (see
    loraplex/logs.py); "serving … on URL" once the port is bound."""
    import logging

    from loraplex.api.app import create_app
    from loraplex.api.listen import serve
    from loraplex.api.connections import raise_open_file_limit
    from loraplex.api.server import build_context
    from loraplex.logs import configure, event

    configure(args.log_format, args.log_level)
    raise_open_file_limit()
    options = _server_options(args)
    dev_account = _dev_account(args.data_dir, args.registry) if args.dev_account else None
    if args.replicas is not None:
        return _serve_replicas(args, options, dev_account)
    app = create_app(build_context(options))

    def announce(url: str) -> None:
        if dev_account is not None:
            _print_dev_help(args.data_dir, *dev_account, url, options.served_name)
        if args.log_format == "json":
            event(logging.getLogger("loraplex.server"), "serving", model=options.served_name, url=url)
        else:
            print(f"serving {options.served_name} (and {options.served_name}-lora) on {url}", flush=True)

    serve(app, options.http, args.host, args.port, args.log_level, args.log_format, announce)
    return 0


def _serve_replicas(args: argparse.Namespace, options, dev_account) -> int:
    """`serve --replicas N`: N engine replicas on Ray Serve behind this process's HTTP endpoint,
    removed again when it stops (SIGINT, SIGTERM); a local Ray it started stops with it."""
    import logging
    import signal

    from loraplex import errors
    from loraplex.api.app import create_app
    from loraplex.api.listen import serve
    from loraplex.logs import event

    try:
        from loraplex.serve.deployment import build_ingress_context, deploy, install, start_ray, undeploy
    except ImportError as e:
        raise errors.InvalidInput(f"--replicas needs Ray Serve ({e}): pip install 'loraplex[scaleout]', "
                                  "or `make serve REPLICAS=N`") from None

    try:
        scaleout = config.ScaleoutConfig(replicas=args.replicas, ray_address=args.ray_address,
                                         replica_num_cpus=args.replica_cpus, replica_num_gpus=args.replica_gpus,
                                         train_num_cpus=args.train_cpus, train_num_gpus=args.train_gpus)
    except ValueError as e:
        raise errors.InvalidInput(f"--replicas: {e}") from None
    started = start_ray(scaleout.ray_address)
    try:
        ctx = build_ingress_context(options, scaleout, deploy(options, scaleout))
        app = install(create_app(ctx), ctx)

        def announce(url: str) -> None:
            if dev_account is not None:
                _print_dev_help(args.data_dir, *dev_account, url, options.served_name)
            if args.log_format == "json":
                event(logging.getLogger("loraplex.server"), "serving", model=options.served_name, url=url,
                      replicas=scaleout.replicas)
            else:
                print(f"serving {options.served_name} (and {options.served_name}-lora) on {url} "
                      f"with {scaleout.replicas} engine replicas on Ray Serve", flush=True)

        # uvicorn stops on SIGINT / SIGTERM, then raises the signal again: end quietly, and let
        # `finally` remove the replicas (on a cluster they would outlive this process otherwise)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            serve(app, options.http, args.host, args.port, args.log_level, args.log_format, announce)
        except KeyboardInterrupt:
            pass
    finally:
        undeploy(scaleout, stop_ray=started and scaleout.ray_address is None)
    return 0


def _accounts(args: argparse.Namespace) -> int:
    from loraplex.adapters.registry import open_registry

    registry = open_registry(args.data_dir, args.registry)
    if args.action == "create":
        account_id, token = registry.create_account(args.name)
        print(json.dumps({"account_id": account_id, "token": token}))
    else:
        for account_id, name, created_at in registry.list_accounts():
            print(json.dumps({"account_id": account_id, "name": name, "created_at": created_at}))
    return 0


def _client(args: argparse.Namespace):
    from loraplex.client import Client

    return Client(args.url, env.account_id(), env.api_token())


def _finetunes(args: argparse.Namespace) -> int:
    from loraplex.client import print_json

    client = _client(args)
    if args.action == "create":
        print_json(client.create_finetune(args.model, args.name, Path(args.folder), args.description, args.public))
    elif args.action == "get":
        print_json(client.get_finetune(args.finetune))
    elif args.action == "delete":
        print_json(client.delete_finetune(args.finetune))
    else:  # list: one JSON line per finetune, with its state (pending | ready | invalid) and state_reason
        for finetune in client.list_finetunes():
            print_json(finetune)
    return 0


def _jobs(args: argparse.Namespace) -> int:
    return cli_jobs.run(args, _client(args))


def _run(args: argparse.Namespace) -> int:
    """Prints the reply (with --stream, piece by piece as the server sends it), then a newline."""
    client = _client(args)
    request = dict(lora=args.lora, max_tokens=args.max_tokens, raw=args.raw, temperature=args.temperature,
                   seed=args.seed, system=args.system)
    if args.stream:
        for piece in client.stream(args.model, args.prompt, **request):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(client.run(args.model, args.prompt, **request))
    return 0


def _model_path(args: argparse.Namespace) -> int:
    """Prints the converted HF folder of the default model (the weights the server serves, and the
    ones to train adapters against), converting the GGUF first if needed."""
    from loraplex.models.default_model import ensure_default_model

    print(ensure_default_model(args.data_dir))
    return 0


def _bytes_or_fraction(text: str) -> int | float:
    value = float(text)
    return int(value) if value > 1 else value


_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _byte_size(text: str) -> int:
    """'1073741824', '512MiB', '2GB' → bytes."""
    number = text.rstrip("KMGIBkmgib")
    unit = text[len(number):].strip().upper()
    if unit not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: a byte count, optionally with one of {', '.join(u for u in _BYTE_UNITS if u)}")
    try:
        value = float(number) * _BYTE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    return int(value)


def _engine_flags() -> argparse.ArgumentParser:
    """One flag per engine setting, named, parsed and documented from loraplex/config.py: the
    setting's name with dashes and without a `_bytes` / `_s` unit suffix; `--no-NAME` for a
    setting that is on by default."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--model", default="default", help='a Hugging Face folder, or "default"')
    parsers = {"bytes": _byte_size, "bytes_or_fraction": _bytes_or_fraction}
    for name, spec in engine_settings().items():
        flag, parse, help_text = re.sub(r"_(bytes|s)$", "", name).replace("_", "-"), spec.metadata["parse"], spec.metadata["help"]
        if parse is bool:
            flags.add_argument(f"--no-{flag}" if spec.default else f"--{flag}", dest=name, default=spec.default,
                               action="store_false" if spec.default else "store_true",
                               help=f"{'turn off: ' if spec.default else ''}{help_text}")
        else:
            default = "" if spec.default is None else f" (default: {spec.default})"
            metavar = {"bytes": "BYTES", "bytes_or_fraction": "BYTES|FRACTION"}.get(parse, "SECONDS" if name.endswith("_s") else None)
            flags.add_argument(f"--{flag}", dest=name, type=parsers.get(parse, parse), default=spec.default,
                               metavar=metavar, help=help_text + default)
    return flags


def _engine_settings(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in engine_settings()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex")
    sub = parser.add_subparsers(dest="command", required=True)
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", type=Path, default=None, help=f"default: {env.DATA_DIR_HELP}")
    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument("--registry", default=env.registry(), metavar="URL",
                          help="accounts, tokens and finetunes: a postgresql://… URL, shared by every server "
                               f"given it, or a SQLite file (default: {env.REGISTRY_HELP})")
    model = _engine_flags()
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--url", default=env.api_url(), help=f"the server (default: {env.API_URL_HELP})")

    gen = sub.add_parser("generate", parents=[model], help="run one prompt offline")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template")

    serve = sub.add_parser("serve", parents=[model, data_dir, registry], help="start the HTTP API")
    serve.add_argument("--model-name", default=None, help="the name clients use (default: derived from --model)")
    serve.add_argument("--host", default=DEFAULT_HOST)
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--max-pending", type=int, default=config.DEFAULT_MAX_PENDING,
                       help=f"requests in flight before 429 (default {config.DEFAULT_MAX_PENDING})")
    serve.add_argument("--max-finetunes-per-account", type=int, default=config.DEFAULT_MAX_FINETUNES_PER_ACCOUNT,
                       help="finetunes per account, whatever their state "
                            f"(default {config.DEFAULT_MAX_FINETUNES_PER_ACCOUNT})")
    serve.add_argument("--max-adapter-size", type=_byte_size, default=config.DEFAULT_MAX_ADAPTER_BYTES,
                       help=f"largest adapter_model.safetensors accepted, e.g. 500MB (default {config.DEFAULT_MAX_ADAPTER_BYTES})")
    http = HttpConfig()
    serve.add_argument("--max-connections", type=int, default=http.max_connections,
                       help=f"open connections at most; more are answered 503 (default {http.max_connections})")
    serve.add_argument("--header-timeout", type=float, default=http.header_timeout_s, metavar="SECONDS",
                       help=f"time for a request's headers to arrive (default {http.header_timeout_s:g})")
    serve.add_argument("--body-timeout", type=float, default=http.body_timeout_s, metavar="SECONDS",
                       help=f"longest pause within a request body (default {http.body_timeout_s:g})")
    serve.add_argument("--keep-alive-timeout", type=float, default=http.keep_alive_timeout_s, metavar="SECONDS",
                       help=f"idle keep-alive connections are closed after this (default {http.keep_alive_timeout_s:g})")
    serve.add_argument("--metrics-token", default=None,
                       help="/metrics wants 'Authorization: Bearer TOKEN' (or $LORAPLEX_METRICS_TOKEN); default: open")
    serve.add_argument("--no-docs", dest="docs", action="store_false",
                       help="do not serve /docs, /redoc and /openapi.json (served, without a token, by default)")
    serve.add_argument("--dev-account", action="store_true", help="create (once) and print a development account")
    scaleout = config.ScaleoutConfig()
    serve.add_argument("--replicas", type=int, default=None,
                       help="run this many engine replicas on Ray Serve behind this one endpoint (default: one "
                            "engine in this process, no Ray)")
    serve.add_argument("--ray-address", default=None,
                       help="with --replicas: join this Ray cluster ('auto' on a cluster node, or ray://HOST:PORT); "
                            "default: start a local Ray")
    serve.add_argument("--replica-cpus", type=float, default=scaleout.replica_num_cpus,
                       help=f"with --replicas: Ray CPUs per replica (default {scaleout.replica_num_cpus:g})")
    serve.add_argument("--replica-gpus", type=float, default=scaleout.replica_num_gpus,
                       help=f"with --replicas: Ray GPUs per replica (default {scaleout.replica_num_gpus:g})")
    serve.add_argument("--train-cpus", type=float, default=scaleout.train_num_cpus,
                       help="with --replicas: Ray CPUs of each fine-tuning job's training task "
                            f"(default {scaleout.train_num_cpus:g})")
    serve.add_argument("--train-gpus", type=float, default=scaleout.train_num_gpus,
                       help=f"with --replicas: Ray GPUs of each training task (default {scaleout.train_num_gpus:g})")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                       help="text lines, or one JSON object per line (for log collectors)")

    accounts = sub.add_parser("accounts", help="manage accounts (operator, on the server's data dir or --registry)")
    accounts_sub = accounts.add_subparsers(dest="action", required=True)
    create = accounts_sub.add_parser("create", parents=[data_dir, registry], help='prints {"account_id", "token"}')
    create.add_argument("name")
    accounts_sub.add_parser("list", parents=[data_dir, registry])

    finetunes = sub.add_parser("finetunes", help="upload, list, show and delete finetunes (client)")
    finetunes_sub = finetunes.add_subparsers(dest="action", required=True)
    ft_create = finetunes_sub.add_parser("create", parents=[url], help="upload a PEFT folder as a finetune")
    ft_create.add_argument("model")
    ft_create.add_argument("name")
    ft_create.add_argument("folder")
    ft_create.add_argument("--description", default="")
    ft_create.add_argument("--public", action="store_true")
    finetunes_sub.add_parser("list", parents=[url], help="one JSON line per finetune, with its state (pending | ready | invalid) and why")
    ft_get = finetunes_sub.add_parser("get", parents=[url], help="one finetune, with its state and assets (JSON)")
    ft_get.add_argument("finetune", help="id or name")
    ft_delete = finetunes_sub.add_parser("delete", parents=[url], help="delete a finetune and its files")
    ft_delete.add_argument("finetune", help="id or name")

    cli_jobs.add_parser(sub, url)

    run = sub.add_parser("run", parents=[url], help="run a prompt on the server (client)")
    run.add_argument("model")
    run.add_argument("prompt")
    run.add_argument("--lora", default=None, help="a finetune name or id")
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: the server's)")
    run.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    run.add_argument("--system", default=None, help="a system prompt (chat template only)")
    run.add_argument("--stream", action="store_true", help="print the reply as it is generated")
    run.add_argument("--raw", action="store_true", help="no chat template")

    sub.add_parser("model-path", parents=[data_dir],
                   help="print the default model's HF folder (converted from its GGUF if needed): train against it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "data_dir", None) is not None:
        env.use_data_dir(args.data_dir)
    elif hasattr(args, "data_dir"):
        args.data_dir = env.data_dir()
    commands = {"generate": _generate, "serve": _serve, "accounts": _accounts, "finetunes": _finetunes, "jobs": _jobs,
                "run": _run, "model-path": _model_path}
    try:
        return commands[args.command](args)
    except Exception as e:  # refusals from the server or the registry: one line, no traceback
        from loraplex.client import ClientError
        from loraplex.errors import LoraplexError

        if isinstance(e, (ClientError, LoraplexError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
