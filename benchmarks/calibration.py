"""Investigation (benchmarks/README.md, "Calibration"): several (method, settings) runs on
one shared protocol, base model and class order, scored on validation.

    python benchmarks/calibration.py --methods lwm,lwf_mc,finetune --settings '{}' --out cal.json
    python benchmarks/calibration.py --methods lwm --settings '{"lc_calibration": 0.1}' --out a01.json
    python benchmarks/calibration.py --methods lwm --settings '{"new_head_init": "imprint"}' --out imp.json

Protocol (the README's table): CIFAR-100 from ../shared/data, the first --classes classes
of order --order-seed, --base base classes + --steps equal steps, the cpu45 preset's model
and training. Settings are LossConfig/TrainConfig fields on top of each method's defaults.
"""

from __future__ import annotations

import argparse
import json


from fieldlearn.device.bench_accuracy import METHOD_SETTINGS, PRESETS, Protocol
from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.data import class_order, incremental_split, open_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lwm,lwf_mc,finetune")
    p.add_argument("--settings", default="{}", help="JSON object of LossConfig/TrainConfig fields")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--base", type=int, default=10)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--order-seed", type=int, default=1993)
    p.add_argument("--out", default="calibration.json")
    args = p.parse_args()
    extra = json.loads(args.settings)
    preset = PRESETS["cpu45"]
    cfg = RunConfig(model=ModelConfig(**preset["model"]), train=TrainConfig(progress=False, **preset["train"]))
    train_all = open_dataset("cifar100", "train", cfg.model.input_size)
    test_all = open_dataset("cifar100", "test", cfg.model.input_size)
    used = list(range(args.classes))
    order = class_order(len(train_all.class_names), args.order_seed)
    train = train_all.reorder(order).select(used, preset["per_class"], seed=cfg.train.seed)
    train, val = train.split(preset["val_fraction"], seed=cfg.train.seed)
    test = test_all.reorder(order).select(used, preset["test_per_class"], seed=cfg.train.seed)
    proto = Protocol(cfg, train, val, test, incremental_split(used, args.base, args.steps))
    rows = []
    for m in args.methods.split(","):
        r = proto.run(m, {**METHOD_SETTINGS[m], **extra})
        rows.append({"method": m, "settings": {**METHOD_SETTINGS[m], **extra},
                     "val_average_incremental": r.val.average_incremental,
                     "test_average_incremental": r.test.average_incremental, "test_last": r.test.last,
                     "test_matrix": r.test.rows, "seconds": r.seconds})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "test_matrix"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
