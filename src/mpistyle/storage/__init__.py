"""Where watched videos come from and results go: Azure Blob Storage, or local folders.

Three *areas*, each configured separately so each can have its own account and credential:
``input`` (new videos; read and list), ``output`` (finished videos, reports, previews; create
and write), and ``work`` (the watcher's state records, logs and quarantine; read, write, list,
delete). See :mod:`mpistyle.storage.areas`.
"""
