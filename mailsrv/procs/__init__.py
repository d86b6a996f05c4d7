"""
``[server] processes`` > 1: the parent (the ``twistd`` process) accepts and relays, receiving
processes run the SMTP sessions.  See mailsrv.procs.pool for the whole, docs/design.md
("Several processes") for the decisions.
"""
