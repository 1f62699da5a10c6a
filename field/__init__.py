"""fieldlearn.field: what runs on a device in the field, over the learning core
(fieldlearn.device) and the version store (fieldlearn.store).

    fieldlearn.field.increment  the step pipeline: a base from a data set, one increment from
                                an image folder, evaluation of a version
    fieldlearn.field.watch      the daemon that learns class folders arriving in an inbox
    fieldlearn.field.capture    camera frames into INBOX/LABEL/ for watch
    fieldlearn.field.demo       the short class-incremental run on real data
    fieldlearn.field.doctor     what this device has and what fieldlearn will use
    fieldlearn.field.explain    teacher vs student attention maps

The commands (fieldlearn.cli.commands) call these; nothing here parses arguments or imports
a command (tests/test_import_graph.py).
"""
