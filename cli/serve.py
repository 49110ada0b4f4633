"""`embedctl serve`: check the settings, publish the weights to shared memory, start the server process.

Like `embedctl worker`, this command checks what it can in one line each (model, index folders, port), publishes
the model's weights once for the host, then replaces itself with `python -P -m embedctl.serve`, which starts the
worker processes fresh: none inherits this process's torch state, and each attaches to the published weights.
The command builds the server's `ServeConfig` (which checks every value and holds the defaults) and hands it to
the server as JSON in EMBEDCTL_SERVE_CONFIG.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import fields, replace
from pathlib import Path

import click

from embedctl.cli.common import cache_options, env_option, exported_devices, shm_option
from embedctl.cli.query import funnel_options
from embedctl.pipeline.errors import ConfigError
from embedctl.pipeline.manifest import read_info
from embedctl.pipeline.storage import is_uri, location
from embedctl.pipeline.versions import index_names, resolve_index_dir
from embedctl.serve.config import ENV as SERVE_CONFIG_ENV
from embedctl.serve.config import ServeConfig


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") \
                from None


_DEFAULTS = {f.name: f.default for f in fields(ServeConfig)}
"""The server's defaults, held by its config object."""
_LIMITS = (  # option (EMBEDCTL_<OPTION>; the ServeConfig field of that name), type, help
    ("--batch-wait-ms", float, "How long a batch's first request waits for others while clients are concurrent."),
    ("--max-queue", int, "Requests waiting for the model per worker before the server answers 429."),
    ("--max-body", int, "Largest request body in bytes (413 above it)."),
    ("--max-inputs", int, "Most texts in one request."),
    ("--cache", int, "Recent (text, instruction) embeddings kept per worker (0: no cache)."),
    ("--header-timeout", float, "Seconds a connection has to send a request's headers; then it is closed (408)."),
    ("--body-timeout", float, "Seconds a request's whole body has to arrive after its headers; then 408."),
    ("--max-connections", int, "Open connections per worker; past it requests are answered 503."),
)


def _limit_options(func):
    """The server's limits as options, in `_LIMITS`' order, with the config's defaults."""
    for option, kind, text in reversed(_LIMITS):
        name = option[2:].replace("-", "_")
        func = env_option(option, env=name.upper(), type=kind, default=_DEFAULTS[name], show_default=True,
                          help=text)(func)
    return func


@click.command()
@click.argument("index_dirs", nargs=-1, type=click.Path(file_okay=False))
@env_option("--model", "-m", env="MODEL", default=None,
            help="The model to serve (alias, folder or hub id); clients name it as `model` [default: the model "
                 "that built the first index]. Every index must be built with it.")
@env_option("--workers", "-w", env="WORKERS", type=int, default=None,
            help="Worker processes [default: one per GPU, else 1 using every core].")
@env_option("--host", env="HOST", default="127.0.0.1", show_default=True,
            help="Address to listen on (0.0.0.0 for every interface: set --api-key then).")
@env_option("--port", "-p", env="PORT", type=int, default=_DEFAULTS["port"], show_default=True)
@env_option("--api-key", env="API_KEY", default=None,
            help="Require `Authorization: Bearer KEY` on every route but /health.")
@env_option("--device", env="DEVICE", default="auto", show_default=True)
@env_option("--dtype", env="DTYPE", default="auto", show_default=True)
@shm_option
@env_option("--threads", env="THREADS", type=int, default=None,
            help="Torch threads per worker [default: the cores shared out among the workers].")
@env_option("--batch-tokens", env="BATCH_TOKENS", type=int, default=None,
            help="Token budget of one model call [default: the encoder's, 1024 on CPU, 32768 on CUDA].")
@_limit_options
@env_option("--no-verify", env="NO_VERIFY", is_flag=True,
            help="Do not check index files against their checksums when (re)loading them.")
@env_option("--device-share", env="DEVICE_SHARE", type=click.Choice(["auto", "on", "off"]), default="auto",
            show_default=True, help="One device copy of the weights per GPU, mapped by every worker on it "
                                    "(auto: on CUDA).")
