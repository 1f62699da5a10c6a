"""A fleet learns as one: what a device sends, how the hub merges and publishes, and the
Flower app that carries them (docs/FLEET.md).

    base.py          the content hash of everything a device's features depend on
    contribution.py  what a device learned since it last synced: class statistics, checked
    merge.py         the hub: validate, add exactly, publish a version (ledger: counted once)
    take.py          a device takes the merged version back without losing its own classes
    wire.py          those records <-> Flower messages (the only module here that knows flwr's records)
    flower_app.py    the ServerApp and ClientApp: thin adapters over the four above
    processes.py     the Flower processes `fieldlearn fleet serve` / `join` start and stop
    command.py       `fieldlearn fleet serve|join`

fieldlearn.fleet imports fieldlearn.device; fieldlearn.device never imports fieldlearn.fleet
(tests/test_import_graph.py).
"""
