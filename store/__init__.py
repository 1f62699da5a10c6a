"""fieldlearn.store: one version of the learner, from staging to publish to rollback.

    fieldlearn.store.state      a version on disk: write (staging dir, fsync, rename, then
                                `current`), load (safetensors and JSON only)
    fieldlearn.store.publish    the gate every version passes before it becomes `current`
    fieldlearn.store.versions   the store around them, torch-free: meta checks, history,
                                rollback, prune, leftover cleanup, the state lock

It sits above the learning core (fieldlearn.device) and beside the torch-free runtime, whose
layout (fieldlearn.runtime.layout) finds `current`; the core never imports it
(tests/test_import_graph.py).
"""
