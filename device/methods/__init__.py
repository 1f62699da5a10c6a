"""Ways to learn an increment, one file each, behind fieldlearn.device.methods.base.Method."""

from fieldlearn.device.config import LossConfig
from fieldlearn.device.methods.base import Batch, Method
from fieldlearn.device.methods.finetune import FineTune
from fieldlearn.device.methods.lc_lad import LcLad
from fieldlearn.device.methods.lwf_mc import LwFMC
from fieldlearn.device.methods.lwm import LwM
from fieldlearn.device.methods.none import NoTraining

METHODS: dict[str, type[Method]] = {m.name: m for m in (FineTune, LwFMC, LwM, LcLad, NoTraining)}


def make_method(name: str, loss: LossConfig) -> Method:
    if name not in METHODS:
        from fieldlearn.runtime.errors import UserError

        raise UserError(f"--method {name}: unknown (choose from {', '.join(METHODS)})")
    return METHODS[name](loss)


__all__ = ["Batch", "Method", "METHODS", "make_method"]
