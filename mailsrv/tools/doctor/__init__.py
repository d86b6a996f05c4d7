"""``mailsrv doctor``: checks a running installation and says, for each thing, ok / warning /
problem and the fix.  ``command`` runs the checks in order; ``probe`` (this machine) and
``probe_dns`` (the DNS) gather the facts; ``evaluate`` and ``evaluate_mail`` judge them
(pure); ``findings`` is what they produce and how it is printed."""
