"""Build a transformers model whose weights are views of an attached segment (no copy, no disk read).

The model is constructed with its parameters on the meta device and its buffers real (so non-persistent
buffers such as rotary inverse frequencies and position ids are computed as in a normal load), then the
segment's tensors are assigned in place of the parameters with `load_state_dict(assign=True)`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from embedctl.shm_loader.errors import SegmentError
from embedctl.shm_loader.segment import Attached, attach

if TYPE_CHECKING:
    from embedctl.shm_loader.share import Lease

LOG = logging.getLogger(__name__)


@contextmanager
def params_on_meta():
    """Register every new module parameter on the meta device (buffers stay real): no weight memory is used."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(module._parameters[name].__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _state_for(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map checkpoint names to the model's names (a base model loaded from e.g. a `*ForCausalLM` checkpoint)."""
    prefixes = ["", f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else None, "model."]
    expected = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    state = {}
    for key in expected:
        for prefix in prefixes:
            if prefix is not None and prefix + key in tensors:
                state[key] = tensors[prefix + key]
                break
    return state


def build_model(folder: Path, attached: Attached, dtype: torch.dtype) -> torch.nn.Module:
    """A model of `folder`'s architecture whose parameters are the segment's tensors."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder))
    with params_on_meta():
        model = AutoModel.from_config(config, dtype=dtype)
    state = _state_for(model, attached.tensors)
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise SegmentError(f"segment {attached.name} lacks {len(left)} weights of {folder} (e.g. {left[0]}); "
                           "publish it again")
    model.requires_grad_(False)
    model.eval()
    return model  # its tensors hold the mapping (torch.frombuffer keeps a reference): it lives as long as they do


def attach_model(folder: Path, dtype: torch.dtype,
                 shm_dir: Path | None = None) -> tuple[torch.nn.Module, Attached] | None:
    """The model of `folder` on the shared weights in `dtype` and the segment it maps, or None when no segment is
    published."""
    attached = attach(folder, dtype, shm_dir)
    if attached is None:
        return None
    model = build_model(folder, attached, dtype)
    LOG.info("attached %s from %s", folder, attached.path)
    return model, attached


def attach_shared_model(folder: Path, dtype: torch.dtype, device: str, key: str,
                        wait: float = 0.0) -> tuple[torch.nn.Module, Lease]:
    """The model of `folder` on the copy of its weights that the exporter of bootstrap `key` holds on `device` (one
    copy per device, see share.py and exporter.py), and the lease on that exporter (`Lease.check` before a batch).

    Raises:
        SegmentError: no exporter answered within `wait` s, it runs as another user, or what it exports is not
            the weights of `folder` as they are now (fingerprint, dtype) or not what this process mapped (checksum).
    """
    from embedctl.shm_loader.device import checksum, import_handle, tensor_views
    from embedctl.shm_loader.fingerprint import folder_fingerprint
    from embedctl.shm_loader.segment import dtype_str, segment_name
    from embedctl.shm_loader.share import Lease, close_fds, connect

    folder = Path(folder).resolve()
    name = segment_name(folder, dtype)
    sock, header, fds = connect(name, device, key, wait)
    try:
        if header.get("dtype") != dtype_str(dtype) or header.get("folder") != str(folder) \
                or header.get("fingerprint") != folder_fingerprint(folder):
            raise SegmentError(f"the weight exporter of {name} on {device} holds {header.get('folder')} in "
                               f"{header.get('dtype')} as it was when published, not {folder} as it is now; "
                               "restart the worker (it publishes again and restarts the exporters)")
        buffer, keep = import_handle(header["handle"], fds, device)
        close_fds(fds)  # the mapping holds the memory
        fds = []
        if checksum(buffer) != header["checksum"]:
            raise SegmentError(f"the weights mapped from the exporter of {name} on {device} do not match its "
                               "checksum; restart the worker")
        attached = Attached(path=Path(name), manifest=header, tensors=tensor_views(buffer, header), mapping=keep)
        # the weights are on the device already; the buffers made at construction (rotary frequencies, position
        # ids) are moved there
        model = build_model(folder, attached, dtype).to(device)
    except BaseException:
        sock.close()
        close_fds(fds)
        raise
    LOG.info("mapped %s from the exporter on %s (pid %s)", folder, device, header["exporter_pid"])
    return model, Lease(sock, device, int(header["exporter_pid"]), name)
