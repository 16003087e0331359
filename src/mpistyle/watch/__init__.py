"""The watcher program, ``mpistyle-watch``: moves videos from a storage area to a scoring job and
the results back.

- ``watcher.py``: one tick: list the input area, claim new videos, start jobs, deliver results.
- ``runners.py``: how a job is started and followed (a local process group, or a Slurm job).
- ``areas.py``: the three storage areas behind one interface (Azure Blob Storage or a local
  folder): ``input`` (new videos; read and list), ``output`` (finished videos, reports,
  previews; create and write), ``work`` (the watcher's state records, logs and quarantine).
- ``names.py``: which blob and file names are safe, and the names derived from them.
- ``status.py``: ``mpistyle-watch status``: every state record read, as a table or JSON, and
  which are stuck.
- ``sidecar.py``: a video's own settings, from ``<video name>.json`` beside it, checked against
  the watcher's allow-list.
- ``config.py``: the typed schema of configs/watch.yaml (and its ``storage/`` and ``runner/``
  groups), and the checks a type cannot express.
"""
