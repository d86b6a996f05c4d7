"""
The command-line tools: ``mailsrv`` (users, queue, check-config) and ``sendmail``.
"""