@funnel_options
@cache_options
def serve(index_dirs: tuple[str, ...], model: str | None, workers: int | None, host: str, port: int,
          api_key: str | None, device: str, dtype: str, shm: str, threads: int | None, batch_tokens: int | None,
          batch_wait_ms: float, max_queue: int, max_body: int, max_inputs: int, cache: int,
          header_timeout: float, body_timeout: float, max_connections: int, no_verify: bool,
          device_share: str, funnel: int | None, shortlist: int | None) -> None:
    """Serve MODEL over HTTP (OpenAI's /v1/embeddings) and search INDEX_DIRS (/v1/search, by folder name).

    Routes: POST /v1/embeddings, POST /v1/search, GET /v1/models, GET /health, GET /metrics (Prometheus).
    """
    from embedctl.pipeline.models import resolve_model

    served = ServeConfig(  # checked first, one line naming the option; model, workers and share follow
        model=model or "", indexes=tuple(str(f) if is_uri(f) else str(Path(f).resolve()) for f in index_dirs),
        workers=1 if workers is None else workers, host=host, port=port, api_key=api_key, device=device,
        dtype=dtype, shm=shm, threads=threads, batch_tokens=batch_tokens, batch_wait_ms=batch_wait_ms,
        max_queue=max_queue, max_body=max_body, max_inputs=max_inputs, cache=cache, header_timeout=header_timeout, body_timeout=body_timeout,
        max_connections=max_connections, verify=not no_verify, funnel=funnel, shortlist=shortlist)
    if shortlist is not None and funnel is None:
        raise click.UsageError("--shortlist needs --funnel DIM (the default funnel of /v1/search)")
    infos = [read_info(resolve_index_dir(location(f))) for f in index_dirs]  # one line when one is not published
    if model is None:
        if not infos:
            raise click.UsageError("give --model MODEL, or index folders whose model is served")
        ref = infos[0].model_ref()
        model = infos[0].model  # clients name it as it was named at index time
    else:
        ref = resolve_model(model)
    fingerprint = ref.fingerprint
    for folder, info in zip(map(location, index_dirs), infos, strict=True):
        info.require_model(fingerprint, model, folder)
        if funnel is not None and (funnel >= info.dim or funnel not in info.dims):
            raise ConfigError(f"--funnel {funnel} cannot run on {folder}: it needs an indexed dim below the full dim "
                              f"{info.dim} (indexed: {', '.join(map(str, info.dims))})")
    names = index_names(index_dirs)
    _check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who reaches this host can use it",
                   err=True)

    from embedctl.pipeline.loader import gpus_for, resolve_device, resolve_dtype
    from embedctl.pipeline.models import read_profile
    from embedctl.shm_loader.segment import dtype_str, publish

    dev = resolve_device(device)
    gpus = gpus_for(dev)
    share = None
    count = workers or gpus or 1
    if shm == "off" and device_share == "on":
        raise click.UsageError("--device-share on (or EMBEDCTL_DEVICE_SHARE=on) needs the shared-memory segment it "
                               "copies to the devices, and --shm off (or EMBEDCTL_SHM=off) turns it off; drop one")
    if shm != "off":
        folder, torch_dtype = read_profile(ref.path).transformer_path, resolve_dtype(dtype, dev)
        result = publish(folder, torch_dtype)
        click.echo(("published " if result["published"] else "attaching to ") + result["name"], err=True)
        devices = exported_devices(device_share, dev, gpus, count)
        if devices:
            share = {"folder": str(folder), "dtype": dtype_str(torch_dtype), "devices": devices}
    served = replace(served, model=model, model_path=str(ref.path), workers=count, share=share)
    click.echo(f"serving {model} on http://{host}:{port} with {served.workers} worker(s); indexes: "
               f"{', '.join(names) or 'none'}", err=True)
    env = dict(os.environ, **{SERVE_CONFIG_ENV: served.to_json()})
    env.pop("EMBEDCTL_API_KEY", None)  # the key travels in the config only
    argv = [sys.executable, "-P", "-m", "embedctl.serve"]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec: the server starts fresh, without the torch state this process created while publishing
    os.execvpe(argv[0], argv, env)
