"""`embedctl shm publish|status|release`: the shared-memory weight segments of this host."""

from __future__ import annotations

import click

from embedctl.cli.common import env_option, print_json, print_rows
from embedctl.pipeline import defaults
from embedctl.shm_loader.segment import human_bytes


@click.group()
def shm() -> None:
    """Model weights in POSIX shared memory: published once per host, attached zero-copy by every worker."""


@shm.command()
@click.option("--model", "-m", envvar="EMBEDCTL_MODEL", show_envvar=True, default=defaults.DEFAULT_MODEL,
              show_default=True, help="Alias, model folder or hub id.")
@click.option("--dtype", envvar="EMBEDCTL_DTYPE", show_envvar=True, default="auto", show_default=True,
              help="Compute dtype of the workers: auto (fp32 on CPU hosts, bf16 on CUDA hosts), fp32, fp16, bf16.")
@click.option("--device", envvar="EMBEDCTL_DEVICE", show_envvar=True, default="auto", show_default=True,
              help="The workers' device (decides what dtype auto means).")
@env_option("--replace", env="SHM_REPLACE", is_flag=True, help="Publish again even when the segment is up to date.")
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print the segment's manifest summary as JSON.")
def publish(model: str, dtype: str, device: str, replace: bool, as_json: bool) -> None:
    """Place the weights of MODEL, converted to the compute dtype, in one shared-memory segment.

    The segment outlives this command; workers on this host attach to it instead of loading the model.
    """
    from embedctl.pipeline.loader import dtype_name, resolve_device, resolve_dtype
    from embedctl.pipeline.models import read_profile, resolve_model
    from embedctl.shm_loader.segment import publish as publish_segment

    ref = resolve_model(model)
    folder = read_profile(ref.path).transformer_path
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    result = publish_segment(folder, torch_dtype, replace=replace)
    summary = {"name": result["name"], "published": result["published"], "model": model,
               "folder": result["folder"], "dtype": result["dtype"], "bytes": result["bytes"],
               "tensors": len(result["tensors"]), "created": result["created"], "seconds": result.get("seconds")}
    if as_json:
        print_json(summary)
    elif result["published"]:
        click.echo(f"published {summary['name']}: {human_bytes(summary['bytes'])} of {model} in {dtype_name(torch_dtype)} "
                   f"({summary['tensors']} tensors) in {summary['seconds']:.1f}s")
    else:
        click.echo(f"already published: {summary['name']} ({human_bytes(summary['bytes'])}, {summary['dtype']}, "
                   f"created {summary['created']}) matches {model}")


@shm.command()
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print the segments as JSON.")
def status(as_json: bool) -> None:
    """List the segments: model folder, dtype, size, created, state, processes that map it."""
    from embedctl.shm_loader.segment import default_shm_dir, list_segments

    print_rows(list_segments(), as_json, f"no embedctl segments in {default_shm_dir()}",
               f"{'name':<36} {'state':<10} {'dtype':<9} {'size':>10} {'procs':>5}  {'created':<25} folder",
               lambda s: f"{s['name']:<36} {s['state']:<10} {s['dtype'] or '-':<9} {human_bytes(s['bytes']):>10} "
                         f"{s['processes']:>5}  {s['created'] or '-':<25} {s['folder'] or '-'}")


@shm.command()
@click.argument("names", nargs=-1)
@env_option("--all", "all_", env="SHM_RELEASE_ALL", is_flag=True, help="Release every embedctl segment.")
@env_option("--force", env="SHM_FORCE", is_flag=True, help="Release even while processes map it (they keep their mapping).")
def release(names: tuple[str, ...], all_: bool, force: bool) -> None:
    """Unlink segments NAMES (or --all); refused while processes map them, unless --force."""
    from embedctl.shm_loader.segment import release as release_segments

    if bool(names) == all_:
        raise click.UsageError("give segment names or --all (see `embedctl shm status`)")
    removed = release_segments(None if all_ else list(names), force=force)
    click.echo(f"released {len(removed)} segment(s)" + (f": {', '.join(removed)}" if removed else ""))
