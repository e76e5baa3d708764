"""torchrun's entry points for `--rdzv-backend=etcd-v3` and `--rdzv-backend=etcd-v3-rounds`.

torch loads the `torchrun.handlers` entry points while its rendezvous package is still being
imported, and calls each with no arguments to get a handler creator. So this module imports
nothing from torch, and the creator imports `rdzv.torch` only when torchrun asks for a handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters


def create_etcd_v3_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Create the `etcd-v3` rendezvous handler (see `rdzv.torch.create_handler`).

    Under torchrun, an error comes out as one line (see `rdzv.torch._create_for_torchrun`).
    """
    from rdzv.torch import _create_for_torchrun

    return _create_for_torchrun("etcd-v3", params)


def handler_creator() -> object:
    """The `torchrun.handlers` entry point: returns the creator torch registers as `etcd-v3`."""
    return create_etcd_v3_handler


def create_etcd_v3_rounds_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Create the `etcd-v3-rounds` handler (see `rdzv.torch.create_rounds_handler`).

    Under torchrun, an error comes out as one line (see `rdzv.torch._create_for_torchrun`).
    """
    from rdzv.torch import _create_for_torchrun

    return _create_for_torchrun("etcd-v3-rounds", params)


def rounds_handler_creator() -> object:
    """The `torchrun.handlers` entry point `etcd-v3-rounds`: rdzv's handler on the rounds."""
    return create_etcd_v3_rounds_handler
