"""The surfaces over the library and the study: the ``minidiff`` command (:mod:`.cli`), the local
web page (:mod:`.serve`), the demo, ``minidiff bench`` and a checkpoint's cost report. Thin
shells: they parse, call :mod:`minidiff` or :mod:`minidiff.study`, and print."""
