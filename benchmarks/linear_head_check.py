"""Why the linear-head rows collapse on the demo's protocol: one increment, looked at closely.

Fashion-MNIST, the demo's model and base step (fmnist-demo preset, class order 1993, base
lr 0.01 for 8 epochs), then the first increment (2 new classes, 160 images each) trained
with fine-tuning's cross-entropy at a few learning rates and LC spans, no gradient clipping.
Prints the base network's pooled-feature norm, and for each increment setting: the mean
new-class cross-entropy over its epochs, how far each head row moved, the feature norm
after the step, and which classes the new images are predicted as.

    .venv/bin/python benchmarks/linear_head_check.py      # ~10 min on 1 CPU thread

A linear head on features of norm |f| moves a logit by about lr * |f|^2 per unit of error
and SGD step, so lr must shrink with |f|^2; benchmarks/README.md#linear-head-rows.
"""

from __future__ import annotations

import copy

import torch
from fieldlearn.device.config import LossConfig, ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.data import class_order, incremental_split, open_dataset
from fieldlearn.device.learner import train_step
from fieldlearn.device.methods import make_method
from fieldlearn.device.protocol import Order, parse_row, row_config
from fieldlearn.tools.bench_accuracy import PRESETS

SETTINGS = [("new", 0.02), ("all", 0.02), ("new", 0.003), ("all", 0.003), ("new", 0.001)]


def main() -> None:
    torch.set_num_threads(1)
    preset = PRESETS["fmnist-demo"]
    cfg = RunConfig(model=ModelConfig(**preset["model"]), train=TrainConfig(progress=False, **preset["train"]))
    train = open_dataset("fashion-mnist", "train", cfg.model.input_size)
    test = open_dataset("fashion-mnist", "test", cfg.model.input_size)
    order = class_order(len(train.class_names), 1993)[:6]
    groups = incremental_split(list(range(6)), 4, 1)                         # 4 base + 2 new
    train = train.reorder(order).select(list(range(6)), 160, seed=0)
    test = test.reorder(order).select(list(range(6)), 200, seed=0)
    o = Order(cfg, train, None, test, groups, log=print)
    row = parse_row("finetune")
    base = o.student_for(row, row_config(cfg, row, {}))
    data, z = o.train.take(groups[1])
    with torch.no_grad():
        f0, _ = base.forward_top(z)                                           # [N, 1280]
    print(f"base network: pooled feature norm on the new images {f0.norm(dim=1).mean():.1f}")
    for span, lr in SETTINGS:
        st = copy.deepcopy(base)
        c = row_config(cfg, row, {"lc_span": span, "lr": lr, "max_grad_norm": 0.0})
        st.widen(2, c.train.new_head_init)
        w0 = st.head.weight.detach().clone()
        rep = train_step(st, make_method("finetune", LossConfig(lc_span=span)), data, n_old=4, epochs=c.train.epochs,
                         cfg=c, teacher=None, step=1, lr=lr, z=z)
        st.eval()
        with torch.no_grad():
            f1, logits = st.forward_top(z)
        moved = (st.head.weight - w0).norm(dim=1)                              # [6]
        pred = torch.bincount(logits.argmax(1), minlength=6).tolist()
        print(f"lc_span {span:<3} lr {lr:<5}: new-class CE {rep.loss_terms['lc']:7.3f}, head rows moved "
              f"{[round(float(m), 3) for m in moved]}, feature norm {f1.norm(dim=1).mean():6.1f}, "
              f"new images predicted as classes 0-5: {pred}")


if __name__ == "__main__":
    main()
